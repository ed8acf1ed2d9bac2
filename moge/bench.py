"""Layer benchmark: the MoGE layer against its dense limit and other MoE blocks.

Legend: T tokens, D d_model, F expert hidden, E experts, M groups, K experts per token.

The useful work of a MoE layer with T tokens and K experts of width F per token is
that of one dense SwiGLU of width K*F over the T tokens: that dense FFN, timed in
the same process, is the *limit* every row's ratio refers to. Peers: the plain
per-expert loop through autograd, the layer's own slower expert paths, and (when
transformers >= 5 is installed) the Hugging Face Qwen3-MoE, Mixtral and DeepSeek-V3
MoE blocks at the same sizes with their "eager" and "grouped_mm" expert code.

Method (the noise comes from other processes sharing the cores):
- every call gets a different input, so routing changes every call, as in training;
- implementations run round-robin, in a rotated order each round, so slow phases of
  the machine hit all of them; medians and the inter-quartile range are reported;
- forward time is the forward part of the same training call (graph recorded);
- peak memory is the highest net number of bytes torch's CPU allocator holds above
  its level at the start of one forward+backward call (gradients included), from
  the allocation and free events of torch.profiler(profile_memory=True): exact for
  tensors, blind to Python objects and to allocator slack;
- a peer (or torch's bf16 matmul on a CPU without bf16 instructions) whose single
  call is projected (from a call at T/8 tokens) to exceed
  `max_call_seconds` is skipped, with its projection printed; one above
  `slow_call_seconds` gets only `slow_rounds` samples (the n column).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F_
from torch import Tensor, nn

from moge.experts import matmul_dtype
from moge.layer import MoGEConfig, MoGELayer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class BenchShape:
    """Sizes of one benchmark: tokens, d_model, expert hidden, experts, groups, top-k."""

    tokens: int = 4096
    d_model: int = 512
    hidden: int = 256
    experts: int = 16
    groups: int = 4
    top_k: int = 4

    def __post_init__(self) -> None:
        for name in ("tokens", "d_model", "hidden", "experts", "groups", "top_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.experts % self.groups or self.top_k % self.groups:
            raise ValueError(f"groups: {self.groups} must divide experts={self.experts} and top_k={self.top_k}")

    def describe(self) -> str:
        s = self
        return f"T={s.tokens} d={s.d_model} f={s.hidden} E={s.experts} M={s.groups} K={s.top_k}"


SHAPES = {
    "small": BenchShape(),
    "large": BenchShape(tokens=4096, d_model=1024, hidden=512, experts=64, groups=8, top_k=8),
}


# --- what is timed: a Case maps an input to (output, extra loss) -----------------------------


@dataclass
class Case:
    """One implementation. step(x) -> (y, extra loss or None); backward seeds y and adds the loss."""

    name: str
    kind: str  # "limit", "moge", "peer" or "part"
    module: nn.Module
    step: Callable[[Tensor], tuple[Tensor, Optional[Tensor]]]
    optional: bool = False  # may be skipped, or sampled less, when one call is slow


class DenseSwiGLU(nn.Module):
    """The limit: a plain dense SwiGLU of width K*F with nn.Linear, as most code writes it.

    products_fp32=True runs the products in float32 on up-cast operands (for a dtype the
    CPU has no matrix instructions for), with storage and output still in the dtype.
    """

    def __init__(self, d_model: int, hidden: int, products_fp32: bool = False) -> None:
        super().__init__()
        self.w_gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)
        self.products_fp32 = products_fp32

    def _lin(self, x: Tensor, w: Tensor) -> Tensor:
        if self.products_fp32:
            return F_.linear(x.float(), w.float()).to(x.dtype)
        return F_.linear(x, w)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self._lin(x, self.w_gate_up.weight).chunk(2, dim=-1)
        return self._lin(F_.silu(gate) * up, self.w_down.weight)


class NaiveLoopMoE(nn.Module):
    """The per-expert loop most codebases use, through autograd, with a MoGE router.

    For every expert: find its (token, slot) pairs, index the tokens, run the SwiGLU,
    index_add the gated output. Shares the weights of `layer`.
    """

    def __init__(self, layer: MoGELayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x_TD: Tensor) -> Tensor:
        layer = self.layer
        out = layer.route_tokens(x_TD, None, tuple(x_TD.shape[:-1]))
        w1, w2 = layer.experts.w_gate_up_EDH, layer.experts.w_down_EFD
        F = w2.shape[1]
        y_TD = torch.zeros_like(x_TD)
        for e in range(w1.shape[0]):
            tok, slot = (out.expert_ids == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            gate, up = (x_TD[tok] @ w1[e]).split(F, dim=-1)
            y = (F_.silu(gate) * up) @ w2[e]
            y_TD = y_TD.index_add(0, tok, y * out.weights[tok, slot, None].to(y.dtype))
        return y_TD


def _init_(module: nn.Module, std: float = 0.02, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


def _moge_case(name: str, layer: MoGELayer, optional: bool = False) -> Case:
    def step(x: Tensor):
        out = layer(x)
        return out.hidden, out.aux_loss

    return Case(name, "moge", layer, step, optional)


def _router_case(layer: MoGELayer) -> Case:
    def step(x: Tensor):
        out = layer.route_tokens(x, None, tuple(x.shape[:-1]))
        return out.weights, out.aux_loss

    return Case("moge router only (logits, softmax, grouped top-k, losses, load)", "part", layer, step)


# --- transformers peers ------------------------------------------------------------------------


def _transformers_version() -> Optional[str]:
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


def _hf_blocks(shape: BenchShape) -> list[tuple[str, Callable[[str], nn.Module]]]:
    """(name, build(experts_implementation) -> block) for the three HF MoE blocks."""
    from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    from transformers.models.mixtral.configuration_mixtral import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    s = shape

    def qwen(impl: str) -> nn.Module:
        cfg = Qwen3MoeConfig(
            hidden_size=s.d_model, moe_intermediate_size=s.hidden, num_experts=s.experts,
            num_experts_per_tok=s.top_k, norm_topk_prob=False,
        )  # fmt: skip
        cfg._experts_implementation = impl
        return Qwen3MoeSparseMoeBlock(cfg)

    def mixtral(impl: str) -> nn.Module:
        cfg = MixtralConfig(
            hidden_size=s.d_model, intermediate_size=s.hidden, num_local_experts=s.experts,
            num_experts_per_tok=s.top_k, router_jitter_noise=0.0,
        )  # fmt: skip
        cfg._experts_implementation = impl
        return MixtralSparseMoeBlock(cfg)

    def deepseek(impl: str) -> nn.Module:
        # No shared expert (n_shared_experts=0 builds a zero-width one, which costs ~0),
        # so every block does the same routed work. Groups as MoGE's, keep half of them.
        cfg = DeepseekV3Config(
            hidden_size=s.d_model, moe_intermediate_size=s.hidden, n_routed_experts=s.experts,
            num_experts_per_tok=s.top_k, n_group=s.groups, topk_group=max(1, s.groups // 2),
            n_shared_experts=0, routed_scaling_factor=1.0,
        )  # fmt: skip
        cfg._experts_implementation = impl
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
            return DeepseekV3MoE(cfg)

    return [("Qwen3-MoE", qwen), ("Mixtral", mixtral), ("DeepSeek-V3", deepseek)]


def _hf_cases(shape: BenchShape, dtype: torch.dtype, seed: int) -> list[Case]:
    cases = []
    for name, build in _hf_blocks(shape):
        for impl in ("eager", "grouped_mm"):
            block = _init_(build(impl), seed=seed).to(dtype)

            def step(x: Tensor, block=block):
                return block(x.unsqueeze(0)).squeeze(0), None

            cases.append(Case(f"transformers {name} ({impl})", "peer", block, step, optional=True))
    return cases


# --- building the cases of one (shape, dtype) --------------------------------------------------


def _layer(shape: BenchShape, impl: str, dtype: torch.dtype, seed: int) -> MoGELayer:
    torch.manual_seed(seed)
    cfg = MoGEConfig(
        d_model=shape.d_model, num_experts=shape.experts, num_groups=shape.groups, top_k=shape.top_k,
        expert_hidden=shape.hidden, expert_impl=impl,
    )  # fmt: skip
    return MoGELayer(cfg).to(dtype)


def dense_cases(shape: BenchShape, dtype: torch.dtype, seed: int = 0, fastest_only: bool = False) -> list[Case]:
    """The dense limit. In a dtype the CPU has no matrix instructions for, the fp32
    products variant is the limit and torch's own (slow) matmul an optional row."""
    width = shape.top_k * shape.hidden
    upcast = matmul_dtype(torch.device("cpu"), dtype) != dtype
    variants = [] if upcast and fastest_only else [(False, f"dense SwiGLU width K*f={width} (torch matmul)")]
    if upcast:
        variants.append((True, f"dense SwiGLU width K*f={width} (fp32 products)"))
    cases = []
    for fp32, name in variants:
        dense = _init_(DenseSwiGLU(shape.d_model, width, fp32), seed=seed).to(dtype)
        cases.append(Case(name, "limit", dense, lambda x, m=dense: (m(x), None), optional=upcast and not fp32))
    return cases


