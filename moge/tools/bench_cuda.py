"""The layer benchmark on a CUDA device (scripts/bench_cuda.py): forward + backward of the
MoGE layer against the dense SwiGLU of its activated width (the limit) and the peers of
moge/tools/bench_cases.py, timed with CUDA events, round-robin, median of the rounds.

Each timed sample is `calls` back-to-back training calls between two events, divided by
`calls`: the host queues work ahead as a training loop does, so a path that waits on the
device (a host sync) pays for it and one that does not, does not. Peak memory is the
CUDA allocator's high-water mark above its level before one call.

Legend: T tokens, D d_model, F expert hidden, E experts, M groups, K experts per token.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from moge._argtypes import integer, number
from moge.experts import resolve_impl
from moge.tools.bench_cases import (
    DTYPES,
    SHAPES,
    BenchShape,
    Case,
    NaiveLoopMoE,
    backward_of,
    dense_cases,
    hf_cases,
    layer_for,
    moge_case,
    plain_step,
    reset_grads,
    router_case,
    transformers_version,
)

# The CPU benchmark's two shapes, the default one at 16k and 64k tokens, and two layers
# of the sizes GPUs train: d=2048 with E=64, and the layer of configs/pangu-pro-moe-72b.yaml.
CUDA_SHAPES = {
    "default": SHAPES["small"],
    "large": SHAPES["large"],
    "default-16k": BenchShape(tokens=16384),
    "default-64k": BenchShape(tokens=65536),
    "d2048-e64": BenchShape(tokens=16384, d_model=2048, hidden=768, experts=64, groups=8, top_k=8),
    "pangu-72b": BenchShape(tokens=8192, d_model=5120, hidden=1344, experts=64, groups=8, top_k=8),
}


@dataclass
class CudaResult:
    """One case's samples (seconds per call) and peak memory at one (shape, dtype)."""

    name: str
    kind: str
    samples: list[float] = field(default_factory=list)
    peak_bytes: int = 0
    grad_bytes: int = 0
    error: str | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else math.nan


def cuda_cases(shape: BenchShape, dtype: torch.dtype, device: torch.device, peers: bool, seed: int = 0):
    """The limit, the layer as users get it (expert_impl auto), its router, and with peers
    the layer's other expert paths, the naive loop and the transformers blocks, on device."""
    auto = resolve_impl("auto", device, dtype)
    layer = layer_for(shape, "auto", dtype, seed)
    cases = dense_cases(shape, dtype, seed, fastest_only=True, device=device)
    cases += [moge_case(f"moge MoGELayer (auto: {auto})", layer), router_case(layer)]
    if peers:
        for impl in ("fused", "grouped_mm", "loop"):
            if impl != auto:
                cases.append(moge_case(f"moge MoGELayer ({impl})", layer_for(shape, impl, dtype, seed), True))
        naive = NaiveLoopMoE(layer_for(shape, "fused", dtype, seed))
        cases.append(Case("naive per-expert loop (MoGE router)", "peer", naive, plain_step(naive), True))
        version = transformers_version()
        if version is not None and int(version.split(".")[0]) >= 5:
            try:
                cases += hf_cases(shape, dtype, seed)
            except (TypeError, ValueError, AttributeError, ImportError) as err:  # another transformers
                print(f"transformers {version} blocks left out: {err}", flush=True)
    for c in cases:
        c.module.to(device)
    return cases


def _train_call(case: Case, x: Tensor, gy: Tensor) -> None:
    backward_of(*case.step(x.detach().requires_grad_()), gy)


