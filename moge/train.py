"""The toy trainer behind `moge train`: AdamW, warm-up + cosine, checkpoints, exact resume.

Legend: B batch, L sequence length (data.seq_len).

Seeds: `train.seed` fixes the parameter init (torch.manual_seed before the model is built);
`data.seed` fixes the train/val split and seeds the CPU generator that draws the batches,
so two runs that differ only in train.seed see the same batches in the same order.
The generator, the torch RNG, the optimizer and the model are all in every checkpoint, and
the LR depends only on the step, so a resumed run reaches the same weights as one that
never stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
from torch import nn
from tqdm import tqdm

from moge.balance import routing_stats
from moge.checkpoint import checkpoint_config, latest_checkpoint, load_checkpoint, save_checkpoint
from moge.config import RunConfig, TrainConfig, config_to_dict, save_config
from moge.data import TokenDataset, load_dataset
from moge.layer import MoGELayer
from moge.model import ModelOutput, MoGETransformer, count_parameters, format_params

METRICS = "metrics.jsonl"
_STAT_KEYS = ("imbalance_score", "max_over_mean", "load_entropy", "score_entropy", "dead_experts", "cv")


class NonFiniteLossError(RuntimeError):
    """The loss or the gradients went NaN/Inf; the message names the step and the layer."""


@dataclass
class TrainResult:
    step: int  # optimiser steps completed
    train_loss: float | None  # loss of the last step (None if no step was taken or logged)
    val_loss: float | None  # the last validation loss
    out_dir: Path
    tokens_per_s: float  # training throughput of this call (0 if it took no step)


# ---------------------------------------------------------------- optimiser and schedule


def lr_at(step: int, tc: TrainConfig) -> float:
    """LR of 0-based step `step`: linear warm-up to lr, then cosine from lr down to min_lr.

    Warm-up step i uses lr * (i+1) / warmup_steps; the cosine starts at lr on the first
    step after warm-up and reaches min_lr on the last step (steps - 1).
    """
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    span = tc.steps - tc.warmup_steps - 1
    progress = min(max((step - tc.warmup_steps) / span, 0.0), 1.0) if span > 0 else 0.0
    return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, tc: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only.

    1-D parameters (RMSNorm weights, biases, the learned expert scale expert_scale_E) are
    scales and offsets: decaying them pulls them to 0, not to their init of 1 or 0.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # torch's fused AdamW: one kernel over all tensors, measured ~2x faster than the default
    # per-tensor loop on CPU (docs/performance.md). Plain CPU/CUDA tensors only (not DTensor).
    plain = all(type(p.data) is torch.Tensor and p.device.type in ("cpu", "cuda") for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), fused=plain or None)


# ---------------------------------------------------------------- checks


def _moe_blocks(model: MoGETransformer) -> list[int]:
    """Block index of every MoE layer, in depth order (the "layer" of metrics and errors)."""
    return [b.index for b in model.blocks if isinstance(b.ffn, MoGELayer)]


def _first_nonfinite(out: ModelOutput, model: MoGETransformer) -> str:
    """Where the non-finite loss first shows up, in depth order."""
    for index, routed in zip(_moe_blocks(model), out.routing):
        parts = (
            ("router scores", routed.scores),
            ("aux loss", routed.aux_loss),
            ("hidden output", routed.hidden),
        )
        for what, t in parts:
            if not bool(torch.isfinite(t).all()):
                return f"layer {index} (MoE): non-finite {what}"
    if not bool(torch.isfinite(out.logits).all()):
        return "the logits (every MoE layer's router and output are finite)"
    return "the loss (the logits are finite)"


def _raise_nonfinite(step: int, out: ModelOutput, model: MoGETransformer) -> None:
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    hint = f"; non-finite parameters: {', '.join(bad[:4])}" if bad else ""
    raise NonFiniteLossError(
        f"step {step}: the loss is {out.loss.item()} at {_first_nonfinite(out, model)}{hint}; "
        "try a lower train.lr or train.grad_clip > 0 (the last good checkpoint is kept)"
    )


def _clip_grads(step: int, model: nn.Module, grad_clip: float) -> float:
    """Clip to grad_clip (0: only measure) and return the norm; NaN/Inf -> NonFiniteLossError."""
    max_norm = grad_clip if grad_clip > 0 else float("inf")  # inf: measure, never scale
    try:
        # error_if_nonfinite raises before scaling, so the culprits' gradients are still
        # the only non-finite ones (scaling by a NaN coefficient would spread NaN to all).
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, error_if_nonfinite=True))
    except RuntimeError as err:
        grads = ((n, p.grad) for n, p in model.named_parameters() if p.grad is not None)
        bad = [n for n, g in grads if not bool(torch.isfinite(g).all())]
        if not bad:
            raise
        raise NonFiniteLossError(
            f"step {step}: the gradient norm is not finite; non-finite gradients in {len(bad)} "
            f"parameter(s): {', '.join(bad[:4])} (the last good checkpoint is kept)"
        ) from err


def _check_weights(step: int, model: nn.Module) -> None:
    # Never write a checkpoint that holds NaN/Inf: it would replace a good one.
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteLossError(f"step {step}: {name} holds NaN/Inf; no checkpoint written")


# ---------------------------------------------------------------- run directory


def _prepare_out_dir(out_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (or None); refuses to overwrite a previous run."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"train.out_dir: {out_dir} exists and is not a folder")
    if resume:
        return latest_checkpoint(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise ValueError(
            f"train.out_dir: {out_dir} already holds a run; pass train.resume=true to continue it "
            "or set train.out_dir to another folder"
        )
    return None


def _check_same_architecture(cfg: RunConfig, ckpt: Path) -> None:
    saved, now = config_to_dict(checkpoint_config(ckpt)), config_to_dict(cfg)
    for section in ("model", "moe"):
        diff = sorted(k for k in now[section] if saved[section].get(k) != now[section][k])
        if diff:
            raise ValueError(
                f"{section}.{diff[0]}: differs from the checkpoint {ckpt} being resumed "
                f"({', '.join(f'{section}.{k}' for k in diff)}); use another train.out_dir"
            )


def _read_metrics(path: Path, upto: int) -> list[dict]:
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


def _last(records: list[dict], kind: str, key: str) -> float | None:
    return next((r[key] for r in reversed(records) if r.get("type") == kind), None)


# ---------------------------------------------------------------- measurement


@torch.no_grad()
def validation_loss(
    model: MoGETransformer, dataset: TokenDataset, batch_size: int, batches: int, dtype: str = "float32"
) -> float:
    """Mean LM loss (no aux loss) over the fixed val windows, in eval mode; train mode restored."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for x_BL, y_BL in dataset.iter_eval_batches("val", batch_size, batches):
            with _autocast(device, dtype):
                out = model(x_BL.to(device), y_BL.to(device))
            total += out.lm_loss.item() * x_BL.numel()
            count += x_BL.numel()
    finally:
        model.train(was_training)
    return total / count