def build_cases(
    shape: BenchShape, dtype: torch.dtype, peers: bool, seed: int = 0, compiled: bool = False
) -> tuple[list[Case], list[str]]:
    """Every implementation at `shape` in `dtype`, and notes on what was left out."""
    cases = dense_cases(shape, dtype, seed)
    fused = _layer(shape, "fused", dtype, seed)
    cases.append(_moge_case("moge MoGELayer (fused, default)", fused))
    cases.append(_router_case(fused))
    notes = []
    if compiled:
        layer = _layer(shape, "fused", dtype, seed)
        layer.experts.compile_elementwise = True
        cases.append(_moge_case("moge MoGELayer (fused, torch.compile elementwise)", layer))
    if peers:
        # The layer's other expert paths use torch's own matmul: slow in bf16 without bf16 instructions.
        for name, impl in (("sort + torch._grouped_mm", "grouped_mm"), ("sort + per-expert autograd", "loop")):
            cases.append(_moge_case(f"moge MoGELayer ({name})", _layer(shape, impl, dtype, seed), optional=True))
        naive = NaiveLoopMoE(_layer(shape, "fused", dtype, seed))
        cases.append(Case("naive per-expert loop (MoGE router)", "peer", naive, lambda x, m=naive: (m(x), None), True))
        version = _transformers_version()
        if version is None:
            notes.append("transformers peers skipped: transformers is not installed (pip install 'moge[bench]')")
        elif int(version.split(".")[0]) < 5:
            notes.append(f"transformers peers skipped: transformers {version} < 5")
        else:
            cases.extend(_hf_cases(shape, dtype, seed))
    return cases, notes


