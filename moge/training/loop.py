"""The one training loop behind `moge train`, on one process or many.

Legend: B batch, L sequence length (data.seq_len), A train.grad_accum, P processes.

One process is a world of size one: the same loop runs under torchrun, where
moge.distributed builds the ("dp", "ep") mesh and shards the model (FSDP2 + expert
parallelism) from outside; collectives over a world of one return their input.

Seeds: `train.seed` fixes the parameter init (torch.manual_seed before the model is built
on the meta device; each rank then allocates and initialises only its shards, with the
values of the one-process init at their positions: moge.model.init); `data.seed` fixes the
train/val split and seeds the CPU generator that draws the batches. Every step draws
P * A micro-batches from that generator and rank r trains on draws r*A .. r*A + A - 1,
so P processes follow one process with grad_accum P * A up to float rounding. The
generator, every rank's torch RNG, the optimizer and the model are in every checkpoint,
and the LR depends only on the step, so a resumed run (on any number of processes)
reaches the same weights as one that never stopped.

Only rank 0 writes metrics.jsonl, config.yaml and the log; the losses, gradient norm and
routing statistics it logs are those of the whole step (every rank's micro-batches).
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch
from tqdm import tqdm

from moge.diagnostics.collapse import CollapseMonitor
from moge.distributed.agree import agree
from moge.distributed.mesh import World, close, connect, single_process
from moge.distributed.parallelize import clip_grads_, grad_norm, materialize, parallelize
from moge.dropin import counting_pass
from moge.model import MoGETransformer, count_parameters, format_params
from moge.model.compiled import compile_model
from moge.sigma.data import check_dataset_domains
from moge.training.checkpoint import (
    checkpoint_config,
    latest_checkpoint,
    load_checkpoint,
    resume_point,
    save_checkpoint,
)
from moge.training.checks import check_weights, global_losses, moe_blocks, nonfinite_grads
from moge.training.config import RunConfig, config_to_dict, save_config
from moge.training.data import Batch, TokenDataset, load_dataset
from moge.training.limits import check_train_fits
from moge.training.metrics import (
    METRICS,
    autocast,
    last,
    log_line,
    routing_record,
    routing_sums,
    validation_loss,
)
from moge.training.optim import build_optimizer, lr_at
from moge.training.runfolder import (
    RunLock,
    StopOnSigterm,
    append_record,
    holds_a_run,
    optimizer_settings,
    read_metrics,
    reapply_optimizer_settings,
    rewrite_metrics,
)


@dataclass
class TrainResult:
    step: int  # optimiser steps completed
    train_loss: float | None  # loss of the last step (None if no step was taken or logged)
    val_loss: float | None  # the last validation loss
    out_dir: Path
    tokens_per_s: float  # training throughput of this call, all ranks (0 if it took no step)


def rank_batches(
    dataset: TokenDataset, gen: torch.Generator, batch_size: int, grad_accum: int, rank: int, world: int
) -> list[Batch]:
    """This rank's grad_accum micro-batches (x_BL, y_BL, + domain ids) of one step.

    The step draws world * grad_accum micro-batches from the shared generator, the same
    draws one process makes with grad_accum * world; rank r takes draws r*A .. r*A + A - 1.
    """
    drawn = [dataset.get_batch("train", batch_size, gen) for _ in range(world * grad_accum)]
    return drawn[rank * grad_accum : (rank + 1) * grad_accum]


# ---------------------------------------------------------------- run directory


def _check_out_dir_path(out_dir: Path) -> None:
    """ValueError naming train.out_dir when a folder cannot be made there (a file on its path)."""
    for above in (out_dir, *out_dir.parents):
        if above.exists():
            if not above.is_dir():
                where = "" if above == out_dir else f" (on the path of {out_dir})"
                raise ValueError(f"train.out_dir: {above} exists and is not a folder{where}")
            return


def _prepare_out_dir(out_dir: Path, resume: bool, main: bool = True) -> Path | None:
    """The checkpoint to resume from (or None); refuses to overwrite a previous run.
    main: this rank prints the log (rank 0); every rank looks at out_dir."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"train.out_dir: {out_dir} exists and is not a folder")
    if resume:
        ckpt, note = resume_point(out_dir)  # LATEST lost: the newest verified step, or an error
        if note and main:
            tqdm.write(note)
        return ckpt
    if holds_a_run(out_dir):
        raise ValueError(
            f"train.out_dir: {out_dir} already holds a run; pass train.resume=true to continue it "
            "or set train.out_dir to another folder"
        )
    return None


