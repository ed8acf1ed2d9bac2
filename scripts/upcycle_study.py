"""Upcycled vs from-scratch MoGE at equal steps (README "Upcycling a dense model").

    python scripts/upcycle_study.py [--config configs/tiny-upcycle.yaml] [--steps N] ...

1. trains the config's decoder with every FFN dense (model.first_dense_layers = n_layers)
   for --dense-steps steps;
2. upcycles it (`moge upcycle`: exact at step 0) and trains the MoGE model on for --steps;
3. trains the same MoGE model from scratch for --steps, with the same data order;
4. trains the dense model on for --steps (fresh optimiser and schedule, as the upcycled
   run gets): does the upcycled model beat simply training the dense one longer?
5. writes the loss curves (--image, PNG) and a table of figures (--table, Markdown) and
   prints the table. Runs go under --out (replaced if --force).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure

from moge.interop.upcycle_run import upcycle_run, write_start_checkpoint
from moge.model import count_parameters, format_params
from moge.training import train
from moge.training.checkpoint import load_run
from moge.training.config import load_config
from moge.training.data import load_dataset
from moge.training.metrics import METRICS, validation_loss

ROOT = Path(__file__).resolve().parents[1]
RUNS = ("dense", "upcycled", "scratch", "dense-continued")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "tiny-upcycle.yaml"))
    p.add_argument("--dense-steps", type=int, default=400, help="steps of the dense model")
    p.add_argument("--steps", type=int, default=None, help="steps of both MoGE runs (default: train.steps)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (train.threads)")
    p.add_argument("--out", default="runs/upcycle-study", help="folder of the three runs")
    p.add_argument("--image", default=str(ROOT / "docs" / "images" / "upcycle_curves.png"))
    p.add_argument("--table", default=str(ROOT / "docs" / "upcycle_study.md"))
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    return p.parse_args(argv)


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / METRICS).read_text(encoding="utf-8").splitlines()]


def series(records: list[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    rows = [(r["step"], r[key]) for r in records if r.get("type") == kind]
    return [s for s, _ in rows], [v for _, v in rows]


def smooth(values: list[float], window: int = 20) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def val_loss_of(run: Path) -> float:
    """Validation loss of a run's newest checkpoint, measured as the trainer measures it."""
    model, cfg, _ = load_run(run)
    return validation_loss(model, load_dataset(cfg.data), cfg.train.batch_size, cfg.train.eval_batches)


