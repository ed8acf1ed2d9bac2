"""Expert- and data-parallel training: what `moge.train.train` runs under torchrun.

    torchrun --standalone --nproc_per_node 2 -m moge train CONFIG parallel.expert_parallel=2

The world (WORLD_SIZE processes) is cut into expert-parallel groups of W =
parallel.expert_parallel ranks; rank r of a group holds the routed experts of groups
r, r+W, ... (moge.parallel), ranks holding the same experts are data-parallel replicas.
Everything else (embeddings, attention, router, shared experts, norms) is replicated;
its gradients are averaged over the world, the experts' over their replicas.

Data: every step draws world * grad_accum micro-batches from the one generator seeded
by data.seed, as a single process with grad_accum' = world * grad_accum would, and rank
r trains on draws r*A .. r*A + A - 1 (A = train.grad_accum). So every rank sees its own
tokens, the reported loss is the mean over all of them, and a run on P processes follows
the single-process run with P times the grad_accum up to float rounding
(tests/test_distributed_train.py checks it). The generator's state is the same on every
rank, so a checkpoint resumes on any number of processes.

Checkpoints have the single-process layout: the experts and their AdamW moments are
gathered, rank 0 writes them through moge.checkpoint, and every rank's torch RNG state
is kept as rng.safetensors["torch_cpu_rank<r>"]. `moge eval`, `moge generate` and
`load_run` read them in one process; resuming on P processes cuts the experts and
their moments back out. Every rank reads the checkpoint itself: train.out_dir must be
on a file system all nodes see. Only rank 0 writes metrics.jsonl, config.yaml and logs.

Errors: a failure while setting up or saving is agreed on by all ranks (no rank is left
waiting in a collective); the lowest failing rank's error is marked for printing
(`moge_report`), the others raise quietly (moge.cli prints once).

Not the same as one process: aux_loss_type "global_batch" accumulates the load of this
rank's micro-batches only; the `routing` stats in metrics.jsonl are rank 0's last
micro-batch; validation runs the same windows on every rank (its experts take part).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from moge.checkpoint import load_checkpoint, save_checkpoint
from moge.config import RunConfig, save_config
from moge.data import TokenDataset, load_dataset
from moge.diagnostics.collapse import CollapseMonitor
from moge.model import ModelOutput, MoGETransformer, count_parameters, format_params
from moge.parallel import (
    ExpertParallelExperts,
    ParallelContext,
    average_replicated_grads,
    clip_grad_norm_,
    destroy,
    gather_model_state_dict,
    init_distributed,
    make_context,
    parallelize_model,
)
from moge.train import (
    METRICS,
    NonFiniteLossError,
    TrainResult,
    _autocast,
    _check_same_architecture,
    _check_weights,
    _last,
    _log_line,
    _prepare_out_dir,
    _raise_nonfinite,
    _read_metrics,
    _routing_record,
    build_optimizer,
    lr_at,
    validation_loss,
)

_R = TypeVar("_R")
_OK, _USAGE, _DIVERGED, _CRASH = 0, 1, 2, 3  # what a rank reports when ranks agree


def world_size_from_env() -> int:
    """torchrun's WORLD_SIZE (1 when unset)."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"WORLD_SIZE: expected an integer, got {value!r}") from None


def distributed_requested(cfg: RunConfig) -> bool:
    """Whether `train` must run in parallel: under torchrun, or expert_parallel > 1."""
    return cfg.parallel.expert_parallel > 1 or world_size_from_env() > 1 or dist.is_initialized()


# ---------------------------------------------------------------- ranks agreeing on failure


class PeerError(RuntimeError):
    """Another rank failed (and printed why), so this one stops too.

    usage: the other rank's error was a user error (bad path, config, checkpoint).
    """

    def __init__(self, message: str, usage: bool) -> None:
        super().__init__(message)
        self.usage = usage


def _mark(err: BaseException, report: bool) -> BaseException:
    err.moge_report = report  # read by moge.cli: print this error on this rank or not
    return err


def _kind(err: BaseException | None) -> int:
    if err is None:
        return _OK
    if isinstance(err, NonFiniteLossError):
        return _DIVERGED
    return _USAGE if isinstance(err, (ValueError, OSError)) else _CRASH


def _failed_ranks(ctx: ParallelContext, kind: int) -> list[int]:
    """Every rank's kind of failure (0: none), all-reduced: a collective."""
    kinds_W = torch.zeros(ctx.world_size, dtype=torch.int32, device=ctx.device)
    kinds_W[ctx.rank] = kind
    dist.all_reduce(kinds_W)
    return kinds_W.cpu().tolist()