# How the same model is computed, not what it is: a resume may change them (recompute after
# running out of memory; another expert kernel; float32 router logits for a converted
# checkpoint read with router_dtype input, docs/moe-traps.md). None changes a weight; the
# results move by nothing (checkpointing, tested), by rounding (a kernel), or in bf16 by
# the experts a few tokens pick (router precision).
HOW_COMPUTED = ("model.activation_checkpointing", "moe.expert_impl", "moe.router_dtype")


def _check_same_architecture(cfg: RunConfig, ckpt: Path) -> None:
    saved, now = config_to_dict(checkpoint_config(ckpt)), config_to_dict(cfg)
    for section in ("model", "moe"):
        diff = sorted(
            k
            for k in now[section]
            if saved[section].get(k) != now[section][k] and f"{section}.{k}" not in HOW_COMPUTED
        )
        if diff:
            raise ValueError(
                f"{section}.{diff[0]}: differs from the checkpoint {ckpt} being resumed "
                f"({', '.join(f'{section}.{k}' for k in diff)}); use another train.out_dir"
            )


def _data_changes(cfg: RunConfig, ckpt: Path) -> list[str]:
    """The data fields a resume changes against the checkpoint's config, as "data.K: a -> b".
    Allowed (training on from a checkpoint with other data is a real use), but said: a
    new path, seed or val_fraction draws another train/val split, so the validation loss
    may then be measured on chunks the run has trained on."""
    saved, now = config_to_dict(checkpoint_config(ckpt))["data"], config_to_dict(cfg)["data"]
    return [f"data.{k}: {saved.get(k)!r} -> {now[k]!r}" for k in sorted(now) if saved.get(k) != now[k]]


def _same_run_hint(out_dir: Path) -> str:
    """Where a run of the same overrides in another order keeps its checkpoints (the
    default run folder names the overrides in the order given), as a note; else ""."""
    parts = out_dir.name.split(",")
    if len(parts) < 3 or not out_dir.parent.is_dir():
        return ""
    same = sorted(
        str(other) for other in out_dir.parent.glob(f"{parts[0]},*")
        if other != out_dir and sorted(other.name.split(",")) == sorted(parts) and latest_checkpoint(other)
    )  # fmt: skip
    return (
        f" (a run of the same overrides in another order has checkpoints: {', '.join(same)})" if same else ""
    )