def run_all(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    if out.exists():
        if not args.force:
            sys.exit(f"error: {out} exists; pass --force to replace it")
        shutil.rmtree(out)
    common = [f"train.threads={args.threads}"] + ([f"train.steps={args.steps}"] if args.steps else [])
    n_layers = load_config(args.config).model.n_layers
    dense_over = [f"model.first_dense_layers={n_layers}", f"train.steps={args.dense_steps}",
                  f"train.threads={args.threads}", f"train.out_dir={out / 'dense'}", "name=dense"]  # fmt: skip
    timings = {}
    t0 = time.perf_counter()
    train(load_config(args.config, dense_over), progress=False)
    timings["dense"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    up = upcycle_run(out / "dense", out / "upcycled", args.config, [*common, "name=upcycled"])
    timings["upcycle"] = time.perf_counter() - t0
    step0_val = val_loss_of(out / "upcycled")
    t0 = time.perf_counter()
    train(load_config(out / "upcycled" / "config.yaml"), progress=False)
    timings["upcycled"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    train(
        load_config(args.config, [*common, f"train.out_dir={out / 'scratch'}", "name=scratch"]),
        progress=False,
    )
    timings["scratch"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cont = out / "dense-continued"
    cont_over = [
        *dense_over[:1],
        *common,
        f"train.out_dir={cont}",
        "train.resume=true",
        "name=dense-continued",
    ]
    cont_cfg = load_config(args.config, cont_over)
    write_start_checkpoint(load_run(out / "dense")[0], cont_cfg, cont)
    train(load_config(cont / "config.yaml"), progress=False)
    timings["dense-continued"] = time.perf_counter() - t0
    return {"out": out, "upcycle": up, "step0_val": step0_val, "timings": timings}


def figures(args: argparse.Namespace, res: dict) -> dict:
    out = res["out"]
    runs = {name: read_metrics(out / name) for name in RUNS}
    cfg = load_config(out / "upcycled" / "config.yaml")
    dense_cfg = load_config(out / "dense" / "config.yaml")
    fig = {
        "moe_steps": cfg.train.steps,
        "dense_steps": dense_cfg.train.steps,
        "tokens_per_step": cfg.train.batch_size * cfg.data.seq_len,
        "params": {
            "dense": count_parameters(dense_cfg.model, dense_cfg.moe).total,
            "moge": count_parameters(cfg.model, cfg.moe).total,
            "moge_activated": count_parameters(cfg.model, cfg.moe).activated,
        },
        "step0_max_abs_logit_diff": res["upcycle"].max_abs_diff,
        "dense_final_val": series(runs["dense"], "eval", "val_loss")[1][-1],
        "upcycled_step0_val": res["step0_val"],
        "timings_s": {k: round(v, 1) for k, v in res["timings"].items()},
    }
    for name in ("upcycled", "scratch", "dense-continued"):
        steps, vals = series(runs[name], "eval", "val_loss")
        fig[f"{name}_val"] = dict(zip(steps, vals))
        last = series(runs[name], "train", "lm_loss")[1][-25:]
        fig[f"{name}_final_train_lm"] = sum(last) / len(last)
    # Steps the scratch run needs to reach the upcycled run's validation loss at each point.
    scratch_val = fig["scratch_val"]
    target = fig["upcycled_val"][min(fig["upcycled_val"])]
    fig["scratch_first_step_at_or_below_upcycled_first_eval"] = next(
        (s for s, v in sorted(scratch_val.items()) if v <= target), None
    )
    final = fig["scratch_val"][max(scratch_val)]
    fig["upcycled_first_step_at_or_below_scratch_final"] = next(
        (s for s, v in sorted(fig["upcycled_val"].items()) if v <= final), None
    )
    return fig


def plot(args: argparse.Namespace, res: dict, fig_data: dict) -> None:
    out = res["out"]
    runs = {name: read_metrics(out / name) for name in RUNS}
    D = fig_data["dense_steps"]
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    colours = {"dense": "0.5", "upcycled": "tab:blue", "scratch": "tab:orange", "dense-continued": "0.35"}
    labels = {"dense": "dense (pre-training)", "upcycled": "MoGE upcycled from the dense model",
              "scratch": "MoGE from scratch", "dense-continued": "dense trained on"}  # fmt: skip
    for name, recs in runs.items():
        shift = -D if name == "dense" else 0
        steps, lm = series(recs, "train", "lm_loss")
        style = ":" if name == "dense-continued" else "-"
        ax.plot([s + shift for s in steps], smooth(lm), style, color=colours[name], lw=1.2,
                label=f"{labels[name]}: train")  # fmt: skip
        vsteps, vals = series(recs, "eval", "val_loss")
        ax.plot([s + shift for s in vsteps], vals, "o--", color=colours[name], ms=4, lw=0.8,
                label=f"{labels[name]}: validation")  # fmt: skip
    ax.plot([0], [fig_data["upcycled_step0_val"]], "*", color=colours["upcycled"], ms=11,
            label="upcycled at step 0 (validation)")  # fmt: skip
    ax.axvline(0, color="0.8", lw=0.8)
    ax.set_xlabel(f"MoGE training step (the dense model's {D} steps to the left of 0)")
    ax.set_ylabel("LM loss (nats per byte)")
    ax.set_ylim(top=min(4.0, ax.get_ylim()[1]))
    ax.set_title("Upcycled vs from-scratch MoGE at equal steps (tiny-upcycle, CPU)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5)
    fig.tight_layout()
    Path(args.image).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.image, dpi=110)


def table(fig: dict) -> str:
    up, sc, dc = fig["upcycled_val"], fig["scratch_val"], fig["dense-continued_val"]
    rows = [
        "Validation loss (nats per byte) after each number of steps. The upcycled MoGE model and the "
        f"dense model trained on start from the dense model's {fig['dense_steps']} steps, the MoGE model "
        "from scratch from random weights; all three see the same batches, optimiser settings and schedule.",
        "",
        "| step | upcycled MoGE | MoGE from scratch | dense trained on |",
        "|---:|---:|---:|---:|",
        f"| 0 | {fig['upcycled_step0_val']:.4f} | - | {fig['dense_final_val']:.4f} |",
    ]
    for s in sorted(up):
        rows.append(f"| {s} | {up[s]:.4f} | {sc[s]:.4f} | {dc[s]:.4f} |")
    t, p = fig["timings_s"], fig["params"]
    at = fig["scratch_first_step_at_or_below_upcycled_first_eval"]
    first = min(up)
    reach = f"step {at}" if at is not None else f"never within {fig['moe_steps']} steps"
    notes = [
        "",
        f"Dense model: {format_params(p['dense'])} parameters, {fig['dense_steps']} steps; MoGE: "
        f"{format_params(p['moge'])} parameters ({format_params(p['moge_activated'])} activated), "
        f"{fig['moe_steps']} steps of {fig['tokens_per_step']} tokens for each run.",
        f"Step-0 check: max |upcycled - dense logits| = {fig['step0_max_abs_logit_diff']:.2g}.",
        f"From scratch reaches the upcycled run's step-{first} validation loss ({up[first]:.4f}) at: {reach}.",
        f"The upcycled run reaches the from-scratch run's final validation loss "
        f"({sc[max(sc)]:.4f}) at: step {fig['upcycled_first_step_at_or_below_scratch_final']}.",
        f"Final train LM loss (mean of the last 25 steps): upcycled {fig['upcycled_final_train_lm']:.4f}, "
        f"from scratch {fig['scratch_final_train_lm']:.4f}, dense trained on "
        f"{fig['dense-continued_final_train_lm']:.4f}.",
        f"Wall time (s): dense {t['dense']}, upcycle {t['upcycle']}, upcycled {t['upcycled']}, "
        f"scratch {t['scratch']}, dense trained on {t['dense-continued']}.",
    ]
    return "\n".join(rows + notes[:1] + [f"- {n}" for n in notes[1:]]) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    res = run_all(args)
    fig = figures(args, res)
    plot(args, res, fig)
    text = table(fig)
    Path(args.table).write_text(
        f"<!-- written by scripts/upcycle_study.py ({' '.join(sys.argv[1:]) or 'defaults'}) -->\n\n" + text,
        encoding="utf-8",
    )
    (res["out"] / "figures.json").write_text(json.dumps(fig, indent=1, default=str) + "\n", encoding="utf-8")
    print(text)
    print(f"curves: {args.image}; table: {args.table}")


if __name__ == "__main__":
    main()
