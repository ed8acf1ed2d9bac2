"""PNG plots of training runs and their routing, drawn headless.

Every figure is a bare `matplotlib.figure.Figure`: `savefig` renders it with the Agg
canvas, and pyplot (with its global backend and figure registry) is never imported, so
plotting works without a display and leaves a user's interactive backend alone.

Inputs are plain data: `metrics.jsonl` records (dicts) and `moge.tools.evaluate` reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

_DPI = 110


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=_DPI)
    return path


def _train_series(records: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` over the train records that have it."""
    rows = [(r["step"], r[key]) for r in records if r.get("type") == "train" and r.get(key) is not None]
    return [s for s, _ in rows], [v for _, v in rows]


def _val_series(records: Sequence[dict]) -> tuple[list[int], list[float]]:
    rows = [(r["step"], r["val_loss"]) for r in records if r.get("type") == "eval" and "val_loss" in r]
    return [s for s, _ in rows], [v for _, v in rows]


def _train_loss_key(records: Sequence[dict]) -> str:
    # lm_loss is what val_loss measures (no aux term); older logs may only have loss.
    return "lm_loss" if any(r.get("lm_loss") is not None for r in records) else "loss"


def _routing_is_series(records: Sequence[dict]) -> dict[int, tuple[list[int], list[float]]]:
    """layer -> (steps, imbalance scores) from the train records' routing lists."""
    out: dict[int, tuple[list[int], list[float]]] = {}
    for r in records:
        if r.get("type") != "train":
            continue
        for entry in r.get("routing") or []:
            steps, values = out.setdefault(int(entry["layer"]), ([], []))
            steps.append(r["step"])
            values.append(entry["imbalance_score"])
    return out


def _plot_losses(ax, records: Sequence[dict], color=None, label: str = "") -> None:
    key = _train_loss_key(records)
    steps, values = _train_series(records, key)
    prefix = f"{label} " if label else ""
    ax.plot(steps, values, color=color, lw=1.2, label=f"{prefix}train {key}")
    vsteps, vvalues = _val_series(records)
    if vsteps:
        ax.plot(vsteps, vvalues, "o--", color=color, ms=4, label=f"{prefix}val loss")


def plot_training_curve(records: Sequence[dict], path: str | Path, title: str = "") -> Path:
    """Train/val loss, aux loss and (if logged) the Imbalance Score per layer vs step."""
    has_routing = any(r.get("routing") for r in records if r.get("type") == "train")
    n_panels = 3 if has_routing else 2
    fig = Figure(figsize=(7, 2.6 * n_panels), layout="constrained")
    axes = fig.subplots(n_panels, 1, sharex=True)
    _plot_losses(axes[0], records, color="C0")
    axes[0].set_ylabel("loss (nats/token)")
    axes[0].legend(fontsize=8)
    steps, aux = _train_series(records, "aux_loss")
    axes[1].plot(steps, aux, color="C1", lw=1.2)
    axes[1].set_ylabel("aux loss")
    if has_routing:
        for layer, (s, v) in sorted(_routing_is_series(records).items()):
            axes[2].plot(s, v, lw=1.0, label=f"layer {layer}")
        axes[2].set_ylabel("imbalance score")
        axes[2].legend(fontsize=7, ncol=4)
    axes[-1].set_xlabel("step")
    fig.suptitle(title or "training curve")
    return _save(fig, Path(path))


def plot_expert_load_heatmap(report: dict, path: str | Path) -> Path:
    """Layer x expert load divided by the mean load (1 = balanced); lines between groups."""
    layers = report["routing"]
    load_LE = np.array([r["expert_load"] for r in layers], dtype=float)
    rel_LE = load_LE / np.maximum(load_LE.mean(axis=1, keepdims=True), 1e-12)
    E, M = report["moe"]["num_experts"], report["moe"]["num_groups"]
    fig = Figure(figsize=(max(5.0, 0.28 * E + 2), max(2.5, 0.4 * len(layers) + 1.5)), layout="constrained")
    ax = fig.subplots()
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, float(rel_LE.max())))
    image = ax.imshow(rel_LE, aspect="auto", cmap="coolwarm", norm=norm, interpolation="nearest")
    for g in range(1, M):
        ax.axvline(g * (E // M) - 0.5, color="black", lw=1.5)
    ax.set_yticks(range(len(layers)), [str(r["layer"]) for r in layers])
    ax.set_xlabel(f"expert ({M} groups of {E // M}, separated by black lines)")
    ax.set_ylabel("layer")
    fig.colorbar(image, ax=ax, label="load / mean load")
    ax.set_title(
        f"{report['name']}: expert load on the eval set\nrouter {report['moe']['router']}", fontsize=10
    )
    return _save(fig, Path(path))


def plot_imbalance_per_layer(report: dict, path: str | Path) -> Path:
    """Bars of the Imbalance Score per layer: whole eval set and mean per eval batch."""
    layers = report["routing"]
    x = np.arange(len(layers))
    fig = Figure(figsize=(max(5.0, 0.6 * len(layers) + 2), 3.5), layout="constrained")
    ax = fig.subplots()
    ax.bar(x - 0.2, [r["imbalance_score"] for r in layers], 0.4, label="whole eval set")
    ax.bar(x + 0.2, [r["imbalance_score_batch_mean"] for r in layers], 0.4, label="mean per eval batch")
    ax.set_xticks(x, [str(r["layer"]) for r in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel("IS = (max - min device load) / tokens")
    top = max(max(r["imbalance_score"], r["imbalance_score_batch_mean"]) for r in layers)
    ax.set_ylim(0.0, max(0.05, 1.15 * top))
    router = report["moe"]["router"]
    if top == 0.0:
        # Empty bars look like a broken plot; say why they are empty.
        why = "every group gets exactly T*K/M slots" if router in ("grouped", "random") else "balanced"
        ax.text(0.5, 0.5, f"IS = 0 in every layer ({why})", transform=ax.transAxes, ha="center")
    ax.set_title(
        f"{report['name']}: imbalance score per layer\none group per device, router {router}", fontsize=10
    )
    ax.legend(fontsize=8)
    return _save(fig, Path(path))


def plot_comparison(
    names: Sequence[str], records: Sequence[Sequence[dict]], reports: Sequence[dict], path: str | Path
) -> Path:
    """Training curves of several runs overlaid, and their per-layer IS side by side."""
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    ax_loss, ax_is = fig.subplots(1, 2)
    for i, (name, recs) in enumerate(zip(names, records)):
        _plot_losses(ax_loss, recs, color=f"C{i}", label=name)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.legend(fontsize=8)
    ax_loss.set_title("training curves")
    width = 0.8 / len(names)
    for i, (name, report) in enumerate(zip(names, reports)):
        layers = report["routing"]
        x = np.arange(len(layers)) + (i - (len(names) - 1) / 2) * width
        values = [r["imbalance_score_batch_mean"] for r in layers]
        bars = ax_is.bar(x, values, width, color=f"C{i}", label=f"{name} ({report['moe']['router']})")
        if len(values) * len(names) <= 24:  # label the bars while they stay readable (0 is a bar too)
            ax_is.bar_label(bars, fmt="%.3f", fontsize=7)
    n_layers = max(len(r["routing"]) for r in reports)
    ax_is.set_xticks(range(n_layers), [str(i) for i in range(n_layers)])
    ax_is.set_xlabel("MoE layer (in depth order)")
    ax_is.set_ylabel("IS, mean per eval batch")
    ax_is.set_ylim(bottom=0.0)
    ax_is.legend(fontsize=8)
    ax_is.set_title("imbalance score per layer (one group per device)")
    return _save(fig, Path(path))