def _open_run(cfg: RunConfig, world: World, out_dir: Path, dataset, start: int, ckpt, changes: list[str]):
    """Rank 0: config.yaml, the header, metrics.jsonl cut back to `start` -> (file, records).

    changes: optimizer settings of the config that a resume applied over the checkpoint's."""
    if not world.main:
        return None, []
    tc = cfg.train
    out_dir.mkdir(parents=True, exist_ok=True)
    params = count_parameters(cfg.model, cfg.moe)
    tqdm.write(f"{cfg.name}: {format_params(params.total)} parameters, {format_params(params.activated)} "
               f"activated; data: {dataset.source}; out_dir: {out_dir}")  # fmt: skip
    mixed = cfg.parallel.mixed_precision
    if world.size > 1:
        tqdm.write(f"parallel: {world.size} processes, mesh dp={world.shape.dp} x ep={world.shape.ep} "
                   "(FSDP2 over all ranks, experts over ep then FSDP2 over dp"
                   + ("; mixed precision: bf16 blocks, float32 router and gradient reduction)" if mixed else ")"))  # fmt: skip
    elif mixed:
        tqdm.write("parallel.mixed_precision: one process, no FSDP2: bf16 autocast on float32 weights")
    records = []
    if ckpt is not None:
        tqdm.write(f"resuming from {ckpt} (step {start})" + "".join(f"; applied {c}" for c in changes))
        data_changes = _data_changes(cfg, ckpt)
        if data_changes:
            tqdm.write(
                f"resuming with other data than the checkpoint's ({'; '.join(data_changes)}): "
                "another train/val split may hold validation chunks the run has trained on"
            )
        if start >= tc.steps:
            tqdm.write(
                f"train.steps: the checkpoint is at step {start}, train.steps={tc.steps}: nothing to train"
            )
        records = read_metrics(out_dir / METRICS, start)
        if changes or data_changes:
            record: dict = {"type": "resume", "step": start}
            record.update({"optimizer_changes": changes} if changes else {})
            record.update({"data_changes": data_changes} if data_changes else {})
            records.append(record)
    elif tc.resume:
        tqdm.write(f"train.resume: no checkpoint in {out_dir}; starting fresh" + _same_run_hint(out_dir))
    save_config(cfg, out_dir / "config.yaml")
    rewrite_metrics(out_dir / METRICS, records)  # atomic: drops what a killed run logged later
    metrics = open(out_dir / METRICS, "a", encoding="utf-8")  # noqa: SIM115 (held for the run)
    return metrics, records


@dataclass
class _Run:
    """What the loop carries between steps (metrics is None off rank 0)."""

    cfg: RunConfig
    world: World
    out_dir: Path
    dataset: TokenDataset
    model: MoGETransformer
    optimizer: torch.optim.Optimizer
    data_gen: torch.Generator
    metrics: TextIO | None
    val_loss: float | None = None
    monitor: CollapseMonitor | None = None  # routing-collapse statistics (the `monitor` section)
    last_routing: list | None = None  # the last micro-batch's MoGEOutputs, for the monitor

    def write(self, rec: dict) -> None:
        if self.metrics is not None:
            append_record(self.metrics, rec)


# ---------------------------------------------------------------- one step


def _clip(step: int, run: _Run) -> float:
    """Clip by the global norm (train.grad_clip; 0: only measure); NaN/Inf stops every rank."""
    norm = grad_norm(run.model, run.world)
    if not bool(torch.isfinite(norm)):  # before clipping would spread NaN to every gradient
        nonfinite_grads(step, run.model, run.world)
    max_norm = run.cfg.train.grad_clip
    # torch's clip scales by min(1, max_norm / (norm + 1e-6)): at 1 the pass over every
    # gradient changes nothing, so it is skipped (the same test, in the same float32).
    if max_norm > 0 and bool(max_norm / (norm + 1e-6) < 1.0):
        clip_grads_(run.model, max_norm, norm)
    return float(norm)


def _forward(run: _Run, batch: Batch, targets: bool = False):
    """The model on one micro-batch (with its targets: the loss), in the run's dtype."""
    device = run.world.device
    x_BL, y_BL = batch
    with autocast(device, run.cfg.train.dtype), warnings.catch_warnings():
        # FSDP2 cautions that a unit returns a view; nothing here modifies one in place.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module", category=UserWarning)
        return run.model(x_BL.to(device), y_BL.to(device) if targets else None, **batch.model_kwargs(device))


