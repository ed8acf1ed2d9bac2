"""Evaluate trained runs: validation loss, routing balance, plots, and run-vs-run tables.

Legend: B batch, L sequence length, T tokens, E experts, K experts per token, M groups.

`evaluate_run(run_dir)` writes, into the run directory (or `out_dir`):
- report.json: `val_loss` (mean token NLL, nats), `val_ppl`, `val_bpb` (bits per byte; None
  for a uint16 .bin corpus, whose bytes per token are unknown), `val_bits_per_token`, the
  unigram entropy of the val split (bits/token, the bar a context-free model reaches),
  params, and one routing entry per MoE layer: load per expert and per group, the
  Imbalance Score (Eq. 3, one group per device) over the whole eval set and per eval
  batch, max/mean, CV, load and score entropies (nats), dead experts, and the expert
  co-occurrence matrix: C[i][j] = tokens that chose both i and j, divided by the eval
  tokens (symmetric, zero diagonal, row i sums to (K - 1) * load_i / tokens), with its
  10 most frequent pairs.
- routing_trace.safetensors: the eval set's expert_ids [T, K] int64 per MoE layer, keys
  "layer_<i>" with i the block index (depth), plus string metadata (num_experts,
  num_groups, top_k, router, layers, batch_tokens: tokens of each eval batch, in order).
- training_curve.png, expert_load_heatmap.png, imbalance_per_layer.png (if cfg.eval.plots;
  a dense model, without MoE layers, gets the training curve only).
`compare_runs(run_dirs)` writes comparison.json, comparison.txt and comparison.png into
`out_dir`, by default `<parent of the first run>/compare-<name1>-vs-<name2>...`.

The model and config come from the newest checkpoint (`moge.training.checkpoint.load_run`).
Evaluation runs in float32 (no autocast) on the validation split's fixed windows with
cfg.eval's sizes, so numbers compare across runs trained on the same data config (the
trainer's periodic val_loss uses train.batch_size and train.eval_batches instead).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from moge import balance
from moge._validate import check_int
from moge.layer import MoGEOutput
from moge.model import count_parameters, format_params
from moge.sigma.data import check_dataset_domains
from moge.training.checkpoint import load_run
from moge.training.data import load_dataset, unigram_entropy_bits

REPORT_NAME = "report.json"
TRACE_NAME = "routing_trace.safetensors"
METRICS_NAME = "metrics.jsonl"
PLOT_NAMES = ("training_curve.png", "expert_load_heatmap.png", "imbalance_per_layer.png")
TOP_PAIRS = 10


# ---------------------------------------------------------------- run directory


def _check_run_dir(run_dir: str | Path) -> Path:
    """The run directory as a Path, after checking the files evaluation needs exist."""
    path = Path(run_dir)
    if not path.exists():
        raise FileNotFoundError(f"run directory not found: {path}")
    if not path.is_dir():
        raise ValueError(f"{path}: not a directory (expected a run directory written by `moge train`)")
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(f"{path / 'config.yaml'}: not found; {path} is not a run directory")
    if not (path / "checkpoints" / "LATEST").is_file():
        raise FileNotFoundError(f"{path / 'checkpoints' / 'LATEST'}: not found; {path} has no checkpoint yet")
    if not (path / METRICS_NAME).is_file():
        raise FileNotFoundError(f"{path / METRICS_NAME}: not found; {path} has no training metrics")
    return path


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of `<run_dir>/metrics.jsonl` in file order (blank lines skipped)."""
    path = Path(run_dir) / METRICS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; {run_dir} has no training metrics")
    records = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}); the log is damaged") from None
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not a JSON line: {err}") from err
        if not isinstance(record, dict) or "step" not in record:
            raise ValueError(f"{path}:{n}: expected an object with a 'step', got {line[:80]!r}")
        records.append(record)
    return records