def _seconds(device: torch.device, fn: Callable[[], None]) -> float:
    """Wall seconds of fn's device work: CUDA events on CUDA, the host clock elsewhere."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def _peak(case: Case, device: torch.device, x: Tensor, gy: Tensor) -> tuple[int, int]:
    """(peak bytes above the level before one call, bytes of the weight gradients it left)."""
    reset_grads(case)
    if device.type != "cuda":
        return 0, 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _train_call(case, x, gy)
    torch.cuda.synchronize()
    grads = sum(
        p.grad.numel() * p.grad.element_size() for p in case.module.parameters() if p.grad is not None
    )
    return torch.cuda.max_memory_allocated() - base, grads


def time_cuda(
    cases: list[Case], shape: BenchShape, dtype: torch.dtype, device: torch.device, rounds: int,
    calls: int, warmup: int, seed: int = 0,
) -> list[CudaResult]:  # fmt: skip
    """Round-robin (order rotated per round) samples of `calls` training calls each."""
    gen = torch.Generator().manual_seed(seed + 1)
    xs = [torch.randn(shape.tokens, shape.d_model, generator=gen).to(device, dtype) for _ in range(calls)]
    gys = [torch.randn(shape.tokens, shape.d_model, generator=gen).to(device, dtype) for _ in range(calls)]
    results = [CudaResult(c.name, c.kind) for c in cases]
    live = list(zip(cases, results))
    for r in range(warmup + rounds):
        k = r % len(live)
        for case, result in live[k:] + live[:k]:
            if result.error is not None:
                continue

            def run(case=case):
                for i in range(calls):
                    reset_grads(case)
                    _train_call(case, xs[i], gys[i])

            try:
                seconds = _seconds(device, run)
            except (RuntimeError, NotImplementedError) as err:  # a peer this torch cannot run
                if not case.optional:
                    raise
                result.error = str(err).splitlines()[0][:120]
                continue
            if r >= warmup:
                result.samples.append(seconds / calls)
    for case, result in live:
        if result.error is None:
            result.peak_bytes, result.grad_bytes = _peak(case, device, xs[0], gys[0])
    return results


# --- report ------------------------------------------------------------------------------------


def rows_of(results: list[CudaResult]) -> list[dict]:
    """One dict per case with its median and ratios to the limit (time and peak memory)."""
    limit = next(r for r in results if r.kind == "limit")
    layer = next(r for r in results if r.kind == "moge")
    rows = []
    for r in results:
        row = {"name": r.name, "kind": r.kind, "ms": r.median * 1e3, "error": r.error}
        if r.samples:
            q = (
                statistics.quantiles(r.samples, n=4, method="inclusive")
                if len(r.samples) > 1
                else [r.median] * 3
            )
            row |= {"ms_q1": q[0] * 1e3, "ms_q3": q[2] * 1e3, "x_limit": r.median / limit.median}
            row["x_moge"] = r.median / layer.median
            if r.peak_bytes and limit.peak_bytes:
                row["peak_mib"] = r.peak_bytes / 2**20
                row["peak_x_limit"] = r.peak_bytes / limit.peak_bytes
                act = limit.peak_bytes - limit.grad_bytes
                row["act_peak_x_limit"] = (r.peak_bytes - r.grad_bytes) / act if act > 0 else None
        rows.append(row)
    return rows


def format_table(title: str, rows: list[dict]) -> str:
    lines = [title, f"{'':60} {'ms':>9} {'[q1, q3]':>17} {'x limit':>8} {'peak MiB':>9} {'x lim':>6}"]
    for row in rows:
        if row.get("error"):
            lines.append(f"{row['name'][:60]:60} failed: {row['error']}")
            continue
        q = f"[{row['ms_q1']:.3f}, {row['ms_q3']:.3f}]"
        peak = f"{row['peak_mib']:9.0f} {row['peak_x_limit']:6.2f}" if "peak_mib" in row else ""
        lines.append(f"{row['name'][:60]:60} {row['ms']:9.3f} {q:>17} {row['x_limit']:8.2f} {peak}")
    return "\n".join(lines)


def summary_line(label: str, rows: list[dict]) -> dict:
    """The layer's ratios, its router's share, and the fastest transformers block's ratio."""
    layer = next(r for r in rows if r["kind"] == "moge")
    router = next((r for r in rows if r["kind"] == "part" and "x_limit" in r), None)
    hf = [r for r in rows if r["name"].startswith("transformers") and "x_limit" in r]
    best = min(hf, key=lambda r: r["x_limit"]) if hf else None
    return {
        "case": label,
        "layer_x_limit": layer["x_limit"],
        "router_share": None if router is None else router["ms"] / layer["ms"],
        "peak_x_limit": layer.get("peak_x_limit"),
        "best_transformers": None if best is None else best["name"],
        "best_transformers_x_limit": None if best is None else best["x_limit"],
    }


def device_info(device: torch.device) -> dict:
    info: dict[str, object] = {"torch": torch.__version__, "device": str(device)}
    info["transformers"] = transformers_version()
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info |= {
            "name": p.name,
            "memory_gib": round(p.total_memory / 2**30, 1),
            "sms": p.multi_processor_count,
        }
        info["tf32"] = torch.backends.cuda.matmul.allow_tf32
    return info