def _train_step(step: int, run: _Run) -> dict:
    """One optimiser step over this rank's grad_accum micro-batches; metrics are global means."""
    tc, world, model = run.cfg.train, run.world, run.model
    lr = lr_at(step, tc)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    device = world.device
    totals_3 = torch.zeros(3, dtype=torch.float64, device=device)
    routing_L3 = None
    batches = rank_batches(run.dataset, run.data_gen, tc.batch_size, tc.grad_accum, world.rank, world.size)
    if tc.grad_accum > 1 and any(
        layer.config.aux_loss_type == "global_batch" for layer in model.moe_layers()
    ):
        # Every micro-batch's global-batch loss needs the whole step's counts: count first.
        with counting_pass(model):
            for batch in batches:
                _forward(run, batch)
    for batch in batches:
        out = _forward(run, batch, targets=True)
        totals_3 += global_losses(
            step + 1, out, model, world
        )  # before backward: its exchanges need every rank
        sums = routing_sums(out).to(device)
        routing_L3 = sums if routing_L3 is None else routing_L3 + sums
        (out.loss / tc.grad_accum).backward()
    run.last_routing = out.routing
    assert routing_L3 is not None, "grad_accum >= 1 micro-batches ran"
    grad_norm_ = _clip(step + 1, run)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    micro = tc.grad_accum * world.size
    layers = list(model.moe_layers())
    routing = routing_record(layers, moe_blocks(model), world.all_reduce(routing_L3) / micro)
    for layer in layers:
        layer.end_step()  # aux-loss-free bias update from the step's load (every rank's)
    loss, lm_loss, aux_loss = (totals_3 / micro).tolist()
    return {"loss": loss, "lm_loss": lm_loss, "aux_loss": aux_loss, "lr": lr, "grad_norm": grad_norm_,
            "routing": routing}  # fmt: skip


def train_stepper(cfg: RunConfig) -> tuple[MoGETransformer, TokenDataset, Callable[[int], dict]]:
    """(model, dataset, step) of `moge train` for cfg on one process, without a run folder.

    step(i) takes 0-based optimiser step i exactly as the loop does (the same batches
    from data.seed, LR schedule, bf16 autocast, clipping, routing statistics, end_step)
    and returns its train record. For benchmarks that interleave several runs in one
    process (moge.tools.bench_sparsity); nothing is logged, evaluated or saved.
    """
    world = single_process(cfg.train.device)
    dataset = load_dataset(cfg.data)
    dataset.check_vocab_size(cfg.model.vocab_size)
    model, optimizer = _build(cfg, world)
    run = _Run(
        cfg,
        world,
        Path(os.devnull),
        dataset,
        model,
        optimizer,
        torch.Generator().manual_seed(cfg.data.seed),
        None,
    )
    return model, dataset, lambda step: _train_step(step, run)


# ---------------------------------------------------------------- the loop


def _save(run: _Run, step: int) -> None:
    agree(run.world, f"step {step}: checking the weights", lambda: check_weights(step, run.model))
    tc = run.cfg.train
    save_checkpoint(
        run.out_dir, step, run.model, run.optimizer, run.data_gen, run.cfg, tc.keep_last, run.world
    )


def _any_rank(world: World, flag: bool) -> bool:
    """Whether `flag` is set on any rank (a collective): SIGTERM may reach the ranks apart."""
    return bool(world.all_reduce(torch.tensor([int(flag)], dtype=torch.int32, device=world.device)).item())


def _after_step(run: _Run, rec: dict, stop_at: int | None, stopping: bool = False) -> None:
    """Rank 0 logs; every rank evaluates and joins the checkpoint, as train.* schedules."""
    tc, done, main = run.cfg.train, rec["step"], run.world.main
    run.write(rec)
    if main and (done % tc.log_every == 0 or done == tc.steps):
        tqdm.write(log_line(rec, tc.steps))
    if (tc.eval_every and done % tc.eval_every == 0) or done == tc.steps:
        run.val_loss = validation_loss(run.model, run.dataset, tc.batch_size, tc.eval_batches, tc.dtype)
        run.write({"type": "eval", "step": done, "val_loss": run.val_loss})
        if main:
            tqdm.write(f"step {done:>6}/{tc.steps} | val_loss {run.val_loss:.4f}")
    if (tc.save_every and done % tc.save_every == 0) or done in (tc.steps, stop_at) or stopping:
        _save(run, done)