def _raise_together(ctx: ParallelContext, what: str, err: Exception | None) -> None:
    """A collective: if any rank failed, all raise; only the lowest failing one reports."""
    kinds = _failed_ranks(ctx, _kind(err))
    failed = [r for r, k in enumerate(kinds) if k]
    if not failed:
        return
    first = failed[0]
    if err is not None:
        raise _mark(err, ctx.rank == first)
    raise _mark(PeerError(f"{what}: rank {first} failed (see its error)", kinds[first] == _USAGE), False)


def agree(ctx: ParallelContext, what: str, fn: Callable[[], _R]) -> _R:
    """fn() on every rank, then all ranks learn whether any failed and raise together.

    fn must not run collectives (a rank that failed before one would leave the others
    waiting in it). `what` names the phase in the other ranks' PeerError.
    """
    try:
        result = fn()
    except Exception as err:  # noqa: BLE001 -- shared with the other ranks, then re-raised
        _raise_together(ctx, what, err)
        raise  # unreachable: _raise_together raises err
    _raise_together(ctx, what, None)
    return result


# ---------------------------------------------------------------- process group


def _connect(cfg: RunConfig) -> tuple[ParallelContext, bool]:
    """The parallel context (joining torchrun's group unless one exists); whether we own it."""
    p, tc = cfg.parallel, cfg.train
    if tc.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device: cuda was asked for but torch sees no CUDA device")
    if dist.is_initialized():
        return make_context(p.expert_parallel, dist.get_backend()), False
    world, W = world_size_from_env(), p.expert_parallel
    if world % W:
        raise ValueError(
            f"parallel.expert_parallel: {W} needs a multiple of {W} processes, got WORLD_SIZE={world}; "
            f"launch with `torchrun --standalone --nproc_per_node {W} -m moge train CONFIG ...`"
        )
    backend = p.backend or ("nccl" if tc.device == "cuda" else "gloo")
    return init_distributed(backend, expert_parallel=W), True


def _device(cfg: RunConfig, ctx: ParallelContext) -> torch.device:
    return ctx.device if cfg.train.device == "cuda" else torch.device("cpu")


# ---------------------------------------------------------------- optimizer state by name


def _expert_modules(model: nn.Module) -> dict[str, ExpertParallelExperts]:
    """Name of every rank-local expert parameter -> the module that holds it."""
    out = {}
    for prefix, m in model.named_modules():
        if isinstance(m, ExpertParallelExperts):
            out.update({f"{prefix}.{n}": m for n, _ in m.named_parameters()})
    return out


def _is_moment(value, p: Tensor) -> bool:
    """An AdamW state tensor laid out like its parameter (exp_avg, exp_avg_sq, ...)."""
    return isinstance(value, Tensor) and value.shape == p.shape and value.dim() > 0


def _state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict]:
    return {n: dict(optimizer.state[p]) for n, p in model.named_parameters() if p in optimizer.state}


def _group_settings(optimizer: torch.optim.Optimizer) -> list[dict]:
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def _load_state_by_name(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, dict], settings: list[dict]
) -> None:
    """Put per-name AdamW state (and the saved group settings) into `optimizer`."""
    for name, p in model.named_parameters():
        if name in state:
            optimizer.state[p] = {
                k: v.to(p.device) if _is_moment(v, p) else v for k, v in state[name].items()
            }
    for group, saved in zip(optimizer.param_groups, settings):
        group.update(saved)


@torch.no_grad()
def _gather_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict]:
    """Per-name state with every expert moment gathered to [E, ...] (a collective)."""
    experts = _expert_modules(model)
    state = _state_by_name(model, optimizer)
    for name, p in model.named_parameters():  # the same order on every rank
        if name in experts and name in state:
            entry = state[name]
            for key in sorted(k for k, v in entry.items() if _is_moment(v, p)):
                entry[key] = experts[name].gather(entry[key])
    return state


def _shard_optimizer_state(model: nn.Module, state: dict[str, dict]) -> dict[str, dict]:
    """Per-name state of the single-process model cut down to this rank's experts."""
    experts = _expert_modules(model)
    out = {}
    for name, entry in state.items():
        m = experts.get(name)
        out[name] = {k: m.shard(v) if m is not None and isinstance(v, Tensor) and v.dim() > 0 else v
                     for k, v in entry.items()}  # fmt: skip
    return out


# ---------------------------------------------------------------- build, save, resume