def _autocast(device: torch.device, dtype: str):
    if dtype == "bfloat16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _routing_record(out: ModelOutput, model: MoGETransformer) -> list[dict]:
    records = []
    for index, routed, layer in zip(_moe_blocks(model), out.routing, model.moe_layers()):
        c = layer.config
        stats = routing_stats(
            routed.expert_ids, c.num_experts, c.num_groups, routed.scores.detach()
        ).as_dict()
        rec = {"layer": index, **{k: stats[k] for k in _STAT_KEYS}}
        rec.update(lb_loss=routed.lb_loss.item(), z_loss=routed.z_loss.item())
        records.append(rec)
    return records


# ---------------------------------------------------------------- one step


def _train_step(step, model, optimizer, dataset, data_gen, cfg, device) -> tuple[dict, ModelOutput]:
    """One optimiser step over grad_accum micro-batches; returns the metrics and the last output."""
    tc = cfg.train
    lr = lr_at(step, tc)
    for group in optimizer.param_groups:
        group["lr"] = lr
    sums = {"loss": 0.0, "lm_loss": 0.0, "aux_loss": 0.0}
    for _ in range(tc.grad_accum):
        x_BL, y_BL = dataset.get_batch("train", tc.batch_size, data_gen)
        with _autocast(device, tc.dtype):
            out = model(x_BL.to(device), y_BL.to(device))
        if not bool(torch.isfinite(out.loss)):
            _raise_nonfinite(step + 1, out, model)
        (out.loss / tc.grad_accum).backward()
        for key in sums:
            sums[key] += getattr(out, key).item() / tc.grad_accum
    grad_norm = _clip_grads(step + 1, model, tc.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for layer in model.moe_layers():
        layer.end_step()  # aux-loss-free bias update from this step's load
    return {**sums, "lr": lr, "grad_norm": grad_norm}, out


def _log_line(rec: dict, steps: int) -> str:
    is_mean = sum(r["imbalance_score"] for r in rec["routing"]) / max(len(rec["routing"]), 1)
    return (
        f"step {rec['step']:>6}/{steps} | loss {rec['loss']:.4f} | lm {rec['lm_loss']:.4f} | "
        f"aux {rec['aux_loss']:.4f} | lr {rec['lr']:.2e} | gnorm {rec['grad_norm']:.3f} | "
        f"IS {is_mean:.3f} | {rec['tokens_per_s']:,.0f} tok/s"
    )


# ---------------------------------------------------------------- the loop


def _setup(cfg: RunConfig, out_dir: Path):
    tc = cfg.train
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    if tc.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device: cuda was asked for but torch sees no CUDA device")
    device = torch.device(tc.device)
    dataset = load_dataset(cfg.data)
    dataset.check_vocab_size(cfg.model.vocab_size)
    ckpt = _prepare_out_dir(out_dir, tc.resume)
    if ckpt is not None:
        _check_same_architecture(cfg, ckpt)
    torch.manual_seed(tc.seed)
    model = MoGETransformer(cfg.model, cfg.moe).to(device).train()
    optimizer = build_optimizer(model, tc)
    data_gen = torch.Generator().manual_seed(cfg.data.seed)
    return device, dataset, ckpt, model, optimizer, data_gen


@dataclass
class _Run:
    """What the loop carries between steps."""

    cfg: RunConfig
    out_dir: Path
    device: torch.device
    dataset: TokenDataset
    model: MoGETransformer
    optimizer: torch.optim.Optimizer
    data_gen: torch.Generator
    metrics: TextIO
    val_loss: float | None = None

    def write(self, rec: dict) -> None:
        self.metrics.write(json.dumps(rec) + "\n")
        self.metrics.flush()


def _after_step(run: _Run, rec: dict, stop_at: int | None) -> None:
    """Log, evaluate and checkpoint as the schedule of train.* asks after step rec["step"]."""
    tc, done = run.cfg.train, rec["step"]
    run.write(rec)
    if done % tc.log_every == 0 or done == tc.steps:
        tqdm.write(_log_line(rec, tc.steps))
    if (tc.eval_every and done % tc.eval_every == 0) or done == tc.steps:
        run.val_loss = validation_loss(run.model, run.dataset, tc.batch_size, tc.eval_batches, tc.dtype)
        run.write({"type": "eval", "step": done, "val_loss": run.val_loss})
        tqdm.write(f"step {done:>6}/{tc.steps} | val_loss {run.val_loss:.4f}")
    if (tc.save_every and done % tc.save_every == 0) or done in (tc.steps, stop_at):
        _check_weights(done, run.model)
        save_checkpoint(run.out_dir, done, run.model, run.optimizer, run.data_gen, run.cfg, tc.keep_last)


def _loop(run: _Run, start: int, stop_at: int | None, progress: bool, records: list[dict]) -> TrainResult:
    tc = run.cfg.train
    end = stop_at if stop_at is not None else tc.steps
    train_loss, run.val_loss = _last(records, "train", "loss"), _last(records, "eval", "val_loss")
    elapsed0 = _last(records, "train", "elapsed_s") or 0.0
    tokens_per_step = tc.batch_size * tc.grad_accum * run.cfg.data.seq_len
    t0, train_time, tok_s = time.perf_counter(), 0.0, 0.0
    show = progress and sys.stderr.isatty()
    with tqdm(total=tc.steps, initial=start, disable=not show, dynamic_ncols=True) as bar:
        for step in range(start, end):
            t_step = time.perf_counter()
            rec, out = _train_step(
                step, run.model, run.optimizer, run.dataset, run.data_gen, run.cfg, run.device
            )
            train_time += time.perf_counter() - t_step
            tok_s = tokens_per_step * (step + 1 - start) / train_time
            train_loss = rec["loss"]
            elapsed = elapsed0 + time.perf_counter() - t0
            rec = {"type": "train", "step": step + 1, **rec, "tokens_per_s": tok_s, "elapsed_s": elapsed,
                   "routing": _routing_record(out, run.model)}  # fmt: skip
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tok_s:,.0f}")
            _after_step(run, rec, stop_at)
    # start > end only when resuming past stop_at; start == steps: a finished run, nothing to do.
    return TrainResult(max(end, start), train_loss, run.val_loss, run.out_dir, tok_s)