def _from_rank0(world: World, values: tuple[float | None, ...]) -> list[float | None]:
    """Rank 0's values on every rank (a collective): only rank 0 reads metrics.jsonl, and
    a resumed run that trains no further step returns what it logged."""
    if world.size == 1:
        return list(values)
    t = torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float64, device=world.device)
    return [None if math.isnan(v) else v for v in world.broadcast(t).tolist()]


def _loop(run: _Run, start: int, stop_at: int | None, progress: bool, records: list[dict]) -> TrainResult:
    tc = run.cfg.train
    end = stop_at if stop_at is not None else tc.steps
    logged = (
        last(records, "train", "loss"),
        last(records, "eval", "val_loss"),
        last(records, "train", "elapsed_s"),
    )
    train_loss, run.val_loss, elapsed0 = _from_rank0(run.world, logged)
    elapsed0 = elapsed0 or 0.0
    tokens_per_step = tc.batch_size * tc.grad_accum * run.cfg.data.seq_len * run.world.size
    t0, train_time, tok_s = time.perf_counter(), 0.0, 0.0
    show = progress and run.world.main and sys.stderr.isatty()
    with (
        StopOnSigterm() as stop,
        tqdm(total=tc.steps, initial=start, disable=not show, dynamic_ncols=True) as bar,
    ):
        for step in range(start, end):
            t_step = time.perf_counter()
            rec = _train_step(step, run)
            train_time += time.perf_counter() - t_step
            tok_s = tokens_per_step * (step + 1 - start) / train_time
            train_loss = rec["loss"]
            rec = {"type": "train", "step": step + 1, **rec, "tokens_per_s": tok_s,
                   "elapsed_s": elapsed0 + time.perf_counter() - t0}  # fmt: skip
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.4f}", tok_s=f"{tok_s:,.0f}")
            stopping = _any_rank(run.world, stop.requested)  # SIGTERM: all ranks save this step, then stop
            _after_step(run, rec, stop_at, stopping)
            if run.world.main and run.monitor is not None:  # rank 0's routing, as in its train records
                assert run.last_routing is not None, "set by _train_step"
                run.monitor.after_step(step + 1, run.last_routing, run.write, tqdm.write)
            if stopping:
                stop.requested = True
                stop.stop_if_requested(step + 1, run.out_dir)
    # start > end only when resuming past stop_at; start == steps: a finished run, nothing to do.
    return TrainResult(max(end, start), train_loss, run.val_loss, run.out_dir, tok_s)


def _build(cfg: RunConfig, world: World) -> tuple[MoGETransformer, torch.optim.Optimizer]:
    """The model on the meta device, parallelized, then only this rank's shards allocated
    and initialised from train.seed (in one process: the whole model, the same way)."""
    torch.manual_seed(cfg.train.seed)
    with torch.device("meta"):
        model = MoGETransformer(cfg.model, cfg.moe)
    parallelize(model, world, cfg.parallel.static_splits, cfg.parallel.mixed_precision)
    materialize(model, world).train()  # the init seed: the first draw of the generator just seeded
    if cfg.train.compile:
        rng = torch.get_rng_state()
        _compile(cfg, world, model)
        torch.set_rng_state(rng)  # the compile probe draws random inputs: keep the stream
    return model, build_optimizer(model, cfg.train)


def _compile(cfg: RunConfig, world: World, model: MoGETransformer) -> None:
    """train.compile: the attention halves and the FFNs' elementwise work through
    torch.compile (moge.model.compiled)."""
    if world.size > 1:
        raise ValueError("train.compile: supported on one process only (FSDP2 shards are not compiled here)")
    dtype = torch.bfloat16 if cfg.train.dtype == "bfloat16" else None
    reason = compile_model(model, (cfg.train.batch_size, cfg.data.seq_len), dtype)
    if world.main:
        tqdm.write(
            "train.compile: "
            + (f"failed ({reason}); running eagerly" if reason else "attention and FFN elementwise compiled")
        )