def rank_batches(
    dataset: TokenDataset, gen: torch.Generator, batch_size: int, grad_accum: int, rank: int, world: int
) -> list[tuple[Tensor, Tensor]]:
    """This rank's grad_accum micro-batches (x_BL, y_BL) of one step.

    The step draws world * grad_accum micro-batches from the shared generator, the same
    draws one process makes with grad_accum * world; rank r takes draws r*A .. r*A + A - 1.
    """
    drawn = [dataset.get_batch("train", batch_size, gen) for _ in range(world * grad_accum)]
    return drawn[rank * grad_accum : (rank + 1) * grad_accum]


def _load_full(cfg: RunConfig, ckpt: Path | None, device: torch.device, rank: int):
    """The single-process model (and its optimizer state by name) before parallelizing."""
    tc = cfg.train
    torch.manual_seed(tc.seed)
    model = MoGETransformer(cfg.model, cfg.moe).to(device).train()
    data_gen = torch.Generator().manual_seed(cfg.data.seed)
    if ckpt is None:
        return model, data_gen, 0, None
    full_opt = build_optimizer(model, tc)
    start = load_checkpoint(ckpt, model, full_opt, data_gen, rng_key=f"torch_cpu_rank{rank}")
    return model, data_gen, start, (_state_by_name(model, full_opt), _group_settings(full_opt))


def _parallelize(
    cfg: RunConfig, ctx: ParallelContext, model: MoGETransformer, opt_state
) -> torch.optim.Optimizer:
    """Swap in the expert-parallel layers (a collective) and build this rank's optimizer."""
    rng = torch.get_rng_state()  # the EP layers draw a throwaway init: keep the stream as loaded
    parallelize_model(model, ctx, static_splits=cfg.parallel.static_splits)
    torch.set_rng_state(rng)
    optimizer = build_optimizer(model, cfg.train)
    if opt_state is not None:
        state, settings = opt_state
        _load_state_by_name(model, optimizer, _shard_optimizer_state(model, state), settings)
    return optimizer


def _full_layout(cfg: RunConfig, model_sd: dict, opt_state: dict, settings: list[dict]):
    """A single-process model + AdamW holding the gathered tensors, for save_checkpoint.

    Built on the meta device and filled by assignment: no init, no RNG draws, no copies.
    """
    with torch.device("meta"):
        model = MoGETransformer(cfg.model, cfg.moe)
    model.load_state_dict(model_sd, assign=True)
    optimizer = build_optimizer(model, cfg.train)
    _load_state_by_name(model, optimizer, opt_state, settings)
    return model, optimizer


def _gather_rng_states(ctx: ParallelContext) -> dict[str, Tensor]:
    state = torch.get_rng_state().to(ctx.device)
    parts = [torch.empty_like(state) for _ in range(ctx.world_size)]
    dist.all_gather(parts, state)
    return {f"torch_cpu_rank{r}": t.cpu() for r, t in enumerate(parts)}


@dataclass
class _Run:
    """What the loop carries between steps (metrics is None off rank 0)."""

    cfg: RunConfig
    ctx: ParallelContext
    out_dir: Path
    device: torch.device
    dataset: TokenDataset
    model: MoGETransformer
    optimizer: torch.optim.Optimizer
    data_gen: torch.Generator
    metrics: TextIO | None
    val_loss: float | None = None

    @property
    def main(self) -> bool:
        return self.ctx.rank == 0

    def write(self, rec: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(rec) + "\n")
            self.metrics.flush()


def save_parallel_checkpoint(run: _Run, step: int) -> None:
    """Gather the experts, their moments and every rank's RNG; rank 0 writes (collective)."""
    model_sd = gather_model_state_dict(run.model)
    opt_state = _gather_optimizer_state(run.model, run.optimizer)
    rngs = _gather_rng_states(run.ctx)
    tc = run.cfg.train

    def write() -> None:
        if run.main:
            model, optimizer = _full_layout(run.cfg, model_sd, opt_state, _group_settings(run.optimizer))
            _check_weights(step, model)
            save_checkpoint(run.out_dir, step, model, optimizer, run.data_gen, run.cfg, tc.keep_last, rngs)

    agree(run.ctx, f"step {step}: saving the checkpoint", write)


# ---------------------------------------------------------------- one step


