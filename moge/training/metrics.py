"""What the loop measures and logs: validation loss, routing statistics of the whole
step's batch (every micro-batch of every rank), metrics.jsonl and the log line."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import Tensor

from moge.balance import load_summary, score_entropy
from moge.layer import MoGELayer, MoGEOutput
from moge.model import ModelOutput, MoGETransformer
from moge.training.data import TokenDataset

METRICS = "metrics.jsonl"
# Per MoE layer and micro-batch, averaged over the step: lb_loss, z_loss, score_entropy,
# and the share of slots an expert capacity dropped (0 when dropless).
_MEANS = ("lb_loss", "z_loss", "score_entropy", "dropped_fraction")


def autocast(device: torch.device, dtype: str):
    if dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def validation_loss(
    model: MoGETransformer, dataset: TokenDataset, batch_size: int, batches: int, dtype: str = "float32"
) -> float:
    """Mean LM loss (no aux loss) over the fixed val windows, in eval mode; train mode restored.

    Under several ranks every rank runs the same windows (its shards take part)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in dataset.iter_eval_batches("val", batch_size, batches):
            x_BL, y_BL = batch
            with autocast(device, dtype):
                out = model(x_BL.to(device), y_BL.to(device), **batch.model_kwargs(device))
            total += out.lm_loss.item() * x_BL.numel()
            count += x_BL.numel()
    finally:
        model.train(was_training)
    return total / count


def _dropped_share(r: MoGEOutput) -> Tensor:
    if r.dropped is None:
        return r.lb_loss.new_zeros((), dtype=torch.float32)
    return r.dropped.sum().float() / r.load.sum().clamp_min(1).float()


@torch.no_grad()
def routing_sums(out: ModelOutput) -> Tensor:
    """One micro-batch's [layers, 4] (lb_loss, z_loss, score entropy, dropped share), to be summed."""
    rows = [
        torch.stack(
            [r.lb_loss.float(), r.z_loss.float(), score_entropy(r.scores, r.token_mask), _dropped_share(r)]
        )
        for r in out.routing
    ]
    return torch.stack(rows).double() if rows else torch.zeros(0, len(_MEANS), dtype=torch.float64)


def routing_record(layers: list[MoGELayer], blocks: list[int], means_L3: Tensor) -> list[dict]:
    """The `routing` list of a train record: call before end_step() resets the counts."""
    records = []
    for index, layer, means in zip(blocks, layers, means_L3.tolist()):
        c = layer.config
        load_E = layer.load_accum_E
        rec = {"layer": index, **load_summary(load_E, c.num_groups, float(load_E.sum()) / c.top_k)}
        rec.update(dict(zip(_MEANS, means)))
        records.append(rec)
    return records


def log_line(rec: dict, steps: int) -> str:
    is_mean = sum(r["imbalance_score"] for r in rec["routing"]) / max(len(rec["routing"]), 1)
    return (
        f"step {rec['step']:>6}/{steps} | loss {rec['loss']:.4f} | lm {rec['lm_loss']:.4f} | "
        f"aux {rec['aux_loss']:.4f} | lr {rec['lr']:.2e} | gnorm {rec['grad_norm']:.3f} | "
        f"IS {is_mean:.3f} | {rec['tokens_per_s']:,.0f} tok/s"
    )


def read_metrics(path: Path, upto: int) -> list[dict]:
    """Records of a previous attempt up to step `upto`; later ones and torn lines are dropped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= upto:
            records.append(rec)
    return records


def last(records: list[dict], kind: str, key: str) -> float | None:
    return next((r[key] for r in reversed(records) if r.get("type") == kind), None)