def _train(cfg: RunConfig, world: World, progress: bool, stop_at: int | None) -> TrainResult:
    tc = cfg.train
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    out_dir = Path(tc.out_dir) if tc.out_dir is not None else Path("runs") / cfg.name
    _check_out_dir_path(out_dir)
    lock = RunLock(out_dir)  # rank 0 holds the run folder's lock for the life of the run
    try:
        return _train_locked(cfg, world, out_dir, lock, progress, stop_at)
    finally:
        lock.release()


def _load(world: World, ckpt: Path, model, optimizer, data_gen) -> tuple[int, list[str]]:
    """Resume: (step, the config's optimizer settings applied over the checkpoint's)."""
    wanted = optimizer_settings(optimizer)  # the config's; a resume applies and records them
    start = load_checkpoint(ckpt, model, optimizer, data_gen, world)
    return start, reapply_optimizer_settings(optimizer, wanted)


def _train_locked(
    cfg: RunConfig, world: World, out_dir: Path, lock: RunLock, progress: bool, stop_at: int | None
) -> TrainResult:
    tc = cfg.train

    def prepare():
        if world.main:
            lock.acquire()
            if lock.stale_pid is not None:
                tqdm.write(
                    f"{lock.path}: left by pid {lock.stale_pid}, which is no longer running; taken over"
                )
        check_train_fits(cfg, processes=world.size)  # sizes that cannot fit: refused before any allocation
        dataset = load_dataset(cfg.data)
        dataset.check_vocab_size(cfg.model.vocab_size)
        check_dataset_domains(dataset, cfg.moe)  # PanGu-Sigma: the data's domains are the model's
        ckpt = _prepare_out_dir(out_dir, tc.resume, world.main)
        if ckpt is not None:
            _check_same_architecture(cfg, ckpt)
        return dataset, ckpt

    # Also a barrier: every rank has looked at out_dir before rank 0 writes into it.
    dataset, ckpt = agree(world, "setting up", prepare)
    model, optimizer = _build(cfg, world)
    data_gen = torch.Generator().manual_seed(cfg.data.seed)
    start, changes = (0, []) if ckpt is None else _load(world, ckpt, model, optimizer, data_gen)
    metrics, records = agree(
        world, "opening the run folder", lambda: _open_run(cfg, world, out_dir, dataset, start, ckpt, changes)
    )
    try:
        run = _Run(cfg, world, out_dir, dataset, model, optimizer, data_gen, metrics)
        run.monitor = CollapseMonitor.for_model(cfg, model)
        run.monitor.resume(records)  # rank 0's records up to the checkpoint (none when fresh)
        return _loop(run, start, stop_at, progress, records)
    finally:
        if metrics is not None:
            metrics.close()


def train(cfg: RunConfig, *, progress: bool = True, stop_at: int | None = None) -> TrainResult:
    """Train `cfg` into train.out_dir (default runs/<name>); see the module docstring.

    stop_at: save a checkpoint and return after this many steps (the LR schedule still
    follows train.steps), so tests can interrupt a run and resume it. Under torchrun
    (WORLD_SIZE > 1) every rank calls this: it joins torchrun's process group (unless
    one is initialised) and leaves it at the end if it joined; every rank returns the
    same global metrics.
    """
    tc = cfg.train
    if stop_at is not None and not 1 <= stop_at <= tc.steps:
        raise ValueError(f"stop_at: expected 1..train.steps={tc.steps}, got {stop_at}")
    world = connect(cfg.parallel, cfg.moe.num_groups, tc.device)
    ok = False
    try:
        result = _train(cfg, world, progress, stop_at)
        ok = True
        return result
    finally:
        close(world, ok)
