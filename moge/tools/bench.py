"""Layer benchmark: the MoGE layer against its dense limit and other MoE blocks.

Legend: T tokens, D d_model, F expert hidden, E experts, M groups, K experts per token.

The useful work of a MoE layer with T tokens and K experts of width F per token is
that of one dense SwiGLU of width K*F over the T tokens: that dense FFN, timed in
the same process, is the *limit* every row's ratio refers to. Peers: the plain
per-expert loop through autograd, the layer's own slower expert paths, and (when
transformers >= 5 is installed) the Hugging Face Qwen3-MoE, Mixtral and DeepSeek-V3
MoE blocks at the same sizes with their "eager" and "grouped_mm" expert code.

Method (the noise comes from other processes sharing the cores):
- consecutive calls get different inputs (up to 8 in rotation), so routing changes every
  call, as in training;
- implementations run round-robin, in a rotated order each round, so slow phases of
  the machine hit all of them; medians and the inter-quartile range are reported;
- forward time is the forward part of the same training call (graph recorded);
- peak memory is the highest net number of bytes torch's CPU allocator holds above
  its level at the start of one forward+backward call (gradients included), from
  the allocation and free events of torch.profiler(profile_memory=True): exact for
  tensors, blind to Python objects and to allocator slack;
- a peer (or torch's bf16 matmul on a CPU without bf16 instructions) whose single
  call is projected (a line through calls at T/16 and T/8 tokens) to exceed
  `max_call_seconds` (or, with `max_call_x`, that many times the dense limit's call,
  projected the same way) is skipped, with its projection printed; one above
  `slow_call_seconds` gets only `slow_rounds` samples (the n column).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor

from moge._argtypes import integer, integers, number
from moge.kernels.precision import float32_products, matmul_dtype
from moge.tools.bench_cases import (
    DTYPES,
    SHAPES,
    BenchShape,
    Case,
    backward_of,
    build_cases,
    dense_cases,
    layer_for,
    moge_case,
    reset_grads,
    router_case,
    transformers_version,
)
from moge.tools.bench_report import format_report

# --- measuring -------------------------------------------------------------------------------------


def _inputs(shape: BenchShape, dtype: torch.dtype, count: int, seed: int, tokens: int | None = None):
    gen = torch.Generator().manual_seed(seed + 1)
    T = tokens or shape.tokens
    xs = [torch.randn(T, shape.d_model, generator=gen).to(dtype) for _ in range(count)]
    gys = [torch.randn(T, shape.d_model, generator=gen).to(dtype) for _ in range(count)]
    return xs, gys


def _call(case: Case, x: Tensor, gy: Tensor) -> tuple[float, float, float]:
    """One training call: forward, backward. -> (forward seconds, forward+backward
    seconds, forward+backward seconds of process CPU time)."""
    x = x.detach().requires_grad_()
    c0, t0 = time.process_time(), time.perf_counter()
    y, extra = case.step(x)
    t1 = time.perf_counter()
    backward_of(y, extra, gy)
    t2, c2 = time.perf_counter(), time.process_time()
    return t1 - t0, t2 - t0, c2 - c0


@contextlib.contextmanager
def _native_stderr_silenced():
    """Kineto (torch's C++ profiler) writes "USDT: ... profiler_start/stop" straight to
    file descriptor 2 at every profile() start and stop, whatever KINETO_LOG_LEVEL says;
    point fd 2 at /dev/null meanwhile. Python-level writes to sys.stderr are unaffected
    unless they are flushed inside the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory_bytes(fn: Callable[[], object]) -> int:
    """Highest net bytes torch's CPU allocator holds above its level when fn starts.

    Replays the profiler's allocation (+) and free (-) events in time order; frees of
    tensors that existed before fn count too, so the peak is what fn needs on top.
    """
    from torch.profiler import ProfilerActivity, profile

    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    level = peak = 0
    for e in events:
        if e.device_type() == torch._C._autograd.DeviceType.CPU:
            level += e.nbytes()
            peak = max(peak, level)
    return peak


@dataclass
class Result:
    """Timings (seconds) of one case; `skipped` says why it has none."""

    name: str
    kind: str
    dtype: str
    tokens: int
    fwd_s: list = field(default_factory=list)
    fb_s: list = field(default_factory=list)
    fb_cpu_s: list = field(default_factory=list)  # process CPU time of the same calls
    peak_bytes: int | None = None
    grad_bytes: int = 0  # the weight gradients inside peak_bytes (a MoE has E/K times the limit's)
    skipped: str = ""
    optional: bool = False

    @staticmethod
    def _quartiles(v: list) -> tuple[float, float, float]:
        if len(v) == 1:
            return v[0], v[0], v[0]
        q = statistics.quantiles(v, n=4, method="inclusive")
        return q[0], statistics.median(v), q[2]

    @property
    def fb_median(self) -> float:
        return statistics.median(self.fb_s) if self.fb_s else math.nan

    @property
    def fb_cpu_median(self) -> float:
        return statistics.median(self.fb_cpu_s) if self.fb_cpu_s else math.nan

    @property
    def fwd_median(self) -> float:
        return statistics.median(self.fwd_s) if self.fwd_s else math.nan

    def summary(self) -> dict:
        d = {"name": self.name, "kind": self.kind, "optional": self.optional, "dtype": self.dtype,
             "tokens": self.tokens, "samples": len(self.fb_s)}  # fmt: skip
        if self.skipped:
            d["skipped"] = self.skipped
            return d
        for key, v in (("fwd", self.fwd_s), ("fwd_bwd", self.fb_s), ("fwd_bwd_cpu", self.fb_cpu_s)):
            q1, med, q3 = self._quartiles(v)
            d[f"{key}_ms"] = {
                "median": med * 1e3,
                "q1": q1 * 1e3,
                "q3": q3 * 1e3,
                "min": min(v) * 1e3,
                "max": max(v) * 1e3,
            }
        d["tokens_per_s"] = self.tokens / self.fb_median
        d["peak_mb"] = None if self.peak_bytes is None else self.peak_bytes / 2**20
        d["grad_mb"] = self.grad_bytes / 2**20
        return d


def project_seconds(t16: float, t8: float) -> float:
    """One call at T from calls at T/16 and T/8: a straight line through both points.

    Some peers have a large fixed cost per call (autograd's full-size zero gradient per
    expert does not shrink with T), so scaling the T/8 time by 8 would overestimate
    them several times over; the line keeps that cost fixed. Never below t8.
    """
    return max(t8, t8 + (t8 - t16) * 14)  # T = T/8 + 14 * (T/8 - T/16)


def _probe(case: Case, shape: BenchShape, dtype: torch.dtype, seed: int) -> float:
    """Projected seconds of one call at T (see project_seconds), after a warm-up call."""
    times = {}
    for div in (16, 16, 8):  # the first call warms up
        xs, gys = _inputs(shape, dtype, 1, seed + 7, tokens=max(shape.tokens // div, 1))
        reset_grads(case)
        times[div] = _call(case, xs[0], gys[0])[1]
    return project_seconds(times[16], times[8])


def time_cases(
    cases: list[Case], shape: BenchShape, dtype: torch.dtype, iters: int, warmup: int,
    max_call_seconds: float, seed: int = 0, memory: bool = True, log: Callable[[str], None] = lambda s: None,
    slow_call_seconds: float = 10.0, slow_rounds: int = 3, label: str | None = None,
    max_call_x: float | None = None,
) -> list[Result]:  # fmt: skip
    """Round-robin timing of every case (rotated order per round), then peak memory.

    An optional case (peers; torch's bf16 matmul where the CPU lacks bf16) projected
    above max_call_seconds per call, or above max_call_x times the fastest dense
    limit's call (projected alike; None: no such bound), is skipped; one above
    slow_call_seconds joins only `slow_rounds` timed rounds and no warm-up round (its
    probe calls warmed it up). Every other case runs every round.
    """
    name = label or next(k for k, v in DTYPES.items() if v == dtype)
    results = [Result(c.name, c.kind, name, shape.tokens, optional=c.optional) for c in cases]
    bound, why = max_call_seconds, f"max_call_seconds={max_call_seconds:g}"
    if max_call_x is not None:
        limit_s = min((_probe(c, shape, dtype, seed) for c in cases if c.kind == "limit"), default=math.inf)
        if max_call_x * limit_s < bound:
            bound, why = max_call_x * limit_s, f"max_call_x={max_call_x:g} times the limit's ~{limit_s:.1f} s"
    live, rounds = [], {}
    for c, r in zip(cases, results):
        if not c.optional:  # the limit and the layer always get every round
            rounds[c.name] = (0, warmup + iters)
            live.append((c, r))
            continue
        projected = _probe(c, shape, dtype, seed)
        if projected > bound:
            r.skipped = f"one call projected at ~{projected:.0f} s from T/16 and T/8 (> {why})"
            log(f"  skip {c.name}: {r.skipped}")
            continue
        slow = projected > slow_call_seconds
        rounds[c.name] = (warmup, warmup + min(iters, slow_rounds)) if slow else (0, warmup + iters)
        live.append((c, r))
    xs, gys = _inputs(shape, dtype, min(iters + warmup, 8), seed)
    for i in range(warmup + iters):
        k = i % max(len(live), 1)
        for c, r in live[k:] + live[:k]:
            first, stop = rounds[c.name]
            if not first <= i < stop:
                continue
            reset_grads(c)
            fwd, fb, cpu = _call(c, xs[i % len(xs)], gys[i % len(gys)])
            if i >= warmup:
                r.fwd_s.append(fwd)
                r.fb_s.append(fb)
                r.fb_cpu_s.append(cpu)
        log(f"  {name} T={shape.tokens} round {i + 1}/{warmup + iters} done")
    if memory:
        for c, r in live:
            reset_grads(c)
            r.peak_bytes = peak_memory_bytes(partial(_call, c, xs[0], gys[0]))
            # The weight gradients that call left (the router-only row leaves the experts' None).
            r.grad_bytes = sum(
                p.grad.numel() * p.grad.element_size() for p in c.module.parameters() if p.grad is not None
            )
    return results


# --- the whole benchmark ------------------------------------------------------------------------


def cli_start(threads: int | None, quiet: bool) -> Callable[[str], None]:
    """What every benchmark CLI does first: torch's thread count (None: torch's own), and
    the progress log (to stderr; a no-op when quiet)."""
    import sys

    if threads is not None and threads < 1:
        raise ValueError(f"threads: must be >= 1, got {threads}")
    if threads:
        torch.set_num_threads(threads)
    return (lambda s: None) if quiet else (lambda s: print(s, file=sys.stderr, flush=True))


def machine_info() -> dict:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cpu = torch.device("cpu")
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_features": cpu_features(),
        "bf16_products": "native"
        if matmul_dtype(cpu, torch.bfloat16) == torch.bfloat16
        else "fp32 (no bf16 matrix instructions)",
        "transformers": transformers_version(),
        "python": platform.python_version(),
        "load_average": _load_average(),
    }


# The instruction-set flags that decide which kernels the products get.
_FEATURES = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


def cpu_features() -> str:
    """The matrix-relevant flags of /proc/cpuinfo that this CPU has, e.g. "avx2 avx512f
    avx512_bf16 (no amx_bf16)"; "unknown" where /proc/cpuinfo is not readable."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return "unknown"
    have = [name for name in _FEATURES if name in flags]
    return " ".join(have) + ("" if "amx_bf16" in flags else " (no amx_bf16)")


def _load_average() -> str | None:
    """1, 5 and 15 minute load averages: other processes on the cores skew every timing."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return None


def _limit(results: list[Result]) -> float:
    """The fastest dense variant's forward+backward median (the ratio denominator)."""
    meds = [r.fb_median for r in results if r.kind == "limit" and r.fb_s]
    return min(meds) if meds else math.nan


def _limit_cpu(results: list[Result]) -> float:
    """The same dense variant's median in process CPU time."""
    limit = _limit(results)
    return next((r.fb_cpu_median for r in results if r.kind == "limit" and r.fb_median == limit), math.nan)


# bf16 storage with the products forced to float32 (precision.float32_products): the
# path a CPU without bf16 matrix instructions takes, measured on one that has them.
FORCED_FP32 = "bf16/f32"
DTYPE_NAMES = (*DTYPES, FORCED_FP32)


def _dtype(name: str) -> tuple[torch.dtype, Callable[[], contextlib.AbstractContextManager]]:
    """(storage dtype, the context to build and time it in) of a name of DTYPE_NAMES."""
    if name == FORCED_FP32:
        return torch.bfloat16, float32_products
    return DTYPES[name], contextlib.nullcontext


def run_layer_benchmark(
    shape: BenchShape = SHAPES["small"],
    dtypes: tuple[str, ...] = ("fp32", "bf16"),
    iters: int = 10,
    warmup: int = 2,
    peers: bool = True,
    sweep_tokens: tuple[int, ...] = (),
    max_call_seconds: float = 120.0,
    seed: int = 0,
    log: Callable[[str], None] = lambda s: None,
    compiled: bool = False,
    small_shapes: bool = False,
    max_call_x: float | None = None,
) -> dict:
    """Time every implementation at `shape` for each dtype name (DTYPE_NAMES), and
    optionally a token sweep and the small-shapes table (SMALL_SHAPES: the toy
    configs' layers).

    Returns a JSON-able report: machine, shape, per-dtype rows (each with its ratio to
    the dense limit, in wall and in CPU time), notes, the sweep (dense limit and MoGE
    layer per T) and the small-shapes rows per dtype.
    """
    for d in dtypes:
        if d not in DTYPE_NAMES:
            raise ValueError(f"dtype: expected some of {', '.join(DTYPE_NAMES)}; got {d!r}")
    if iters < 1:
        raise ValueError(f"iters: must be >= 1 (timed rounds), got {iters}")
    if warmup < 0:
        raise ValueError(f"warmup: must be >= 0 (untimed rounds), got {warmup}")
    if not max_call_seconds > 0:
        raise ValueError(f"max_call_seconds: must be > 0, got {max_call_seconds}")
    if any(T < 1 for T in sweep_tokens):
        raise ValueError(f"sweep_tokens: every T must be >= 1, got {','.join(map(str, sweep_tokens))}")
    if max_call_x is not None and not max_call_x > 0:
        raise ValueError(f"max_call_x: must be > 0 (a multiple of the dense limit's call), got {max_call_x}")
    report: dict[str, Any] = {"machine": machine_info(), "shape": asdict(shape), "iters": iters,
                              "warmup": warmup, "max_call_seconds": max_call_seconds,
                              "max_call_x": max_call_x, "tables": {},
                              "notes": [], "sweep": {}, "small_shapes": {}}  # fmt: skip
    cpu = torch.device("cpu")
    if FORCED_FP32 in dtypes and matmul_dtype(cpu, torch.bfloat16) != torch.bfloat16:
        dtypes = tuple(d for d in dtypes if d != FORCED_FP32)
        report["notes"].append(f"{FORCED_FP32} left out: bf16 products already run in float32 on this CPU")
    for d in dtypes:
        dtype, context = _dtype(d)
        with context():
            # Forced: torch's own bf16 matmul still runs natively, so only the float32-products
            # dense SwiGLU is the limit; the peers would repeat the bf16 table's rows.
            forced = d == FORCED_FP32
            cases, notes = build_cases(shape, dtype, peers and not forced, seed, compiled, forced)
            report["notes"] = sorted(set(report["notes"] + notes))
            log(f"{d}: {len(cases)} implementations, {shape.describe()}")
            results = time_cases(cases, shape, dtype, iters, warmup, max_call_seconds, seed,
                                 log=log, label=d, max_call_x=max_call_x)  # fmt: skip
        report["tables"][d] = _with_ratios(results)
    for d in dtypes if sweep_tokens else ():
        report["sweep"][d] = _sweep(shape, d, sweep_tokens, iters, max_call_seconds, seed, log)
    for d in dtypes if small_shapes else ():
        report["small_shapes"][d] = _shape_table(SMALL_SHAPES, d, iters, max_call_seconds, seed, log)
    report["load_average_end"] = _load_average()
    return report


def _with_ratios(results: list[Result]) -> list[dict]:
    limit, limit_cpu = _limit(results), _limit_cpu(results)
    layer = next((r.fb_median for r in results if r.kind == "moge" and r.fb_s), math.nan)
    layer_cpu = next((r.fb_cpu_median for r in results if r.kind == "moge" and r.fb_s), math.nan)
    # Memory is compared with the same row as time: the fastest dense variant.
    dense = next((r for r in results if r.kind == "limit" and r.fb_median == limit), None)
    dense_peak = None if dense is None else dense.peak_bytes
    rows = []
    for r in results:
        row = r.summary()
        if r.fb_s:
            row["x_limit"] = r.fb_median / limit
            row["fwd_x_limit"] = r.fwd_median / next(
                x.fwd_median for x in results if x.kind == "limit" and x.fb_median == limit
            )
            row["x_moge"] = r.fb_median / layer
            row["x_limit_cpu"] = r.fb_cpu_median / limit_cpu
            row["x_moge_cpu"] = r.fb_cpu_median / layer_cpu
            row["peak_x_limit"] = None if not (dense_peak and r.peak_bytes) else r.peak_bytes / dense_peak
            # The same without the weight gradients: what the dispatch and activations need.
            act = (
                None
                if dense is None or not (dense_peak and r.peak_bytes)
                else (r.peak_bytes - r.grad_bytes) / (dense_peak - dense.grad_bytes)
            )
            row["act_peak_x_limit"] = act
        rows.append(row)
    return rows


# The layers of configs/tiny-moge.yaml (d=f=128, T=16*128) and small-moge.yaml (d=f=256,
# T=16*256), each at T=1024..4096: E=16 M=4 K=4 as in those configs.
SMALL_SHAPES = tuple(BenchShape(T, d, d, 16, 4, 4) for d in (128, 256) for T in (1024, 2048, 4096))


def rounds_for(shape: BenchShape, iters: int) -> int:
    """Timed rounds at a shape cheaper than the default one: more of them (up to 8x
    `iters`, in proportion to T*d*f), so that its median is as steady for about the
    same time as the default shape's."""
    base = SHAPES["small"]
    work = shape.tokens * shape.d_model * shape.hidden
    scale = base.tokens * base.d_model * base.hidden / max(work, 1)
    return iters * max(1, min(8, int(scale)))


def _shape_table(
    shapes: tuple[BenchShape, ...], name: str, iters: int, max_call: float, seed: int, log
) -> list[dict]:
    """The dense limit, the MoGE layer and its router at every shape: one row each."""
    rows = []
    dtype, context = _dtype(name)
    for s in shapes:
        with context():
            layer = layer_for(s, "fused", dtype, seed)
            cases = dense_cases(s, dtype, seed, fastest_only=True) + [
                moge_case("moge MoGELayer (fused, default)", layer),
                router_case(layer),
            ]
            n = rounds_for(s, iters)
            log(f"small shapes ({name}): {s.describe()}, {n} rounds")
            results = time_cases(cases, s, dtype, n, 2, max_call, seed, log=log, label=name)
        rows.append({"shape": asdict(s), "rounds": n, "rows": _with_ratios(results)})
    return rows


def _sweep(
    shape: BenchShape,
    name: str,
    tokens: tuple[int, ...],
    iters: int,
    max_call: float,
    seed: int,
    log,
) -> list[dict]:
    """Dense limit(s) and the MoGE layer at every T: time per call and per 1k tokens."""
    rows = []
    dtype, context = _dtype(name)
    for T in tokens:
        s = BenchShape(T, shape.d_model, shape.hidden, shape.experts, shape.groups, shape.top_k)
        with context():
            layer = layer_for(s, "fused", dtype, seed)
            cases = dense_cases(s, dtype, seed, fastest_only=True) + [
                moge_case("moge MoGELayer (fused, default)", layer)
            ]
            n = max(3, min(iters, iters * 4096 // T))
            log(f"sweep ({name}) T={T}: {n} rounds")
            results = time_cases(cases, s, dtype, n, 1, max_call, seed, log=log, label=name)
        rows.append({"tokens": T, "rows": _with_ratios(results)})
    return rows


# --- command line (scripts/bench_layer.py and `moge bench` forward here) ---------------------------


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to a help text unless it already says its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if "(default" in text else super()._get_help_string(action) or text


def build_parser(
    prog: str = "bench_layer.py",
    parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser,
    formatter_class: type[argparse.HelpFormatter] = _DefaultsFormatter,
) -> argparse.ArgumentParser:
    # `moge bench` passes its own classes: one-line errors and "(default: ...)" in every help.
    p = parser_class(
        prog=prog,
        description="Time the MoGE layer against the dense SwiGLU limit and MoE peers (CPU).",
        formatter_class=formatter_class,
    )
    p.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="small",
        help="preset sizes (large: E=64 M=8 K=8 d=1024 f=512)",
    )
    for flag, key in (("--tokens", "tokens"), ("--d-model", "d_model"), ("--hidden", "hidden"),
                      ("--experts", "experts"), ("--groups", "groups"), ("--top-k", "top_k")):  # fmt: skip
        p.add_argument(
            flag, type=integer, default=None, help=f"override the preset's {key} (default: the preset's)"
        )
    p.add_argument(
        "--dtype",
        default=f"fp32,bf16,{FORCED_FP32}",
        help=f"comma-separated: fp32, bf16, {FORCED_FP32} (bf16 with the products forced to float32, "
        "as on CPUs without bf16 matrix instructions; left out on those CPUs, where bf16 already is that)",
    )
    p.add_argument(
        "--iters", type=integer, default=10, help="timed rounds (each runs every implementation once)"
    )
    p.add_argument("--warmup", type=integer, default=2, help="untimed rounds before the timed ones")
    p.add_argument(
        "--no-peers", action="store_true", help="only the dense limit, the MoGE layer and its router"
    )
    p.add_argument(
        "--compiled", action="store_true", help="also the layer with torch.compile'd elementwise work"
    )
    p.add_argument(
        "--sweep-tokens", type=integers, default=(), help="e.g. 1024,4096,16384,65536: linearity curve"
    )
    p.add_argument(
        "--small-shapes",
        action="store_true",
        help="also the table of the tiny/small configs' layers (d=f=128 and 256, T=1024..4096, E=16)",
    )
    p.add_argument(
        "--threads",
        type=integer,
        default=None,
        help="torch threads (default: torch's own); 1 is steadier on cores shared with other work",
    )
    p.add_argument(
        "--max-call-seconds", type=number, default=120.0, help="skip rows whose one call is projected slower"
    )
    p.add_argument(
        "--max-call-x",
        type=number,
        default=None,
        help="also skip rows whose one call is projected slower than this many times the dense limit's "
        "(e.g. 2.5 keeps the grouped_mm peers and leaves out the per-expert loops; default: no such bound)",
    )
    p.add_argument("--seed", type=integer, default=0, help="seed of the inputs and weights")
    p.add_argument("--json", default=None, help="also write the full report to this file (default: none)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def main(argv: list[str] | None = None, prog: str = "bench_layer.py", **parser_classes) -> int:
    """Parse options, run the benchmark, print the table. Returns the exit status.

    parser_classes: build_parser's parser_class / formatter_class (`moge bench` passes its own).
    """
    import sys

    args = build_parser(prog, **parser_classes).parse_args(argv)
    base = asdict(SHAPES[args.shape])
    for key in base:
        if getattr(args, key) is not None:
            base[key] = getattr(args, key)
    try:
        log = cli_start(args.threads, args.quiet)
        shape = BenchShape(**base)
        dtypes = tuple(d.strip() for d in args.dtype.split(",") if d.strip())
        report = run_layer_benchmark(
            shape, dtypes, args.iters, args.warmup, not args.no_peers, args.sweep_tokens,
            args.max_call_seconds, args.seed, log, args.compiled, args.small_shapes, args.max_call_x,
        )  # fmt: skip
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0
