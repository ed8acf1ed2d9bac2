"""The sorted expert path's down product and combine, three ways, timed on one device.

Legend: T tokens, K experts per token, S = T*K token-slots (sorted by expert), D
d_model, F expert hidden, E experts.

GroupedExperts' sorted path (expert_impl grouped_mm, the default on CUDA) runs the down
product on the sorted slots, gathers its rows back to token order and sums each token's
K rows weighted by their gates with einsum "tk,tkd->td": a bmm of [T, 1, K] x [T, K, D]
whose inner dimension is K. On an H200 that bmm took 11% of the bf16 layer's device time
at d=2048 E=64 K=8 (docs/performance.md). Two other ways give the same sums:

- "mul+sum": (y_TKD * w_TK1).sum(1), elementwise;
- "gated": each slot's activations [S, F] times its gate before the down product, then
  a plain sum of each token's K rows (the fused CPU path's order; F < D at GPU shapes).

On an AMD EPYC CPU (AVX512-BF16, 1 thread; 2026-12-04) neither beat the einsum in the
whole grouped_mm experts (forward+backward, T=2048-4096 d=128-512): gated 0.95-1.13x its
time, mul+sum 0.97-1.03x. This probe times the three on the device of a GPU session,
forward and backward, round-robin, and checks that they agree. `python -m moge.tools.combine_probe --device cuda` (scripts/check_cuda.sh).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from einops import rearrange
from torch import Tensor

from moge._argtypes import integer
from moge.experts import _GatherRows, combine_sorted, inverse_permutation, sort_slots
from moge.routing import grouped_topk
from moge.tools.bench_cases import DTYPES, BenchShape
from moge.tools.bench_cuda import CUDA_SHAPES, _seconds, parse_names

VARIANTS = ("einsum", "mul+sum", "gated")


def _down_and_combine(variant: str, act_SF: Tensor, w2_EFD: Tensor, offs_E: Tensor, order_S: Tensor,
                      inverse_S: Tensor, weights_TK: Tensor) -> Tensor:  # fmt: skip
    """The down product of the sorted slots and the gated sum by token -> [T, D].
    "einsum" is the layer's own combine (experts.combine_sorted)."""
    K = weights_TK.shape[1]
    gates_TK = weights_TK.to(act_SF.dtype)
    if variant == "gated":
        gate_S1 = _GatherRows.apply(gates_TK.reshape(-1, 1), order_S, inverse_S, 1)
        act_SF = act_SF * gate_S1
    y_SD = torch._grouped_mm(act_SF, w2_EFD, offs=offs_E)
    if variant == "einsum":
        return combine_sorted(y_SD, order_S, inverse_S, weights_TK)
    y_TKD = rearrange(_GatherRows.apply(y_SD, inverse_S, order_S, 1), "(t k) d -> t k d", k=K)
    if variant == "mul+sum":
        return (y_TKD * gates_TK.unsqueeze(-1)).sum(dim=1)
    assert variant == "gated", variant
    return y_TKD.sum(dim=1)