def train(cfg: RunConfig, *, progress: bool = True, stop_at: int | None = None) -> TrainResult:
    """Train `cfg` into train.out_dir (default runs/<name>); see the module docstring.

    stop_at: save a checkpoint and return after this many steps (the LR schedule still
    follows train.steps), so tests can interrupt a run and resume it.
    Under torchrun (WORLD_SIZE > 1) or with parallel.expert_parallel > 1 this runs
    moge.distributed_train.train_distributed on every rank instead.
    """
    tc = cfg.train
    if stop_at is not None and not 1 <= stop_at <= tc.steps:
        raise ValueError(f"stop_at: expected 1..train.steps={tc.steps}, got {stop_at}")
    from moge.distributed_train import distributed_requested, train_distributed  # it imports this module

    if distributed_requested(cfg):
        return train_distributed(cfg, progress=progress, stop_at=stop_at)
    out_dir = Path(tc.out_dir) if tc.out_dir is not None else Path("runs") / cfg.name
    device, dataset, ckpt, model, optimizer, data_gen = _setup(cfg, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    params = count_parameters(cfg.model, cfg.moe)
    tqdm.write(f"{cfg.name}: {format_params(params.total)} parameters, {format_params(params.activated)} "
               f"activated; data: {dataset.source}; out_dir: {out_dir}")  # fmt: skip
    start = 0
    if ckpt is not None:
        start = load_checkpoint(ckpt, model, optimizer, data_gen)
        tqdm.write(f"resuming from {ckpt} (step {start})")
    elif tc.resume:
        tqdm.write(f"train.resume: no checkpoint in {out_dir}; starting fresh")
    records = _read_metrics(out_dir / METRICS, start)
    with open(out_dir / METRICS, "w", encoding="utf-8") as metrics:  # drops what a killed run logged later
        metrics.writelines(json.dumps(r) + "\n" for r in records)
        metrics.flush()
        run = _Run(cfg, out_dir, device, dataset, model, optimizer, data_gen, metrics)
        return _loop(run, start, stop_at, progress, records)
