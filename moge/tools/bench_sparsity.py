"""What sparsity buys at this scale: validation loss of MoE models and of the dense model
of equal activated width, at equal steps or at equal wall time, trained side by side.

Legend: none (no tensors here).

The models: every config given (e.g. tiny-moge and tiny-moe) and the dense equivalent of
the first (moge.tools.bench_train.dense_equivalent: every FFN a SwiGLU of width
top_k * expert_hidden + the shared width). Each is built and stepped by `moge train`'s own
step (moge.training.loop.train_stepper): the same batches (data.seed), the same init seed,
its own LR schedule over its own number of steps, bf16 autocast where train.dtype says so.
The models take their steps round-robin, one each per round, so slow phases of the shared
machine hit all of them alike.

budget "steps": every model takes `steps` optimiser steps.
budget "seconds": `calibrate` timed steps of every model (round-robin, after 2 untimed
ones, on throwaway copies) give its median step time; each model then trains from its
init for floor(seconds / step time) steps (its schedule spans them), so each spends about
`seconds` of training time; the time each actually took is reported.
Validation: moge.training.metrics.validation_loss over train.eval_batches fixed windows.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from moge._argtypes import integer, number
from moge.model import count_parameters
from moge.tools.bench import cli_start, machine_info
from moge.tools.bench_report import machine_line
from moge.tools.bench_train import dense_equivalent
from moge.training.config import RunConfig, load_config
from moge.training.loop import train_stepper
from moge.training.metrics import validation_loss

BUDGETS = ("steps", "seconds")


@dataclass
class LossRun:
    """One model's run: its config (train.steps set), step function and timings."""

    name: str
    cfg: RunConfig
    step_s: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    val_loss: float | None = None


def _with_steps(cfg: RunConfig, steps: int) -> RunConfig:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))


def models(cfgs: list[RunConfig]) -> list[tuple[str, RunConfig]]:
    """(name, config) of every config as written, then the first one's dense equivalent."""
    named = [(f"{c.name} ({c.moe.router} router)", c) for c in cfgs]
    return named + [(f"dense, width of {cfgs[0].name}'s activated FFN", dense_equivalent(cfgs[0]))]


def calibrate(named: list[tuple[str, RunConfig]], steps: int, log: Callable[[str], None]) -> list[float]:
    """Median seconds per training step of every model (round-robin, 2 untimed steps first)."""
    steppers = [train_stepper(_with_steps(cfg, steps + 2))[2] for _, cfg in named]
    times: list[list[float]] = [[] for _ in named]
    for i in range(steps + 2):
        k = i % len(named)
        for j in list(range(k, len(named))) + list(range(k)):
            start = time.perf_counter()
            steppers[j](i)
            if i >= 2:
                times[j].append(time.perf_counter() - start)
        log(f"  calibration step {i + 1}/{steps + 2}")
    return [statistics.median(t) for t in times]


def run_sparsity_benchmark(
    cfgs: list[RunConfig],
    budget: str = "steps",
    steps: int = 600,
    seconds: float = 120.0,
    calibrate_steps: int = 10,
    log: Callable[[str], None] = print,
) -> dict:
    """Train every model (see the module docstring) and report its validation loss."""
    if budget not in BUDGETS:
        raise ValueError(f"budget: expected one of {', '.join(BUDGETS)}, got {budget!r}")
    if not cfgs:
        raise ValueError("configs: give at least one MoE config")
    if steps < 1 or seconds <= 0 or calibrate_steps < 1:
        raise ValueError(
            f"steps, calibrate_steps must be >= 1 and seconds > 0; got {steps}, {calibrate_steps}, {seconds}"
        )
    machine = machine_info()
    named = models(cfgs)
    step_time = None
    if budget == "seconds":
        step_time = calibrate(named, calibrate_steps, log)
        counts = [max(1, int(seconds / t)) for t in step_time]
    else:
        counts = [steps] * len(named)
    runs = [LossRun(name, _with_steps(cfg, n)) for (name, cfg), n in zip(named, counts)]
    built = [train_stepper(r.cfg) for r in runs]
    for i in range(max(counts)):
        k = i % len(runs)
        for j in list(range(k, len(runs))) + list(range(k)):
            if i < counts[j]:
                start = time.perf_counter()
                rec = built[j][2](i)
                runs[j].step_s.append(time.perf_counter() - start)
                runs[j].losses.append(rec["loss"])
        if (i + 1) % 50 == 0:
            log(f"  step {i + 1}/{max(counts)}")
    for r, (model, dataset, _) in zip(runs, built):
        tc = r.cfg.train
        r.val_loss = validation_loss(model, dataset, tc.batch_size, tc.eval_batches, tc.dtype)
    return {
        "machine": machine,
        "load_average_end": machine_info()["load_average"],
        "budget": budget,
        "steps": steps,
        "seconds": seconds,
        "calibrated_step_s": step_time,
        "rows": [_row(r) for r in runs],
    }


