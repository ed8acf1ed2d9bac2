"""Router precision: float32 logits by default whatever the input; "input" as released.

The released code computes the router logits in the input dtype (bf16 in training)
and the softmax in float32. moge keeps float32 logits by default (bf16 changes the
selection of about 1-2% of tokens: docs/moe-traps.md, scripts/measure_router_precision.py)
and offers moe.router_dtype: input for parity studies.
"""

import pytest
import torch
from torch.testing import assert_close

from moge import MoGEConfig, MoGELayer

BASE = dict(d_model=32, num_experts=8, num_groups=4, top_k=4, expert_hidden=12)


def make(**kw):
    torch.manual_seed(0)
    return MoGELayer(MoGEConfig(**{**BASE, **kw}))


def test_default_logits_are_float32_for_bf16_input():
    layer = make().bfloat16()
    x = torch.randn(64, 32).bfloat16()
    out = layer(x)
    expected = (x.float() @ layer.router.weight.float().T).softmax(-1)
    assert out.scores.dtype == torch.float32
    assert_close(out.scores, expected, rtol=1e-6, atol=1e-7)


def test_default_is_float32_under_autocast():
    layer = make()
    x = torch.randn(64, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert_close(out.scores, (x @ layer.router.weight.T).softmax(-1), rtol=1e-6, atol=1e-7)


def test_input_dtype_logits_as_released():
    layer = make(router_dtype="input").bfloat16()
    x = torch.randn(64, 32).bfloat16()
    out = layer(x)
    logits_bf16 = x @ layer.router.weight.T  # bf16 matmul, as the released gate
    assert out.scores.dtype == torch.float32  # softmax in float32 in both
    assert_close(out.scores, logits_bf16.float().softmax(-1), rtol=0, atol=0)
    # ... and it is not the float32 path: bf16 rounding of the logits shows.
    fp32 = (x.float() @ layer.router.weight.float().T).softmax(-1)
    assert not torch.equal(out.scores, fp32)


def test_input_dtype_follows_autocast():
    layer = make(router_dtype="input")
    x = torch.randn(64, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    expected = (x.bfloat16() @ layer.router.weight.bfloat16().T).float().softmax(-1)
    assert_close(out.scores, expected, rtol=0, atol=0)


def test_input_dtype_in_float32_is_the_default_path():
    x = torch.randn(16, 32)
    assert_close(make(router_dtype="input")(x).hidden, make()(x).hidden, rtol=0, atol=0)


def test_bad_router_dtype_is_refused():
    with pytest.raises(ValueError, match="router_dtype"):
        make(router_dtype="bfloat16")