def _train_summary(records: Sequence[dict]) -> dict:
    """Last logged losses and the median throughput (robust to a slow first step)."""
    train = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval" and "val_loss" in r]
    speeds = sorted(r["tokens_per_s"] for r in train if r.get("tokens_per_s") is not None)
    last = train[-1] if train else {}
    return {
        "last_step": last.get("step"),
        "last_loss": last.get("loss"),
        "last_lm_loss": last.get("lm_loss"),
        "last_val_loss": evals[-1]["val_loss"] if evals else None,
        "tokens_per_s": speeds[len(speeds) // 2] if speeds else None,
    }


# ---------------------------------------------------------------- routing statistics


def cooccurrence_counts(ids_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """C[i, j] = tokens that chose both expert i and expert j (i != j); diagonal 0.

    ids_TK [T, K] with distinct experts per token -> [E, E] float64, symmetric, and
    row i sums to (K - 1) * load_i.
    """
    onehot_TE = torch.zeros(ids_TK.shape[0], num_experts, dtype=torch.float64)
    onehot_TE.scatter_(1, ids_TK.long().cpu(), 1.0)
    counts_EE = torch.einsum("te,tf->ef", onehot_TE, onehot_TE)
    return counts_EE.fill_diagonal_(0.0)


def top_pairs(cooc_EE: torch.Tensor, experts_per_group: int, n: int = TOP_PAIRS) -> list[dict]:
    """The n most frequent expert pairs (i < j) of a co-occurrence matrix, most frequent first."""
    rows, cols = cooc_EE.shape
    i_P, j_P = torch.triu_indices(rows, cols, offset=1)
    values_P = cooc_EE[i_P, j_P]
    order = torch.sort(values_P, descending=True, stable=True).indices[:n]
    return [
        {
            "experts": [int(i_P[p]), int(j_P[p])],
            "rate": float(values_P[p]),
            "same_group": int(i_P[p]) // experts_per_group == int(j_P[p]) // experts_per_group,
        }
        for p in order.tolist()
    ]


class _LayerRouting:
    """One MoE layer's routing summed over eval batches."""

    def __init__(self, layer: int, num_experts: int, num_groups: int) -> None:
        self.layer, self.E, self.M = layer, num_experts, num_groups
        self.ids: list[torch.Tensor] = []  # [T_b, K] per batch
        self.cooc_EE = torch.zeros(num_experts, num_experts, dtype=torch.float64)
        self.batch_is: list[float] = []
        self.score_entropy_sum = 0.0  # per-token score entropy, summed over tokens

    def add(self, routed: MoGEOutput) -> None:
        ids_TK = routed.expert_ids.detach().cpu()
        stats = balance.routing_stats(ids_TK, self.E, self.M, routed.scores.detach())
        self.ids.append(ids_TK)
        self.cooc_EE += cooccurrence_counts(ids_TK, self.E)
        self.batch_is.append(stats.imbalance_score)
        self.score_entropy_sum += (stats.score_entropy or 0.0) * ids_TK.shape[0]

    def all_ids(self) -> torch.Tensor:
        return torch.cat(self.ids)

    def report(self) -> dict:
        ids_TK = self.all_ids()
        T = ids_TK.shape[0]
        stats = balance.routing_stats(ids_TK, self.E, self.M)
        cooc_EE = self.cooc_EE / T  # pairs per token
        return {
            "layer": self.layer,
            "tokens": T,
            "imbalance_score": stats.imbalance_score,
            "imbalance_score_batch_mean": sum(self.batch_is) / len(self.batch_is),
            "imbalance_score_batch_max": max(self.batch_is),
            "max_over_mean": stats.max_over_mean,
            "cv": stats.cv,
            "load_entropy": stats.load_entropy,
            "load_entropy_max": math.log(self.E),
            "score_entropy": self.score_entropy_sum / T,
            "dead_experts": stats.dead_experts,
            "expert_load": stats.expert_load.tolist(),
            "group_load": stats.group_load.tolist(),
            "cooccurrence": cooc_EE.tolist(),
            "top_pairs": top_pairs(cooc_EE, self.E // self.M),
        }


# ---------------------------------------------------------------- measuring


def loss_summary(val_loss: float, byte_level: bool) -> dict:
    """The report's leading keys: val_loss, val_ppl, val_bpb, val_bits_per_token.

    A byte-level token is one byte, so bits per byte = bits per token = loss / ln 2;
    for a .bin corpus the bytes behind a token are unknown and val_bpb is None.
    """
    bits = val_loss / math.log(2)
    try:
        ppl = math.exp(val_loss)
    except OverflowError:
        ppl = math.inf
    return {
        "val_loss": val_loss,
        "val_ppl": ppl,
        "val_bpb": bits if byte_level else None,
        "val_bits_per_token": bits,
    }


@torch.no_grad()
def _measure(
    model, ds, cfg, batches: int, device: torch.device
) -> tuple[float, list[int], list[_LayerRouting]]:
    """Token-weighted mean NLL over the eval batches, tokens per batch, routing per layer."""
    moe_blocks = [i for i in range(cfg.model.n_layers) if cfg.model.is_moe_layer(i)]
    layers = [_LayerRouting(i, cfg.moe.num_experts, cfg.moe.num_groups) for i in moe_blocks]
    nll_sum, batch_tokens = 0.0, []
    for batch in ds.iter_eval_batches("val", cfg.eval.batch_size, batches):
        x_BL, y_BL = batch
        out = model(x_BL.to(device), y_BL.to(device), **batch.model_kwargs(device))
        nll_sum += float(out.lm_loss) * y_BL.numel()  # lm_loss is the mean over this batch
        batch_tokens.append(y_BL.numel())
        assert len(out.routing) == len(layers), "one MoGEOutput per MoE block"
        for acc, routed in zip(layers, out.routing):
            acc.add(routed)
    return nll_sum / sum(batch_tokens), batch_tokens, layers


def _save_trace(path: Path, layers: list[_LayerRouting], cfg, batch_tokens: list[int], step: int) -> None:
    tensors = {f"layer_{acc.layer}": acc.all_ids().to(torch.int64).contiguous() for acc in layers}
    metadata = {
        "num_experts": str(cfg.moe.num_experts),
        "num_groups": str(cfg.moe.num_groups),
        "top_k": str(cfg.moe.top_k),
        "router": cfg.moe.router,
        "layers": ",".join(str(acc.layer) for acc in layers),
        "batch_tokens": ",".join(str(n) for n in batch_tokens),
        "seq_len": str(cfg.data.seq_len),
        "step": str(step),
    }
    save_file(tensors, str(path), metadata=metadata)
    # safetensors creates the file mode 600 whatever the umask; give it the mode every
    # other file of the run has (666 minus the umask, usually 644).
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _write_plots(report: dict, records: list[dict], out_dir: Path) -> list[str]:
    from moge.tools import plots  # matplotlib is slow to import; only pay for it when drawing

    curve, heatmap, imbalance = (out_dir / name for name in PLOT_NAMES)
    plots.plot_training_curve(records, curve, title=f"{report['name']}: training curve")
    if not report["routing"]:  # a dense model (every block dense): no routing to draw
        return [str(curve)]
    plots.plot_expert_load_heatmap(report, heatmap)
    plots.plot_imbalance_per_layer(report, imbalance)
    return [str(p) for p in (curve, heatmap, imbalance)]


def evaluate_run(
    run_dir: str | Path,
    batches: int | None = None,
    *,
    out_dir: str | Path | None = None,
    plots: bool | None = None,
    device: str = "cpu",
    knockout: int | None = None,
) -> dict:
    """Measure a run's newest checkpoint on the val split; write report, trace and plots.

    batches: eval batches (default cfg.eval.batches) of cfg.eval.batch_size sequences.
    out_dir: where the files go (default: the run directory). plots: draw the PNGs
    (default cfg.eval.plots). device: where the model runs. knockout: also run the expert
    knock-out (moge.diagnostics.knockout) on this many val batches, into
    report["knockout"] and knockout.png. Returns the report dict.
    """
    if batches is not None:
        check_int("batches", batches, minimum=1)
    if knockout is not None:
        check_int("knockout", knockout, minimum=1)
    from moge.interop import from_pretrained, is_layout_folder  # a layout folder: weights only

    if is_layout_folder(run_dir):
        path, records, step = Path(run_dir), [], 0
        model, cfg = from_pretrained(path)
    else:
        path = _check_run_dir(run_dir)
        records = read_metrics(path)
        model, cfg, step = load_run(path, map_location="cpu")
    model = model.to(device).eval()
    ds = load_dataset(cfg.data)
    # data.domains: subfolders reads the domains from the folder now: one gone or added
    # shifts the ids, which would route sequences to another domain's experts.
    check_dataset_domains(ds, cfg.moe)
    n_batches = batches if batches is not None else cfg.eval.batches
    val_loss, batch_tokens, layers = _measure(model, ds, cfg, n_batches, torch.device(device))
    params = count_parameters(cfg.model, cfg.moe)
    out = Path(out_dir) if out_dir is not None else path
    out.mkdir(parents=True, exist_ok=True)
    report = {
        **loss_summary(val_loss, byte_level=ds.val.dtype == torch.uint8),
        "unigram_entropy_bits": unigram_entropy_bits(ds.val),
        "tokenizer": "bytes" if ds.val.dtype == torch.uint8 else "uint16 .bin",
        "name": cfg.name,
        "run_dir": str(path),
        "step": step,
        "params": {"total": params.total, "activated": params.activated},
        "eval": {
            "split": "val",
            "batches": len(batch_tokens),
            "batch_size": cfg.eval.batch_size,
            "seq_len": cfg.data.seq_len,
            "tokens": sum(batch_tokens),
        },  # fmt: skip
        "moe": {
            "router": cfg.moe.router,
            "num_experts": cfg.moe.num_experts,
            "num_groups": cfg.moe.num_groups,
            "top_k": cfg.moe.top_k,
        },  # fmt: skip
        "train": _train_summary(records),
        "routing": [acc.report() for acc in layers],
    }
    report["collapse"] = collapse_summary(records)
    if knockout is not None:
        report["knockout"] = _knockout(model, ds, cfg, knockout, [acc.layer for acc in layers])
    _save_trace(out / TRACE_NAME, layers, cfg, batch_tokens, step)
    report["files"] = {"report": str(out / REPORT_NAME), "trace": str(out / TRACE_NAME), "plots": []}
    if cfg.eval.plots if plots is None else plots:
        report["files"]["plots"] = _write_plots(report, records, out)
        if knockout is not None:
            report["files"]["plots"].append(_plot_knockout(report["knockout"], out))
    (out / REPORT_NAME).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return report


# ---------------------------------------------------------------- inside the router


def collapse_summary(records: Sequence[dict]) -> dict | None:
    """The last collapse-monitor record of a run's metrics and every warning it logged.

    None for a run trained without the monitor (moge.diagnostics.collapse).
    """
    checks = [r for r in records if r.get("type") == "collapse"]
    if not checks:
        return None
    warnings = [f"step {r['step']}: {w}" for r in checks for w in r.get("warnings", [])]
    return {"step": checks[-1]["step"], "layers": checks[-1]["layers"], "warnings": warnings}


def _knockout(model, ds, cfg, batches: int, layer_ids: list[int]) -> dict:
    from moge.diagnostics.knockout import knockout_sweep

    data = list(ds.iter_eval_batches("val", cfg.eval.batch_size, batches))
    return knockout_sweep(model, data, layer_ids)


def _plot_knockout(knockout: dict, out_dir: Path) -> str:
    from moge.diagnostics.knockout import plot_knockout

    path = out_dir / "knockout.png"
    plot_knockout(knockout, path)
    return str(path)


def format_inside(report: dict) -> str:
    """The collapse monitor's last check and the knock-out table, when the report has them."""
    lines = []
    collapse = report.get("collapse")
    if collapse:
        lines.append(
            f"collapse monitor at step {collapse['step']} ({len(collapse['warnings'])} warnings in training):"
        )
        lines.append(
            f"{'layer':>5} {'eff.experts':>11} {'loadH':>6} {'scoreH':>6} {'logit rms':>9} {'growth':>6} {'dead':>4}"
        )
        for r in collapse["layers"]:
            lines.append(
                f"{r['layer']:>5} {r['effective_experts']:>11.2f} {r['load_entropy']:>6.3f} {r['score_entropy']:>6.3f} "
                f"{r['logit_rms']:>9.3f} {r['logit_growth']:>6.2f} {r['dead_experts']:>4}"
            )
        lines += [f"  warning at {w}" for w in collapse["warnings"][-5:]]
    if report.get("knockout"):
        from moge.diagnostics.knockout import format_knockout

        lines.append(format_knockout(report["knockout"]))
    return "\n".join(lines)


# ---------------------------------------------------------------- text output


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def format_report(report: dict) -> str:
    """A short terminal summary: losses, params, then one routing line per MoE layer."""
    p, ev, moe = report["params"], report["eval"], report["moe"]
    lines = [
        f"{report['name']} @ step {report['step']}  ({report['run_dir']})  "
        f"params {format_params(p['total'])} total, {format_params(p['activated'])} activated",
        f"val_loss {report['val_loss']:.4f} nats/token   val_ppl {report['val_ppl']:.3f}   "
        f"val_bpb {_fmt(report['val_bpb'], '.4f')}   val bits/token {report['val_bits_per_token']:.4f}   "
        f"unigram entropy {report['unigram_entropy_bits']:.3f} bits/token",
        f"eval: {ev['tokens']:,} tokens ({ev['batches']} batches of {ev['batch_size']} x {ev['seq_len']}); "
        f"router {moe['router']}, {moe['num_experts']} experts in {moe['num_groups']} groups, top-{moe['top_k']}",
        f"{'layer':>5} {'IS(set)':>8} {'IS(batch)':>9} {'max/mean':>8} {'cv':>6} "
        f"{'loadH/max':>9} {'scoreH':>6} {'dead':>4}  top pair",
    ]
    for r in report["routing"]:
        pair = r["top_pairs"][0] if r["top_pairs"] else None
        pair_text = f"{pair['experts'][0]}+{pair['experts'][1]} ({pair['rate']:.3f}/token)" if pair else "-"
        lines.append(
            f"{r['layer']:>5} {r['imbalance_score']:>8.4f} {r['imbalance_score_batch_mean']:>9.4f} "
            f"{r['max_over_mean']:>8.3f} {r['cv']:>6.3f} {r['load_entropy'] / r['load_entropy_max']:>9.3f} "
            f"{r['score_entropy']:>6.3f} {r['dead_experts']:>4}  {pair_text}"
        )
    inside = format_inside(report)
    return "\n".join(lines + ([inside] if inside else []))


# ---------------------------------------------------------------- comparing runs


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _over_layers(reduce, key: str):
    """A report's `key` of every MoE layer reduced to one value; None (n/a) for a dense
    model, which has no MoE layer."""
    return lambda r: reduce([x[key] for x in r["routing"]]) if r["routing"] else None


# (label, how to get the value from a report, format) per row of the comparison table.
_ROWS = (
    ("val_loss", lambda r: r["val_loss"], ".4f"),
    ("val_ppl", lambda r: r["val_ppl"], ".3f"),
    ("val_bpb", lambda r: r["val_bpb"], ".4f"),
    ("IS per batch (mean of layers)", _over_layers(_mean, "imbalance_score_batch_mean"), ".4f"),
    ("IS eval set (mean of layers)", _over_layers(_mean, "imbalance_score"), ".4f"),
    ("max/mean load (worst layer)", _over_layers(max, "max_over_mean"), ".3f"),
    ("dead experts (all layers)", _over_layers(sum, "dead_experts"), "d"),
    # Measured while training, so it says how busy the machine was, not only the router.
    ("train tokens/s (machine-load dependent)", lambda r: r["train"]["tokens_per_s"], ",.0f"),
    ("params total", lambda r: r["params"]["total"], "params"),
    ("params activated", lambda r: r["params"]["activated"], "params"),
)


def _cell(value, spec: str) -> str:
    if value is None:
        return "n/a"
    return format_params(value) if spec == "params" else format(value, spec)


def _run_names(run_dirs: Sequence[Path]) -> list[str]:
    names = [p.resolve().name for p in run_dirs]
    if len(set(names)) < len(names):  # same folder name under different parents
        names = [f"{n}-{i + 1}" for i, n in enumerate(names)]
    return names


def _table(names: Sequence[str], reports: Sequence[dict]) -> tuple[str, dict]:
    rows = {label: [get(r) for r in reports] for label, get, _ in _ROWS}
    width = max(len(label) for label, _, _ in _ROWS)
    col = max(12, *(len(n) for n in names))
    lines = [f"{'metric':<{width}}" + "".join(f"  {n:>{col}}" for n in names)]
    for label, _, spec in _ROWS:
        lines.append(f"{label:<{width}}" + "".join(f"  {_cell(v, spec):>{col}}" for v in rows[label]))
    return "\n".join(lines), rows


def _default_compare_dir(run_dirs: Sequence[Path], names: Sequence[str]) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", "-vs-".join(names))
    return run_dirs[0].resolve().parent / f"compare-{slug}"


def compare_runs(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path | None = None,
    *,
    batches: int | None = None,
    reports: Sequence[dict] | None = None,
) -> dict:
    """Put two or more runs side by side: a text table, comparison.png and comparison.json.

    reports: already computed `evaluate_run` reports of `run_dirs` (same order); without
    them every run is evaluated here (with `batches`). out_dir default:
    `<parent of the first run>/compare-<name1>-vs-<name2>...`. Returns what comparison.json holds.
    """
    from moge.tools import plots

    paths = [Path(d) for d in run_dirs]
    if len(paths) < 2:
        raise ValueError(f"run_dirs: comparing needs at least two runs, got {len(paths)}")
    if reports is None:
        reports = [evaluate_run(p, batches) for p in paths]
    elif len(reports) != len(paths):
        raise ValueError(f"reports: got {len(reports)} reports for {len(paths)} run directories")
    names = _run_names(paths)
    out = Path(out_dir) if out_dir is not None else _default_compare_dir(paths, names)
    out.mkdir(parents=True, exist_ok=True)
    table, rows = _table(names, reports)
    figure = plots.plot_comparison(names, [read_metrics(p) for p in paths], reports, out / "comparison.png")
    (out / "comparison.txt").write_text(table + "\n", encoding="utf-8")
    result = {
        "runs": names,
        "run_dirs": [str(p) for p in paths],
        "rows": rows,
        "table": table,
        "files": {
            "json": str(out / "comparison.json"),
            "table": str(out / "comparison.txt"),
            "figure": str(figure),
        },
        "out_dir": str(out),
    }
    (out / "comparison.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


# ---------------------------------------------------------------- CLI entry


def eval_command(
    run_dirs: list[str], batches: int | None = None, out: str | None = None, knockout: int | None = None
) -> None:
    """`moge eval RUN_DIR [RUN_DIR ...] [--batches N] [--out DIR]`.

    One run: evaluate it, print the report, write files into `out` (default: the run).
    Several: evaluate each (files into each run), print each, then compare into `out`.
    """
    if not run_dirs:
        raise ValueError("run_dirs: give at least one run directory")
    if len(run_dirs) == 1:
        report = evaluate_run(run_dirs[0], batches, out_dir=out, knockout=knockout)
        print(format_report(report))
        print(_files_line(report["files"]))
        return
    reports = []
    for run_dir in run_dirs:
        reports.append(evaluate_run(run_dir, batches, knockout=knockout))
        print(format_report(reports[-1]))
        print(_files_line(reports[-1]["files"]), end="\n\n")
    result = compare_runs(run_dirs, out, reports=reports)
    print(result["table"])
    print(f"\ncomparison written to {result['out_dir']}: " + ", ".join(result["files"].values()))


def _files_line(files: dict) -> str:
    """'wrote report.json, routing_trace.safetensors, <plots>' with their paths."""
    paths = [files["report"], files["trace"], *files.get("plots", [])]
    return "wrote " + ", ".join(paths)