# --- command line ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench_cuda.py", description="The MoGE layer against the dense limit on a CUDA device."
    )
    p.add_argument("--device", default="cuda", help="cuda, or cpu to try the script without a GPU")
    p.add_argument("--shapes", default="default,large", help=f"comma-separated: {', '.join(CUDA_SHAPES)}")
    p.add_argument("--dtype", default="bf16,fp32", help="comma-separated: fp32, bf16")
    p.add_argument("--fp32-shapes", default=None, help="shapes also run in fp32 (default: all in --shapes)")
    p.add_argument("--rounds", type=integer, default=10, help="timed rounds (median of these)")
    p.add_argument("--calls", type=integer, default=5, help="training calls per timed sample")
    p.add_argument("--warmup", type=integer, default=2, help="untimed rounds first")
    p.add_argument("--no-peers", action="store_true", help="the limit, the layer and its router only")
    p.add_argument("--tokens", type=integer, default=None, help="override T of every shape")
    p.add_argument("--out", default=None, help="also write every row as JSON here")
    p.add_argument("--budget-s", type=number, default=None, help="start no new table after this many seconds")
    p.add_argument("--peer-shapes", default=None, help="shapes timed with the peers (default: all)")
    p.add_argument("--profile", default="", help="shapes whose limit and layer to profile after (bf16)")
    return p


def profile_call(
    case: Case, shape: BenchShape, dtype: torch.dtype, device: torch.device, rows: int = 18
) -> str:
    """torch.profiler's top ops (by device time on CUDA) of one training call, after two."""
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(9)
    x, gy = (torch.randn(shape.tokens, shape.d_model, generator=gen).to(device, dtype) for _ in range(2))
    for _ in range(2):
        reset_grads(case)
        _train_call(case, x, gy)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    reset_grads(case)
    with profile(activities=activities) as prof:
        _train_call(case, x, gy)
        if cuda:
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    head = f"{case.name}: {kernels} device kernels and copies in one call"
    return head + "\n" + prof.key_averages().table(sort_by=key, row_limit=rows)


def parse_names(text: str, valid, what: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in valid]
    if bad or not names:
        given = ", ".join(bad) if bad else repr(text)
        raise SystemExit(f"error: {what}: {given} not among {', '.join(valid)}")
    return names


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: torch sees no CUDA device (try --device cpu)")
    for name in ("rounds", "calls"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name}: must be >= 1")
    shapes = parse_names(args.shapes, CUDA_SHAPES, "--shapes")
    dtypes = parse_names(args.dtype, DTYPES, "--dtype")
    fp32_shapes = (
        shapes if args.fp32_shapes is None else parse_names(args.fp32_shapes, CUDA_SHAPES, "--fp32-shapes")
    )
    peer_shapes = (
        None if args.peer_shapes is None else parse_names(args.peer_shapes, CUDA_SHAPES, "--peer-shapes")
    )
    info = device_info(device)
    print(json.dumps(info), flush=True)
    report: dict = {"machine": info, "tables": [], "summary": []}
    start = time.perf_counter()
    for shape_name in shapes:
        if args.budget_s is not None and time.perf_counter() - start > args.budget_s:
            print(f"budget: {args.budget_s:g} s spent; skipped from {shape_name} on", flush=True)
            break
        shape = CUDA_SHAPES[shape_name]
        if args.tokens:
            shape = BenchShape(
                args.tokens, *(getattr(shape, f) for f in ("d_model", "hidden", "experts", "groups", "top_k"))
            )
        for dname in dtypes:
            if dname == "fp32" and shape_name not in fp32_shapes:
                continue
            t0 = time.perf_counter()
            peers = not args.no_peers and (peer_shapes is None or shape_name in peer_shapes)
            cases = cuda_cases(shape, DTYPES[dname], device, peers=peers)
            results = time_cuda(cases, shape, DTYPES[dname], device, args.rounds, args.calls, args.warmup)
            rows = rows_of(results)
            title = f"{shape_name} {shape.describe()} {dname} ({time.perf_counter() - t0:.0f} s)"
            print(format_table(title, rows) + "\n", flush=True)
            report["tables"].append(
                {"shape": shape_name, "describe": shape.describe(), "dtype": dname, "rows": rows}
            )
            report["summary"].append(summary_line(f"{shape_name} {dname}", rows))
            del cases, results
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(report, f, indent=1)
    for shape_name in parse_names(args.profile, CUDA_SHAPES, "--profile") if args.profile else []:
        shape = CUDA_SHAPES[shape_name]
        for case in cuda_cases(shape, torch.bfloat16, device, peers=False)[:2]:
            print(f"{shape_name} " + profile_call(case, shape, torch.bfloat16, device) + "\n", flush=True)
    print(f"{'summary':24} {'layer x limit':>13} {'router':>7} {'peak x':>7}  fastest transformers block")
    for s in report["summary"]:
        router = "" if s["router_share"] is None else f"{100 * s['router_share']:6.1f}%"
        peak = "" if s["peak_x_limit"] is None else f"{s['peak_x_limit']:7.2f}"
        hf = (
            ""
            if s["best_transformers"] is None
            else f"{s['best_transformers_x_limit']:.2f} {s['best_transformers']}"
        )
        print(f"{s['case']:24} {s['layer_x_limit']:13.2f} {router:>7} {peak:>7}  {hf}")
    return 0