def _global_losses(step: int, out: ModelOutput, run: _Run) -> Tensor:
    """(loss, lm_loss, aux_loss) summed over the ranks; a non-finite one stops every rank."""
    local = torch.stack([out.loss.detach(), out.lm_loss.detach(), out.aux_loss.detach()]).double()
    total = local.clone()
    dist.all_reduce(total)
    if bool(torch.isfinite(total).all()):
        return total
    mine = None
    if not bool(torch.isfinite(local).all()):
        try:
            _raise_nonfinite(step, out, run.model)
        except NonFiniteLossError as err:
            mine = err
    _stop_together(run.ctx, mine, f"step {step}: the loss is not finite")
    raise AssertionError("unreachable")


def _stop_together(ctx: ParallelContext, mine: NonFiniteLossError | None, what: str) -> None:
    kinds = _failed_ranks(ctx, _kind(mine))
    first = next((r for r, k in enumerate(kinds) if k), 0)  # none: the sum overflowed; rank 0 says so
    if mine is not None:
        raise _mark(mine, ctx.rank == first)
    where = f"on rank {first}" if kinds[first] else "in the sum over the ranks"
    raise _mark(NonFiniteLossError(f"{what} {where} (the last good checkpoint is kept)"), ctx.rank == first)


def _clip(step: int, run: _Run) -> float:
    """Average the grads, clip by the global norm (0: only measure); NaN/Inf stops every rank."""
    model = run.model
    average_replicated_grads(model)
    named = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    finite_P = torch.stack([torch.isfinite(g).all() for _, g in named])  # before clipping spreads NaN
    max_norm = run.cfg.train.grad_clip if run.cfg.train.grad_clip > 0 else float("inf")
    norm = float(clip_grad_norm_(model, max_norm))
    if norm == norm and norm != float("inf"):
        return norm
    bad = [n for (n, _), ok in zip(named, finite_P.tolist()) if not ok]
    mine = None
    if bad:
        mine = NonFiniteLossError(
            f"step {step}: the gradient norm is not finite; non-finite gradients in {len(bad)} "
            f"parameter(s) on rank {run.ctx.rank}: {', '.join(bad[:4])} (the last good checkpoint is kept)"
        )
    _stop_together(run.ctx, mine, f"step {step}: the gradient norm is not finite")
    raise AssertionError("unreachable")


def _train_step(step: int, run: _Run) -> tuple[dict, ModelOutput]:
    """One optimiser step over this rank's grad_accum micro-batches; metrics are global means."""
    tc, ctx = run.cfg.train, run.ctx
    lr = lr_at(step, tc)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    totals = torch.zeros(3, dtype=torch.float64, device=run.device)
    for x_BL, y_BL in rank_batches(
        run.dataset, run.data_gen, tc.batch_size, tc.grad_accum, ctx.rank, ctx.world_size
    ):
        with _autocast(run.device, tc.dtype):
            out = run.model(x_BL.to(run.device), y_BL.to(run.device))
        totals += _global_losses(step + 1, out, run)  # before backward: its exchanges need every rank
        (out.loss / tc.grad_accum).backward()
    grad_norm = _clip(step + 1, run)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    for layer in run.model.moe_layers():
        layer.end_step()  # the EP layer sums the load over every rank first
    loss, lm_loss, aux_loss = (totals / (tc.grad_accum * ctx.world_size)).tolist()
    return {"loss": loss, "lm_loss": lm_loss, "aux_loss": aux_loss, "lr": lr, "grad_norm": grad_norm}, out


# ---------------------------------------------------------------- the loop


def _after_step(run: _Run, rec: dict, stop_at: int | None) -> None:
    """Rank 0 logs; every rank evaluates and joins the checkpoint, as train.* schedules."""
    tc, done = run.cfg.train, rec["step"]
    run.write(rec)
    if run.main and (done % tc.log_every == 0 or done == tc.steps):
        tqdm.write(_log_line(rec, tc.steps))
    if (tc.eval_every and done % tc.eval_every == 0) or done == tc.steps:
        run.val_loss = validation_loss(run.model, run.dataset, tc.batch_size, tc.eval_batches, tc.dtype)
        run.write({"type": "eval", "step": done, "val_loss": run.val_loss})
        if run.main:
            tqdm.write(f"step {done:>6}/{tc.steps} | val_loss {run.val_loss:.4f}")
    if (tc.save_every and done % tc.save_every == 0) or done in (tc.steps, stop_at):
        save_parallel_checkpoint(run, done)


