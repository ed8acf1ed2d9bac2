"""What one extra bf16 mm call costs against one bmm, and what the fused path's bmm choice buys.

    python scripts/measure_bmm_call_cost.py [--rounds 60] [--shapes 2048x128x128,4096x512x256]

Part 1: four [rows, k] @ [k, n] products as four mm calls against one bmm, round-robin;
the difference per extra call, in flops of the bmm's own speed, is what
moge.kernels.precision.MM_CALL_FLOPS_* stand for.

Part 2: the MoGE layer (bf16, fused path, forward+backward) at each shape T x d x f, with
the AVX512-BF16 call cost, the AMX call cost, and "every group one bmm" (max_pad_waste
1), against the dense limit, round-robin in this one process; it also counts how many
chunks each cost makes a bmm. Only meaningful on a CPU with native bf16 products (it
says so otherwise); run with one thread on a quiet machine, ratios only.
"""

import argparse
import statistics
import time

import torch

from moge.kernels import precision
from moge.tools.bench_cases import BenchShape, DenseSwiGLU, layer_for


def _interleaved(fns: dict, rounds: int, arg=None) -> dict[str, float]:
    """Median seconds of each function, called round-robin (rotated order) `rounds` times
    after two warm-up rounds; the first quarter of the rounds is dropped."""
    names, times = list(fns), {k: [] for k in fns}
    for r in range(rounds + 2):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            t = time.perf_counter()
            if arg is None:
                fns[k]()
            else:
                fns[k](arg(r))
            if r >= 2:
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v[rounds // 4 :]) for k, v in times.items()}


def call_cost(rows: int, k: int, n: int, rounds: int) -> None:
    a = torch.randn(4, rows, k).bfloat16()
    w = torch.randn(4, k, n).bfloat16()
    out = torch.empty(4, rows, n, dtype=torch.bfloat16)
    a_e, w_e, out_e = a.unbind(0), w.unbind(0), out.unbind(0)

    def four_mm():
        for i in range(4):
            torch.mm(a_e[i], w_e[i], out=out_e[i])

    med = _interleaved({"mm": four_mm, "bmm": lambda: torch.bmm(a, w, out=out)}, rounds)
    flops = 2 * 4 * rows * k * n
    extra = (med["mm"] - med["bmm"]) / 3
    print(
        f"  [{rows}, {k}] @ [{k}, {n}] x 4: four mm {med['mm'] * 1e6:7.1f} us, one bmm {med['bmm'] * 1e6:7.1f} us "
        f"({flops / med['bmm'] / 1e9:.0f} GFLOP/s); per extra mm call {extra * 1e6:5.1f} us = "
        f"{extra * flops / med['bmm'] / 1e6:.1f} MFLOP"
    )


def layer_ab(T: int, d: int, f: int, rounds: int) -> None:
    shape = BenchShape(tokens=T, d_model=d, hidden=f)
    layer = layer_for(shape, "fused", torch.bfloat16, 0)
    dense = DenseSwiGLU(d, shape.top_k * f).to(torch.bfloat16)
    xs = [torch.randn(T, d).bfloat16() for _ in range(8)]
    gy = torch.randn(T, d).bfloat16()
    amx_flops = precision.MM_CALL_FLOPS_AMX
    costs = {
        "AVX512-BF16 call cost": (precision.MM_CALL_FLOPS_NATIVE_LOW_PRECISION, 0.0),
        "AMX call cost": (amx_flops, 0.0),
        "every group one bmm": (amx_flops, 1.0),
    }

    def setting(flops: float, waste: float) -> None:
        # The layer reads the AMX constant when it has AMX; elsewhere both rows read the other one.
        precision.MM_CALL_FLOPS_AMX = flops
        layer.experts.max_pad_waste = waste

    def moge(flops: float, waste: float):
        def step(x):
            setting(flops, waste)
            out = layer(x.detach().requires_grad_())
            (out.hidden.float().mul(gy.float()).sum() + out.aux_loss).backward()

        return step

    def dense_step(x):
        dense(x.detach().requires_grad_()).backward(gy)

    for name, (flops, waste) in costs.items():
        setting(flops, waste)
        plans = [
            layer.experts._fused_plan(layer.route_tokens(x, None, (T,)).expert_ids, d, x.device, x.dtype)[1]
            for x in xs
        ]
        bmm = sum(c.cap is not None for p in plans for c in p.chunks)
        print(f"  {name}: {bmm} of {sum(len(p.chunks) for p in plans)} chunks one bmm")
    fns = {"dense": dense_step, **{k: moge(*v) for k, v in costs.items()}}
    med = _interleaved(fns, rounds, arg=lambda r: xs[r % 8])
    precision.MM_CALL_FLOPS_AMX = amx_flops
    for k, v in med.items():
        print(f"  {k:24s} {v * 1e3:8.2f} ms  x dense limit {v / med['dense']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=60, help="round-robin calls per case (default 60)")
    parser.add_argument(
        "--shapes", default="2048x128x128,4096x256x256,4096x512x256", help="T x d x f, comma-separated"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    native = precision.matmul_dtype(cpu, torch.bfloat16) == torch.bfloat16
    print(
        f"bf16 products: {'native' if native else 'float32 (no bf16 matrix instructions)'}; AMX: {precision._cpu_has_amx()}"
    )
    print("one extra mm call against one bmm, bf16:")
    for rows, k, n in ((256, 128, 256), (512, 128, 256), (512, 128, 128)):
        call_cost(rows, k, n, 4 * args.rounds)
    for spec in args.shapes.split(","):
        T, d, f = (int(v) for v in spec.split("x"))
        print(f"MoGE layer, bf16, T={T} d={d} f={f} E=16 M=4 K=4, forward+backward:")
        layer_ab(T, d, f, args.rounds)


if __name__ == "__main__":
    main()
