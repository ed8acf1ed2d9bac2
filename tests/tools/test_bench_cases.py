import pytest
import torch
from torch.testing import assert_close

from moge.tools import bench_cases
from moge.tools.bench_cases import BenchShape, DenseSwiGLU, NaiveLoopMoE

TINY = BenchShape(tokens=64, d_model=16, hidden=8, experts=4, groups=2, top_k=2)


def test_naive_loop_matches_the_layer():
    layer = bench_cases.layer_for(TINY, "fused", torch.float32, seed=0)
    x = torch.randn(TINY.tokens, TINY.d_model, generator=torch.Generator().manual_seed(0))
    assert_close(NaiveLoopMoE(layer)(x), layer(x).hidden)


def test_dense_fp32_products_close_to_plain_bf16():
    torch.manual_seed(0)
    dense = DenseSwiGLU(16, 32)
    x = torch.randn(8, 16)
    ref = dense(x)
    fast = DenseSwiGLU(16, 32, products_fp32=True)
    fast.load_state_dict(dense.state_dict())
    y = fast.to(torch.bfloat16)(x.bfloat16())
    assert y.dtype == torch.bfloat16
    assert_close(y.float(), ref, atol=0.02 * ref.abs().max().item(), rtol=0.03)


def test_bfloat16_adds_the_fp32_products_limit_when_the_cpu_lacks_bf16(monkeypatch):
    from moge.kernels import precision

    monkeypatch.setattr(precision, "_cpu_has_native", lambda dtype: False)
    cases = bench_cases.dense_cases(TINY, torch.bfloat16)
    assert len(cases) == 2 and "fp32 products" in cases[1].name
    assert cases[0].optional and not cases[1].optional  # torch's bf16 matmul may be skipped
    assert [c.name for c in bench_cases.dense_cases(TINY, torch.bfloat16, fastest_only=True)] == [
        cases[1].name
    ]
    monkeypatch.setattr(precision, "_cpu_has_native", lambda dtype: True)
    assert len(bench_cases.dense_cases(TINY, torch.bfloat16)) == 1


def test_transformers_blocks_eager_and_grouped_mm_agree():
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("needs transformers >= 5")
    cases = bench_cases.hf_cases(TINY, torch.float32, seed=0)
    assert len(cases) == 6
    x = torch.randn(TINY.tokens, TINY.d_model, generator=torch.Generator().manual_seed(1))
    for eager, grouped in zip(cases[::2], cases[1::2]):
        assert "eager" in eager.name and "grouped_mm" in grouped.name
        y_eager, y_grouped = eager.step(x)[0], grouped.step(x)[0]
        assert y_eager.shape == x.shape and y_eager.abs().sum() > 0
        assert_close(y_eager, y_grouped, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(tokens=0), "tokens"),
        (dict(groups=3), "groups"),
        (dict(top_k=3), "groups"),
        (dict(d_model=-2), "d_model"),
    ],
)
def test_bench_shape_validation_names_the_field(kw, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        BenchShape(**{**TINY.__dict__, **kw})