def _row(r: LossRun) -> dict:
    params = count_parameters(r.cfg.model, r.cfg.moe)
    tokens = r.cfg.train.batch_size * r.cfg.train.grad_accum * r.cfg.data.seq_len * len(r.step_s)
    train_s = sum(r.step_s)
    return {
        "name": r.name, "params": params.total, "activated": params.activated, "steps": len(r.step_s),
        "train_s": train_s, "tokens_per_s": tokens / train_s, "train_loss_last": r.losses[-1], "val_loss": r.val_loss,
        "eval_batches": r.cfg.train.eval_batches, "dtype": r.cfg.train.dtype,
    }  # fmt: skip


def format_sparsity_report(report: dict) -> str:
    m = report["machine"]
    if report["budget"] == "steps":
        what = f"equal steps ({report['steps']} each)"
    else:
        what = f"equal wall time ({report['seconds']:.0f} s of training each, steps from a calibration)"
    rows = report["rows"]
    lines = [
        f"validation loss at {what}; {rows[0]['dtype']}, {rows[0]['eval_batches']} val batches",
        machine_line(m),
        f"load average (1, 5, 15 min) at start: {m['load_average']}, at end: {report.get('load_average_end')}",
        f"{'model':52} {'params':>11} {'activated':>11} {'steps':>6} {'train s':>8} {'tokens/s':>9} "
        f"{'train loss':>10} {'val loss':>9}",
    ]
    for r in rows:
        lines.append(
            f"{r['name']:52} {r['params']:>11,} {r['activated']:>11,} {r['steps']:>6} {r['train_s']:>8.1f} "
            f"{r['tokens_per_s']:>9.0f} {r['train_loss_last']:>10.4f} {r['val_loss']:>9.4f}"
        )
    return "\n".join(lines)


def build_parser(prog: str = "bench_sparsity.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Validation loss of MoE configs and the dense model of equal activated width, "
        "at equal steps or equal wall time (CPU, one process).",
    )
    p.add_argument(
        "configs",
        nargs="*",
        default=["tiny-moge", "tiny-moe"],
        help="YAML run configs: paths or preset names (default: tiny-moge tiny-moe)",
    )
    p.add_argument(
        "--steps", type=integer, default=None, help="equal steps: N optimiser steps each (default 600)"
    )
    p.add_argument("--seconds", type=number, default=None, help="equal wall time: about S s of training each")
    p.add_argument(
        "--calibrate", type=integer, default=10, help="timed steps per model that set --seconds' steps"
    )
    p.add_argument("--threads", type=integer, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override for every config"
    )
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None, prog: str = "bench_sparsity.py") -> int:
    import sys

    args = build_parser(prog).parse_args(argv)
    try:
        log = cli_start(args.threads, args.quiet)
        if args.steps is not None and args.seconds is not None:
            raise ValueError("--steps and --seconds: give one budget, not both")
        cfgs = [load_config(path, args.set) for path in args.configs]
        budget = "seconds" if args.seconds is not None else "steps"
        # `is None`, not `or`: --steps 0 or --seconds 0 must reach the check, not a default.
        steps = 600 if args.steps is None else args.steps
        seconds = 1.0 if args.seconds is None else args.seconds
        report = run_sparsity_benchmark(cfgs, budget, steps, seconds, args.calibrate, log)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_sparsity_report(report), flush=True)
    return 0
