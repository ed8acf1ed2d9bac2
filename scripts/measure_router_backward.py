"""The float32 router's backward in bf16 products against float32 products (docs/performance.md).

    python scripts/measure_router_backward.py [--rounds 12] [--threads 1]

For a bf16 MoGELayer (E=16 M=4 K=4) at the default benchmark shape and the toy configs'
shapes, times the router alone (MoGELayer.route_tokens: logits, softmax, grouped top-k,
losses, load) and the whole layer, forward + backward, with the router's backward as
shipped (bf16 products of the rounded logits' gradient where bf16 products are native)
and with it forced back to float32 products. Both variants alternate in one process,
in a rotated order each round; prints medians and the router's share of the layer.
Also prints each variant's router-gradient error against float64, relative to the
gradient's scale, beside the error of rounding the float64 gradient to bf16.
"""

import argparse
import os
import time
from collections.abc import Callable

import torch
from torch import Tensor

from moge import MoGEConfig, MoGELayer
from moge.kernels import precision
from moge.tools.bench import machine_info
from moge.tools.bench_report import machine_line

SHAPES = ((4096, 512, 256), (2048, 128, 128), (1024, 128, 128), (4096, 256, 256), (1024, 256, 256))
SHIPPED = precision._bf16_gradient_products


def _float32_products(x_TD: Tensor, w_ED: Tensor) -> bool:
    return False


VARIANTS: dict[str, Callable[[Tensor, Tensor], bool]] = {"bf16": SHIPPED, "fp32": _float32_products}


def _layer(T: int, D: int, F: int) -> tuple[MoGELayer, list[Tensor]]:
    torch.manual_seed(0)
    layer = MoGELayer(MoGEConfig(d_model=D, num_experts=16, num_groups=4, top_k=4, expert_hidden=F))
    xs = [torch.randn(T, D).bfloat16().requires_grad_() for _ in range(4)]
    return layer.bfloat16(), xs


def _steps(layer: MoGELayer) -> dict[str, Callable[[Tensor], None]]:
    def router(x: Tensor) -> None:
        out = layer.route_tokens(x, None, (x.shape[0],))
        (out.weights.float().sum() * 1e-3 + out.aux_loss).backward()

    def whole(x: Tensor) -> None:
        out = layer(x)
        (out.hidden.float().sum() * 1e-3 + out.aux_loss).backward()

    return {"router": router, "layer": whole}


def _time_shape(T: int, D: int, F: int, rounds: int, calls: int) -> dict[str, float]:
    """Median ms per call of each (step, variant), alternating variants every round."""
    layer, xs = _layer(T, D, F)
    times: dict[str, list[float]] = {}
    for r in range(-1, rounds):  # round -1 warms up every variant
        for step_name, step in _steps(layer).items():
            names = list(VARIANTS) if r % 2 == 0 else list(reversed(VARIANTS))
            for name in names:
                precision._bf16_gradient_products = VARIANTS[name]
                for i in range(calls):
                    t0 = time.perf_counter()
                    step(xs[i % len(xs)])
                    if r >= 0:
                        times.setdefault(f"{step_name} {name}", []).append(time.perf_counter() - t0)
    precision._bf16_gradient_products = SHIPPED
    return {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}


def _router_grad_errors(T: int, D: int) -> dict[str, float]:
    """Max error of the router weight's gradient (bf16 layer) against float64, relative
    to its scale, per variant; and "rounding": the float64 gradient rounded to bf16."""
    layer, xs = _layer(T, D, D)
    exact = MoGELayer(layer.config).double()
    exact.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    x = xs[0].detach()
    out = exact.route_tokens(x.double(), None, (T,))
    (out.weights.sum() * 1e-3 + out.aux_loss).backward()
    ref = exact.router.weight.grad
    assert ref is not None
    scale = ref.abs().max()
    errors = {"rounding": float((ref.bfloat16().double() - ref).abs().max() / scale)}
    for name, variant in VARIANTS.items():
        precision._bf16_gradient_products = variant
        layer.zero_grad()
        out = layer.route_tokens(x, None, (T,))
        (out.weights.float().sum() * 1e-3 + out.aux_loss).backward()
        got = layer.router.weight.grad
        assert got is not None
        errors[name] = float((got.double() - ref).abs().max() / scale)
    precision._bf16_gradient_products = SHIPPED
    return errors


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=12, help="timed rounds per shape (default 12)")
    parser.add_argument("--calls", type=int, default=6, help="calls per variant and round (default 6)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    if args.rounds < 1 or args.calls < 1 or args.threads < 1:
        parser.error("--rounds, --calls and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    print(machine_line(machine_info()))
    print(f"load average at start: {_load()}")
    if not SHIPPED(torch.zeros(1, 1, dtype=torch.bfloat16), torch.zeros(1, 1, dtype=torch.bfloat16)):
        print("bf16 products are not native here: both variants run float32 products")
    for T, D, F in SHAPES:
        m = _time_shape(T, D, F, args.rounds, args.calls)
        e = _router_grad_errors(T, D)
        print(
            f"T={T} d={D} f={F}: router {m['router bf16']:.3f} against {m['router fp32']:.3f} ms "
            f"({m['router bf16'] / m['router fp32']:.2f}x); layer {m['layer bf16']:.2f} against "
            f"{m['layer fp32']:.2f} ms ({m['layer bf16'] / m['layer fp32']:.3f}x); router share "
            f"{100 * m['router bf16'] / m['layer bf16']:.1f}% against {100 * m['router fp32'] / m['layer fp32']:.1f}%; "
            f"router dw error {e['bf16']:.1e} against {e['fp32']:.1e} (bf16 rounding {e['rounding']:.1e})",
            flush=True,
        )
    print(f"load average at end: {_load()}")


if __name__ == "__main__":
    main()