def probe_inputs(shape: BenchShape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict:
    """Leaf tensors (activations, down weights, gates) and the MoGE routing of one call."""
    gen = torch.Generator().manual_seed(seed)
    T, D, F, E, K = shape.tokens, shape.d_model, shape.hidden, shape.experts, shape.top_k
    scores_TE = torch.randn(T, E, generator=gen).softmax(dim=-1)
    weights_TK, ids_TK = grouped_topk(scores_TE, K, shape.groups)
    order_S, counts_E = sort_slots(ids_TK, E)
    inverse_S = inverse_permutation(order_S)
    leaves = {
        "act_SF": torch.randn(T * K, F, generator=gen),
        "w2_EFD": torch.randn(E, F, D, generator=gen) / F**0.5,
        "weights_TK": weights_TK,
    }
    out = {
        k: v.to(device, dtype if k != "weights_TK" else torch.float32).requires_grad_()
        for k, v in leaves.items()
    }
    out |= {"offs_E": counts_E.cumsum(0).to(device, torch.int32), "order_S": order_S.to(device),
            "inverse_S": inverse_S.to(device), "gy_TD": torch.randn(T, D, generator=gen).to(device, dtype)}  # fmt: skip
    return out


def run_variant(variant: str, inputs: dict) -> Callable[[], tuple[Tensor, ...]]:
    """One forward+backward of `variant`; returns (output, d act, d w2, d weights)."""
    leaves = [inputs[k] for k in ("act_SF", "w2_EFD", "weights_TK")]

    def call() -> tuple[Tensor, ...]:
        for t in leaves:
            t.grad = None
        y_TD = _down_and_combine(variant, leaves[0], leaves[1], inputs["offs_E"], inputs["order_S"],
                                 inputs["inverse_S"], leaves[2])  # fmt: skip
        y_TD.backward(inputs["gy_TD"])
        return (y_TD.detach(), *(t.grad for t in leaves))

    return call


def relative_errors(shape: BenchShape, dtype: torch.dtype, device: torch.device) -> dict[str, float]:
    """Each variant's largest difference from the einsum's (output and the three
    gradients), relative to the largest magnitude of the einsum's."""
    inputs = probe_inputs(shape, dtype, device)
    ref = [t.float() for t in run_variant("einsum", inputs)()]
    errors = {}
    for variant in VARIANTS[1:]:
        got = [t.float() for t in run_variant(variant, inputs)()]
        errors[variant] = max(float((g - r).abs().max() / r.abs().max()) for g, r in zip(got, ref))
    return errors


def time_variants(shape: BenchShape, dtype: torch.dtype, device: torch.device, rounds: int,
                  calls: int = 4) -> dict[str, float]:  # fmt: skip
    """Median seconds per forward+backward of each variant, round-robin after one warm-up."""
    inputs = probe_inputs(shape, dtype, device)
    runs = {v: run_variant(v, inputs) for v in VARIANTS}
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}

    def repeat(v: str) -> Callable[[], None]:
        def calls_of_v() -> None:
            for _ in range(calls):
                runs[v]()

        return calls_of_v

    for r in range(rounds + 1):
        for v in VARIANTS[r % 3 :] + VARIANTS[: r % 3]:  # the order rotates each round
            seconds = _seconds(device, repeat(v)) / calls
            if r:
                samples[v].append(seconds)
    return {v: statistics.median(s) for v, s in samples.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda, or cpu to try it without a GPU")
    p.add_argument(
        "--shapes", default="d2048-e64,pangu-72b", help=f"comma-separated: {', '.join(CUDA_SHAPES)}"
    )
    p.add_argument("--dtype", default="bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--rounds", type=integer, default=8, help="timed rounds (median of these)")
    p.add_argument("--tokens", type=integer, default=None, help="override T of every shape")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: torch sees no CUDA device (try --device cpu)")
    if args.rounds < 1:
        raise SystemExit("error: --rounds: must be >= 1")
    print(f"down product + combine of the sorted path, forward+backward, on {device}")
    for name in parse_names(args.shapes, CUDA_SHAPES, "--shapes"):
        shape = CUDA_SHAPES[name]
        if args.tokens:
            shape = BenchShape(
                args.tokens, shape.d_model, shape.hidden, shape.experts, shape.groups, shape.top_k
            )
        for dname in parse_names(args.dtype, DTYPES, "--dtype"):
            dtype = DTYPES[dname]
            errors = relative_errors(shape, dtype, device)
            times = time_variants(shape, dtype, device, args.rounds)
            cells = [f"{v} {1e3 * times[v]:.3f} ms ({times[v] / times['einsum']:.2f}x)" for v in VARIANTS]
            diffs = ", ".join(f"{v} {e:.1e}" for v, e in errors.items())
            print(
                f"{name} {shape.describe()} {dname}: "
                + "; ".join(cells)
                + f"; differences from einsum: {diffs}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
