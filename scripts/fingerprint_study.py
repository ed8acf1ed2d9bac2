"""The fingerprint dispute at toy scale: is an upcycled child recognisable, and how often are strangers?

Trains, on 2 CPU cores in about half an hour (24 layers, d_model 64, byte-level):
- parent: a dense model with QKV biases (the Qwen2 shape), on the built-in corpus;
- child: the parent upcycled to MoGE (moge.interop.upcycle: 8 experts in 4 groups,
  exact at step 0), trained on from there on *different* data (the Python standard
  library's email package source), with checkpoints along the way;
- strangers: dense models from other seeds, on the parent's data or the other data, one
  of another width (d_model 96: 1.5x), and a MoGE model trained from scratch on the other data.
Then fingerprints (moge.tools.fingerprint) every pair of final models and the parent
against every checkpoint of the child, with permutation p-values, and writes
study.json, study.md (the tables) and fingerprint_study.png into --out.

    python scripts/fingerprint_study.py --out runs/fingerprint-study
"""

from __future__ import annotations

import argparse
import email
import itertools
import json
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml
from matplotlib.figure import Figure

from moge.interop.upcycle_run import upcycle_run
from moge.tools.fingerprint import Settings, compare_profiles, read_profile, z_normalise
from moge.training import train
from moge.training.checkpoint import CHECKPOINTS
from moge.training.config import config_from_dict

OTHER_DATA = str(Path(email.__file__).parent)  # any Python has it: a reproducible second corpus


def model_section(args, d_model: int | None = None) -> dict:
    """The decoder of every run: 24 layers of width 64 by default (--layers, --d-model)."""
    d = d_model or args.d_model
    # dense_hidden 4d = 4 slices of d: one slice per group, so upcycling is exact.
    return {"vocab_size": 256, "d_model": d, "n_layers": args.layers, "n_heads": 4, "n_kv_heads": 2,
            "qkv_bias": True, "max_seq_len": 64, "dense_hidden": 4 * d}  # fmt: skip


def moe_section(args) -> dict:
    return {"num_experts": 8, "num_groups": 4, "top_k": 4, "expert_hidden": args.d_model,
            "learned_expert_scale": True, "aux_loss_coef": 0.001}  # fmt: skip


