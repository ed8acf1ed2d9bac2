"""moge/tools/combine_probe.py on the CPU: the three ways of the sorted path's down
product and combine give the same output and gradients, against a plain per-token loop,
and the command runs. The timings themselves are for a GPU (scripts/check_cuda.sh)."""

import pytest
import torch

from moge.tools import bench_cuda, combine_probe
from moge.tools.bench_cases import BenchShape
from moge.tools.combine_probe import VARIANTS, probe_inputs, relative_errors, run_variant

TINY = BenchShape(tokens=24, d_model=16, hidden=8, experts=8, groups=4, top_k=4)


def _per_token_reference(inputs: dict) -> torch.Tensor:
    """y_t = sum_k w[t, k] * (act of slot t*K+k) @ w2[expert of that slot], slot by slot."""
    act, w2, weights = (inputs[k].detach().double() for k in ("act_SF", "w2_EFD", "weights_TK"))
    order, offs = inputs["order_S"], inputs["offs_E"].long()
    T, K = weights.shape
    expert_of_sorted = torch.bucketize(torch.arange(T * K), offs, right=True)
    y = torch.zeros(T, w2.shape[2], dtype=torch.float64)
    for s in range(T * K):
        flat = int(order[s])
        t, k = divmod(flat, K)
        y[t] += weights[t, k] * (act[s] @ w2[int(expert_of_sorted[s])])
    return y


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_is_the_per_token_sum(variant):
    inputs = probe_inputs(TINY, torch.float32, torch.device("cpu"))
    y = run_variant(variant, inputs)()[0]
    torch.testing.assert_close(y.double(), _per_token_reference(inputs), rtol=1e-5, atol=1e-6)


def test_the_variants_agree_forward_and_backward():
    errors = relative_errors(TINY, torch.float32, torch.device("cpu"))
    assert set(errors) == {"mul+sum", "gated"}
    assert all(e < 1e-5 for e in errors.values()), errors
    inputs = probe_inputs(TINY, torch.float32, torch.device("cpu"))
    ref, gated = run_variant("einsum", inputs)(), run_variant("gated", inputs)()
    for r, g in zip(ref[1:], gated[1:]):  # d act, d w2, d weights
        assert r.abs().max() > 0
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_bf16_differences_stay_within_rounding():
    errors = relative_errors(TINY, torch.bfloat16, torch.device("cpu"))
    assert all(e < 3e-2 for e in errors.values()), errors  # a few bf16 roundings (2**-8 each)


def test_the_command_runs_on_the_cpu(monkeypatch, capsys, one_thread):
    monkeypatch.setitem(bench_cuda.CUDA_SHAPES, "tiny", TINY)
    assert (
        combine_probe.main(["--device", "cpu", "--shapes", "tiny", "--dtype", "fp32,bf16", "--rounds", "1"])
        == 0
    )
    out = capsys.readouterr().out
    assert out.count("tiny T=24") == 2 and all(f"{v} " in out for v in VARIANTS)
    with pytest.raises(SystemExit):
        combine_probe.main(["--device", "cpu", "--shapes", "nope"])