# --- measuring -------------------------------------------------------------------------------------


def _inputs(shape: BenchShape, dtype: torch.dtype, count: int, seed: int, tokens: Optional[int] = None):
    gen = torch.Generator().manual_seed(seed + 1)
    T = tokens or shape.tokens
    xs = [torch.randn(T, shape.d_model, generator=gen).to(dtype) for _ in range(count)]
    gys = [torch.randn(T, shape.d_model, generator=gen).to(dtype) for _ in range(count)]
    return xs, gys


def _reset(case: Case) -> None:
    for p in case.module.parameters():
        p.grad = None


def _call(case: Case, x: Tensor, gy: Tensor) -> tuple[float, float]:
    """One training call: forward, backward. -> (forward seconds, forward+backward seconds)."""
    x = x.detach().requires_grad_()
    t0 = time.perf_counter()
    y, extra = case.step(x)
    t1 = time.perf_counter()
    g = gy if y.shape == gy.shape else torch.ones_like(y)
    if extra is None:
        y.backward(g)
    else:
        torch.autograd.backward([y, extra], [g, torch.ones_like(extra)])
    t2 = time.perf_counter()
    return t1 - t0, t2 - t0


def peak_memory_bytes(fn: Callable[[], object]) -> int:
    """Highest net bytes torch's CPU allocator holds above its level when fn starts.

    Replays the profiler's allocation (+) and free (-) events in time order; frees of
    tensors that existed before fn count too, so the peak is what fn needs on top.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
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
    peak_bytes: Optional[int] = None
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
    def fwd_median(self) -> float:
        return statistics.median(self.fwd_s) if self.fwd_s else math.nan

    def summary(self) -> dict:
        d = {"name": self.name, "kind": self.kind, "optional": self.optional, "dtype": self.dtype,
             "tokens": self.tokens, "samples": len(self.fb_s)}  # fmt: skip
        if self.skipped:
            d["skipped"] = self.skipped
            return d
        for key, v in (("fwd", self.fwd_s), ("fwd_bwd", self.fb_s)):
            q1, med, q3 = self._quartiles(v)
            d[f"{key}_ms"] = {"median": med * 1e3, "q1": q1 * 1e3, "q3": q3 * 1e3, "min": min(v) * 1e3, "max": max(v) * 1e3}
        d["tokens_per_s"] = self.tokens / self.fb_median
        d["peak_mb"] = None if self.peak_bytes is None else self.peak_bytes / 2**20
        d["grad_mb"] = self.grad_bytes / 2**20
        return d


def _probe(case: Case, shape: BenchShape, dtype: torch.dtype, seed: int) -> float:
    """Seconds of one call at T/8 tokens (after one at T/16 to warm up), times 8."""
    for div in (16, 8):
        xs, gys = _inputs(shape, dtype, 1, seed + 7, tokens=max(shape.tokens // div, 1))
        _reset(case)
        _, fb = _call(case, xs[0], gys[0])
    return fb * 8


def time_cases(
    cases: list[Case], shape: BenchShape, dtype: torch.dtype, iters: int, warmup: int,
    max_call_seconds: float, seed: int = 0, memory: bool = True, log: Callable[[str], None] = lambda s: None,
    slow_call_seconds: float = 10.0, slow_rounds: int = 3,
) -> list[Result]:  # fmt: skip
    """Round-robin timing of every case (rotated order per round), then peak memory.

    An optional case (peers; torch's bf16 matmul where the CPU lacks bf16) projected
    above max_call_seconds per call is skipped; one above slow_call_seconds joins only
    `slow_rounds` timed rounds and no warm-up round (its probe calls warmed it up).
    Every other case runs every round.
    """
    name = next(k for k, v in DTYPES.items() if v == dtype)
    results = [Result(c.name, c.kind, name, shape.tokens, optional=c.optional) for c in cases]
    live, rounds = [], {}
    for c, r in zip(cases, results):
        if not c.optional:  # the limit and the layer always get every round
            rounds[c.name] = (0, warmup + iters)
            live.append((c, r))
            continue
        projected = _probe(c, shape, dtype, seed)
        if projected > max_call_seconds:
            r.skipped = f"one call projected at ~{projected:.0f} s from T/8 (> max_call_seconds={max_call_seconds:g})"
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
            _reset(c)
            fwd, fb = _call(c, xs[i % len(xs)], gys[i % len(gys)])
            if i >= warmup:
                r.fwd_s.append(fwd)
                r.fb_s.append(fb)
        log(f"  {name} T={shape.tokens} round {i + 1}/{warmup + iters} done")
    if memory:
        for c, r in live:
            _reset(c)
            r.peak_bytes = peak_memory_bytes(lambda: _call(c, xs[0], gys[0]))
            r.grad_bytes = sum(p.numel() * p.element_size() for p in c.module.parameters() if p.requires_grad)
    return results


# --- the whole benchmark ------------------------------------------------------------------------


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
        "bf16_products": "native" if matmul_dtype(cpu, torch.bfloat16) == torch.bfloat16 else "fp32 (no bf16 matrix instructions)",
        "transformers": _transformers_version(),
        "python": platform.python_version(),
        "load_average": _load_average(),
    }


def _load_average() -> Optional[str]:
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
) -> dict:
    """Time every implementation at `shape` for each dtype, and optionally a token sweep.

    Returns a JSON-able report: machine, shape, per-dtype rows (each with its ratio to
    the dense limit), notes, and the sweep (dense limit and MoGE layer per T).
    """
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"dtype: expected some of {', '.join(DTYPES)}; got {d!r}")
    report = {"machine": machine_info(), "shape": asdict(shape), "iters": iters, "warmup": warmup,
              "max_call_seconds": max_call_seconds, "tables": {}, "notes": [], "sweep": {}}  # fmt: skip
    for d in dtypes:
        dtype = DTYPES[d]
        cases, notes = build_cases(shape, dtype, peers, seed, compiled)
        report["notes"] = sorted(set(report["notes"] + notes))
        log(f"{d}: {len(cases)} implementations, {shape.describe()}")
        results = time_cases(cases, shape, dtype, iters, warmup, max_call_seconds, seed, log=log)
        report["tables"][d] = _with_ratios(results)
    for d in dtypes if sweep_tokens else ():
        report["sweep"][d] = _sweep(shape, DTYPES[d], sweep_tokens, iters, max_call_seconds, seed, log)
    report["load_average_end"] = _load_average()
    return report


def _with_ratios(results: list[Result]) -> list[dict]:
    limit = _limit(results)
    layer = next((r.fb_median for r in results if r.kind == "moge" and r.fb_s), math.nan)
    # Memory is compared with the same row as time: the fastest dense variant.
    dense = next((r for r in results if r.kind == "limit" and r.fb_median == limit), None)
    dense_peak = None if dense is None else dense.peak_bytes
    rows = []
    for r in results:
        row = r.summary()
        if r.fb_s:
            row["x_limit"] = r.fb_median / limit
            row["fwd_x_limit"] = r.fwd_median / next(x.fwd_median for x in results if x.kind == "limit" and x.fb_median == limit)
            row["x_moge"] = r.fb_median / layer
            row["peak_x_limit"] = None if not (dense_peak and r.peak_bytes) else r.peak_bytes / dense_peak
            # The same without the weight gradients: what the dispatch and activations need.
            act = None if not (dense_peak and r.peak_bytes) else (r.peak_bytes - r.grad_bytes) / (dense_peak - dense.grad_bytes)
            row["act_peak_x_limit"] = act
        rows.append(row)
    return rows


def _sweep(shape: BenchShape, dtype: torch.dtype, tokens: tuple[int, ...], iters: int, max_call: float, seed: int, log) -> list[dict]:
    """Dense limit(s) and the MoGE layer at every T: time per call and per 1k tokens."""
    rows = []
    for T in tokens:
        s = BenchShape(T, shape.d_model, shape.hidden, shape.experts, shape.groups, shape.top_k)
        layer = _layer(s, "fused", dtype, seed)
        cases = dense_cases(s, dtype, seed, fastest_only=True) + [_moge_case("moge MoGELayer (fused, default)", layer)]
        n = max(3, min(iters, iters * 4096 // T))
        log(f"sweep T={T}: {n} rounds")
        results = time_cases(cases, s, dtype, n, 1, max_call, seed, log=log)
        rows.append({"tokens": T, "rows": _with_ratios(results)})
    return rows


# --- printing ----------------------------------------------------------------------------------


def _ms(d: Optional[dict]) -> str:
    if not d:
        return "-"
    return f"{d['median']:9.1f} [{d['q1']:.0f}-{d['q3']:.0f}]"


def _headline(dtype: str, rows: list[dict]) -> str:
    """The issue's targets for one dtype, from the table's own rows."""
    timed = [r for r in rows if "fwd_bwd_ms" in r]
    layer = next((r for r in timed if r["kind"] == "moge"), None)
    if layer is None:
        return f"{dtype}: the MoGE layer was not timed"
    parts = [f"{dtype}: MoGE layer {layer['x_limit']:.2f}x the dense limit"]
    hf = [r for r in timed if r["name"].startswith("transformers")]
    if hf:
        best = min(hf, key=lambda r: r["fwd_bwd_ms"]["median"])
        parts.append(f"fastest transformers block, {best['name'][len('transformers '):]}, takes {best['x_moge']:.2f}x its time")
    router = next((r for r in timed if r["kind"] == "part"), None)
    if router is not None:
        parts.append(f"router {100 * router['x_moge']:.1f}% of the layer")
    if layer.get("peak_x_limit") is not None:
        parts.append(f"peak memory {layer['peak_x_limit']:.2f}x the limit's ({layer['act_peak_x_limit']:.2f}x without weight gradients)")
    return "; ".join(parts)


def format_report(report: dict) -> str:
    """The report as plain-text tables (one per dtype, then the sweep)."""
    m, s = report["machine"], BenchShape(**report["shape"])
    lines = [
        f"MoGE layer benchmark, {s.describe()}; forward+backward, routing changes every call",
        f"machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, {m['cpu_capability']}; "
        f"torch {m['torch']}; bf16 products: {m['bf16_products']}; transformers {m['transformers'] or 'not installed'}",
        f"load average (1, 5, 15 min) at start: {m['load_average']}, at end: {report.get('load_average_end')}",
        f"median [IQR] over {report['iters']} rounds (round-robin, after {report['warmup']} warm-up); "
        "x limit = forward+backward / fastest dense SwiGLU of width K*f in the same dtype",
        "peak MB: allocator peak of one forward+backward, weight gradients (grads MB) included; "
        "peak x: that / the limit's; -grads: the same without the weight gradients on both sides",
    ]
    head = (
        f"{'dtype':5} {'implementation':58} {'fwd ms [IQR]':>20} {'fwd+bwd ms [IQR]':>22} {'n':>3} "
        f"{'tok/s':>7} {'peak MB':>8} {'grads':>6} {'x limit':>7} {'peak x':>6} {'-grads':>6}"
    )
    for d, rows in report["tables"].items():
        lines += ["", head, "-" * len(head)]
        for r in rows:
            if "skipped" in r:
                lines.append(f"{d:5} {r['name']:58} skipped: {r['skipped']}")
                continue
            peak = "-" if r["peak_mb"] is None else f"{r['peak_mb']:.1f}"
            px = "-" if r.get("peak_x_limit") is None else f"{r['peak_x_limit']:.2f}"
            ax = "-" if r.get("act_peak_x_limit") is None else f"{r['act_peak_x_limit']:.2f}"
            lines.append(
                f"{d:5} {r['name']:58} {_ms(r['fwd_ms']):>20} {_ms(r['fwd_bwd_ms']):>22} {r['samples']:3d} "
                f"{r['tokens_per_s']:7.0f} {peak:>8} {r['grad_mb']:6.1f} {r['x_limit']:7.2f} {px:>6} {ax:>6}"
            )
        lines.append(_headline(d, rows))
    for d, sweep in report.get("sweep", {}).items():
        lines += ["", f"token sweep ({d}): forward+backward median ms, and ms per 1k tokens"]
        lines.append(f"{'T':>7} {'dense limit ms':>15} {'MoGE ms':>10} {'MoGE ms/1k tok':>15} {'x limit':>8}")
        for point in sweep:
            rows = point["rows"]
            dense = min((r["fwd_bwd_ms"]["median"] for r in rows if r["kind"] == "limit" and "fwd_bwd_ms" in r), default=math.nan)
            moge = next((r for r in rows if r["kind"] == "moge"), None)
            if moge is None or "fwd_bwd_ms" not in moge:
                lines.append(f"{point['tokens']:>7} {dense:15.1f} {'skipped':>10}")
                continue
            mm = moge["fwd_bwd_ms"]["median"]
            lines.append(f"{point['tokens']:>7} {dense:15.1f} {mm:10.1f} {mm / point['tokens'] * 1e3:15.2f} {mm / dense:8.2f}")
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


# --- command line (scripts/bench_layer.py and `moge bench` forward here) ---------------------------


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t.strip())


def build_parser(prog: str = "bench_layer.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Time the MoGE layer against the dense SwiGLU limit and MoE peers (CPU).")
    p.add_argument("--shape", choices=sorted(SHAPES), default="small", help="preset sizes (large: E=64 M=8 K=8 d=1024 f=512)")
    for flag, key in (("--tokens", "tokens"), ("--d-model", "d_model"), ("--hidden", "hidden"),
                      ("--experts", "experts"), ("--groups", "groups"), ("--top-k", "top_k")):  # fmt: skip
        p.add_argument(flag, type=int, default=None, help=f"override the preset's {key}")
    p.add_argument("--dtype", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--iters", type=int, default=10, help="timed rounds (each runs every implementation once)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-peers", action="store_true", help="only the dense limit, the MoGE layer and its router")
    p.add_argument("--compiled", action="store_true", help="also the layer with torch.compile'd elementwise work")
    p.add_argument("--sweep-tokens", type=_ints, default=(), help="e.g. 1024,4096,16384,65536: linearity curve")
    p.add_argument("--max-call-seconds", type=float, default=120.0, help="skip rows whose one call is projected slower")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the full report here")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def main(argv: Optional[list[str]] = None, prog: str = "bench_layer.py") -> int:
    """Parse options, run the benchmark, print the table. Returns the exit status."""
    import sys

    args = build_parser(prog).parse_args(argv)
    base = asdict(SHAPES[args.shape])
    for key in base:
        if getattr(args, key) is not None:
            base[key] = getattr(args, key)
    try:
        shape = BenchShape(**base)
        dtypes = tuple(d.strip() for d in args.dtype.split(",") if d.strip())
        log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
        report = run_layer_benchmark(
            shape, dtypes, args.iters, args.warmup, not args.no_peers, args.sweep_tokens,
            args.max_call_seconds, args.seed, log, args.compiled,
        )  # fmt: skip
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0