ROWS = ("q", "k", "v", "o", "q_bias", "k_bias", "v_bias", "attn_norm", "qkvo")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/fingerprint-study")
    p.add_argument("--steps", type=int, default=250, help="training steps of every run")
    p.add_argument("--layers", type=int, default=24, help="depth of every model")
    p.add_argument("--d-model", type=int, default=64, dest="d_model", help="width (the wide stranger: 1.5x)")
    p.add_argument("--checkpoints", type=int, default=5, help="child checkpoints after step 0")
    p.add_argument("--long-steps", type=int, default=600, dest="long_steps",
                   help="steps of a second child trained at a constant learning rate (0: none)")  # fmt: skip
    p.add_argument("--permutations", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--reuse", action="store_true", help="keep finished runs in --out, only fingerprint")
    return p.parse_args(argv)


def wide_name(args) -> str:
    return f"wide{args.d_model * 3 // 2}-seed4"


def run_config(name: str, out: Path, args, *, seed: int, data: str | None, dense: bool, wide=False) -> dict:
    m = model_section(args, args.d_model * 3 // 2 if wide else None)
    if dense:
        m["first_dense_layers"] = m["n_layers"]
    return {
        "name": name,
        "model": m,
        "moe": moe_section(args),
        "data": {"path": data, "seq_len": 64},
        "train": {"steps": args.steps, "batch_size": 8, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 25,
                  "log_every": 50, "eval_every": 0, "eval_batches": 4, "save_every": 0, "keep_last": 1,
                  "seed": seed, "threads": args.threads, "out_dir": str(out / name)},
        "monitor": {"every": 0},
    }  # fmt: skip


def train_runs(args) -> dict[str, float]:
    """Train every run into --out (skipping finished ones with --reuse); returns seconds per run."""
    out = Path(args.out)
    strangers = {
        "seed2-same-data": dict(seed=2, data=None, dense=True),
        "seed3-other-data": dict(seed=3, data=OTHER_DATA, dense=True),
        wide_name(args): dict(seed=4, data=None, dense=True, wide=True),
        "moge-scratch-other-data": dict(seed=5, data=OTHER_DATA, dense=False),
    }
    timings = {}

    def timed(name, fn):
        if args.reuse and (out / name / CHECKPOINTS / "LATEST").exists():
            return
        t0 = time.perf_counter()
        fn()
        timings[name] = time.perf_counter() - t0
        print(f"{name}: {timings[name]:.0f} s", flush=True)

    timed("parent", lambda: train(config_from_dict(run_config("parent", out, args, seed=1, data=None, dense=True)),
                                  progress=False))  # fmt: skip

    def child(name: str, steps: int, constant_lr: bool) -> None:
        raw = run_config(name, out, args, seed=1, data=OTHER_DATA, dense=False)
        raw["train"].update(
            steps=steps, save_every=max(steps // args.checkpoints, 1), keep_last=args.checkpoints + 2
        )
        if constant_lr:  # no decay: how fast the fingerprint fades while the weights keep moving
            raw["train"]["min_lr"] = raw["train"]["lr"]
        raw["model"] = {}  # the decoder comes from the parent; every block becomes MoE
        (out / f"{name}.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
        shutil.rmtree(out / name, ignore_errors=True)
        up = upcycle_run(out / "parent", out / name, out / f"{name}.yaml")
        print(f"upcycled: {up.plan.describe()}; step-0 max |logit diff| {up.max_abs_diff:.2g}", flush=True)
        cfg = config_from_dict(yaml.safe_load((out / name / "config.yaml").read_text()))
        train(cfg, progress=False)

    timed("child", lambda: child("child", args.steps, constant_lr=False))
    if args.long_steps:
        timed("child-long", lambda: child("child-long", args.long_steps, constant_lr=True))
    for name, kw in strangers.items():
        timed(name, lambda name=name, kw=kw: train(config_from_dict(run_config(name, out, args, **kw)),
                                                   progress=False))  # fmt: skip
    return timings


def _row_dict(rows) -> dict:
    return {r.signal: {"r": r.r, "p": r.p, "ci": r.ci, "r_diff": r.r_diff, "note": r.note} for r in rows}


def fingerprint_all(args) -> dict:
    out = Path(args.out)
    settings = Settings(permutations=args.permutations, bootstrap=1000, seed=0)
    finals = [
        "parent",
        "child",
        "seed2-same-data",
        "seed3-other-data",
        wide_name(args),
        "moge-scratch-other-data",
    ]
    profiles = {name: read_profile(out / name, name) for name in finals}
    pairs = {}
    for a, b in itertools.combinations(finals, 2):
        pairs[f"{a} vs {b}"] = _row_dict(compare_profiles(profiles[a], profiles[b], settings))

    def lineage(name: str) -> dict:
        steps = sorted(int(p.name.split("_")[1]) for p in (out / name / CHECKPOINTS).glob("step_*"))
        rows = {}
        for step in steps:
            prof = read_profile(out / name / CHECKPOINTS / f"step_{step:08d}", f"{name}@{step}")
            rows[step] = _row_dict(compare_profiles(profiles["parent"], prof, settings))
        return rows

    res = {
        "profiles": {k: v.values for k, v in profiles.items()},
        "pairs": pairs,
        "lineage": lineage("child"),
    }
    res["lineage_long"] = lineage("child-long") if args.long_steps else {}
    return res


def _fmt(cell: dict) -> str:
    if cell["r"] is None:
        return "undef."
    return f"{cell['r']:+.2f} ({cell['p']:.4f})" if cell["p"] is not None else f"{cell['r']:+.2f}"


def summary(res: dict) -> str:
    """The compact table of the README: the combined rows, every pair, the lineage first."""
    lines = [
        "| pair | qkvo r (p) | qkvo 95% CI | qkvo r(diff) | qkv_bias r (p) | attn_norm r (p) |",
        "|---|---|---|---|---|---|",
    ]
    rows = [(f"parent vs child@{step}", r) for step, r in res["lineage"].items()]
    rows += [(f"parent vs child-long@{step}", r) for step, r in res["lineage_long"].items()]
    rows += [(pair, r) for pair, r in res["pairs"].items() if pair != "parent vs child"]
    for pair, r in rows:
        q = r["qkvo"]
        ci = f"[{q['ci'][0]:+.2f}, {q['ci'][1]:+.2f}]" if q["ci"] else "-"
        rd = f"{q['r_diff']:+.2f}" if q["r_diff"] is not None else "undef."
        lines.append(f"| {pair} | {_fmt(q)} | {ci} | {rd} | {_fmt(r['qkv_bias'])} | {_fmt(r['attn_norm'])} |")
    return "\n".join(lines)


def tables(res: dict) -> str:
    head = "| pair | " + " | ".join(ROWS) + " | r(diff) qkvo |\n|---|" + "---|" * (len(ROWS) + 1)
    lines = [
        f"Final models, every pair: r (one-sided permutation p, {res['permutations']} shuffles of the layers).",
        "",
        head,
    ]
    for pair, rows in res["pairs"].items():
        rd = rows["qkvo"]["r_diff"]
        lines.append(f"| {pair} | " + " | ".join(_fmt(rows[s]) for s in ROWS) + f" | {rd:+.2f} |")
    for key, child in (("lineage", "child"), ("lineage_long", "child-long")):
        if not res[key]:
            continue
        lines += ["", f"Parent vs {child} as its training continues (step 0: the upcycled copy).", "", head]
        for step, rows in res[key].items():
            rd = rows["qkvo"]["r_diff"]
            rd_text = f"{rd:+.2f}" if rd is not None else "undef."
            lines.append(
                f"| parent vs {child}@{step} | " + " | ".join(_fmt(rows[s]) for s in ROWS) + f" | {rd_text} |"
            )
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    ax_p, ax_l = fig.subplots(1, 2)
    for name, values in res["profiles"].items():
        z = z_normalise(values["q"])
        if z is not None:
            style = "-" if name in ("parent", "child") else ":"
            ax_p.plot(range(len(z)), z, style, marker=".", ms=3, lw=1.3, label=name)
    ax_p.set_title("q_proj weight std per layer (z-normalised)", fontsize=10)
    ax_p.set_xlabel("layer")
    ax_p.legend(fontsize=7)
    steps = [int(s) for s in res["lineage"]]
    for signal, marker in (("qkvo", "o"), ("qkv_bias", "s"), ("attn_norm", "^")):
        ys = [res["lineage"][s][signal]["r"] for s in res["lineage"]]
        ax_l.plot(
            steps,
            [float("nan") if y is None else y for y in ys],
            marker=marker,
            label=f"parent vs child: {signal}",
        )
    if res["lineage_long"]:
        long_steps = [int(s) for s in res["lineage_long"]]
        ys = [res["lineage_long"][s]["qkvo"]["r"] for s in res["lineage_long"]]
        ax_l.plot(long_steps, [float("nan") if y is None else y for y in ys], marker="D", ms=4,
                  label="parent vs child-long (constant lr): qkvo")  # fmt: skip
    unrelated = [rows["qkvo"]["r"] for pair, rows in res["pairs"].items()
                 if pair != "parent vs child" and rows["qkvo"]["r"] is not None]  # fmt: skip
    if unrelated:
        ax_l.axhspan(
            min(unrelated), max(unrelated), color="grey", alpha=0.25, label="qkvo r, unrelated pairs (range)"
        )
    diffs = [res["lineage"][s]["qkvo"]["r_diff"] for s in res["lineage"]]
    ax_l.plot(steps, [float("nan") if d is None else d for d in diffs], "k--", marker="x",
              label="parent vs child: qkvo r(diff)")  # fmt: skip
    unrelated_diff = [rows["qkvo"]["r_diff"] for pair, rows in res["pairs"].items()
                      if pair != "parent vs child" and rows["qkvo"]["r_diff"] is not None]  # fmt: skip
    if unrelated_diff:
        ax_l.axhline(
            max(unrelated_diff), color="k", lw=0.8, ls=":", label="qkvo r(diff), unrelated pairs (max)"
        )
    ax_l.set_xlabel("child training step (on other data)")
    ax_l.set_ylabel("Pearson r")
    ax_l.set_title("does the parent's fingerprint fade in the child?", fontsize=10)
    ax_l.legend(fontsize=7)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    if out.exists() and not (args.force or args.reuse):
        sys.exit(f"error: {out} exists; pass --force to replace it or --reuse to keep finished runs")
    if args.force:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    timings = train_runs(args)
    res = fingerprint_all(args)
    res["timings_s"], res["permutations"] = timings, args.permutations
    (out / "study.json").write_text(json.dumps(res, indent=1, default=str) + "\n", encoding="utf-8")
    text = summary(res) + "\n\n" + tables(res)
    (out / "study.md").write_text(text + "\n", encoding="utf-8")
    plot(res, out / "fingerprint_study.png")
    print(text)
    print(f"wrote {out / 'study.json'}, {out / 'study.md'}, {out / 'fingerprint_study.png'}")


if __name__ == "__main__":
    main()