def _loop(run: _Run, start: int, stop_at: int | None, progress: bool, records: list[dict]) -> TrainResult:
    tc = run.cfg.train
    end = stop_at if stop_at is not None else tc.steps
    train_loss, run.val_loss = _last(records, "train", "loss"), _last(records, "eval", "val_loss")
    elapsed0 = _last(records, "train", "elapsed_s") or 0.0
    tokens_per_step = tc.batch_size * tc.grad_accum * run.cfg.data.seq_len * run.ctx.world_size
    t0, train_time, tok_s = time.perf_counter(), 0.0, 0.0
    show = progress and run.main and sys.stderr.isatty()
    monitor = CollapseMonitor.for_model(run.cfg, run.model)
    with tqdm(total=tc.steps, initial=start, disable=not show, dynamic_ncols=True) as bar:
        for step in range(start, end):
            t_step = time.perf_counter()
            rec, out = _train_step(step, run)
            train_time += time.perf_counter() - t_step
            tok_s = tokens_per_step * (step + 1 - start) / train_time
            train_loss = rec["loss"]
            rec = {"type": "train", "step": step + 1, **rec, "tokens_per_s": tok_s,
                   "elapsed_s": elapsed0 + time.perf_counter() - t0}  # fmt: skip
            if run.main:
                rec["routing"] = _routing_record(out, run.model)  # rank 0's last micro-batch
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tok_s:,.0f}")
            _after_step(run, rec, stop_at)
            if run.main:  # rank 0's routing, as in its train records
                monitor.after_step(step + 1, out.routing, run.write, tqdm.write)
    return TrainResult(max(end, start), train_loss, run.val_loss, run.out_dir, tok_s)


def _open_run(cfg: RunConfig, ctx: ParallelContext, out_dir: Path, dataset: TokenDataset, start: int, ckpt):
    """Rank 0: config.yaml, the header, metrics.jsonl cut back to `start` -> (file, records)."""
    if ctx.rank != 0:
        return None, []
    tc = cfg.train
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    params = count_parameters(cfg.model, cfg.moe)
    tqdm.write(f"{cfg.name}: {format_params(params.total)} parameters, {format_params(params.activated)} "
               f"activated; data: {dataset.source}; out_dir: {out_dir}")  # fmt: skip
    tqdm.write(f"parallel: {ctx.world_size} processes ({ctx.backend}), expert_parallel {ctx.expert_parallel}, "
               f"{ctx.replicas} data-parallel replica(s)")  # fmt: skip
    if ckpt is not None:
        tqdm.write(f"resuming from {ckpt} (step {start})")
    elif tc.resume:
        tqdm.write(f"train.resume: no checkpoint in {out_dir}; starting fresh")
    records = _read_metrics(out_dir / METRICS, start)
    metrics = open(out_dir / METRICS, "w", encoding="utf-8")  # noqa: SIM115 (held for the run) drops what a killed run logged later
    metrics.writelines(json.dumps(r) + "\n" for r in records)
    metrics.flush()
    return metrics, records


def _train(cfg: RunConfig, ctx: ParallelContext, progress: bool, stop_at: int | None) -> TrainResult:
    tc = cfg.train
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    out_dir = Path(tc.out_dir) if tc.out_dir is not None else Path("runs") / cfg.name
    device = _device(cfg, ctx)

    def prepare():
        dataset = load_dataset(cfg.data)
        dataset.check_vocab_size(cfg.model.vocab_size)
        ckpt = _prepare_out_dir(out_dir, tc.resume)
        if ckpt is not None:
            _check_same_architecture(cfg, ckpt)
        return dataset, ckpt

    # Also a barrier: every rank has looked at out_dir before rank 0 writes into it.
    dataset, ckpt = agree(ctx, "setting up", prepare)
    model, data_gen, start, opt_state = agree(ctx, "loading", lambda: _load_full(cfg, ckpt, device, ctx.rank))
    optimizer = _parallelize(cfg, ctx, model, opt_state)
    metrics, records = agree(
        ctx, "opening the run folder", lambda: _open_run(cfg, ctx, out_dir, dataset, start, ckpt)
    )
    try:
        run = _Run(cfg, ctx, out_dir, device, dataset, model, optimizer, data_gen, metrics)
        return _loop(run, start, stop_at, progress, records)
    finally:
        if metrics is not None:
            metrics.close()


def train_distributed(cfg: RunConfig, *, progress: bool = True, stop_at: int | None = None) -> TrainResult:
    """`moge.train.train` on every rank of a torchrun launch (see the module docstring).

    Joins torchrun's process group (env://) unless one is initialised already, and
    leaves it at the end if it joined. Every rank returns the same global metrics.
    """
    ctx, owned = _connect(cfg)
    try:
        result = _train(cfg, ctx, progress, stop_at)
        if owned:  # gloo aborts a rank whose peer closes a connection it still reads from
            dist.barrier()
        return result
    finally:
        if owned:
            destroy()
