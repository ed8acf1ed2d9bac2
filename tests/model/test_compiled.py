"""train.compile: the attention half through torch.compile, its fallback, where it is used."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from moge.layer import MoGEConfig
from moge.model import MoGETransformer
from moge.model import compiled as compiled_mod
from moge.model.compiled import CompileWarning, compile_attention
from moge.model.config import ModelConfig
from moge.training import loop
from moge.training.config import config_from_dict


def _model() -> MoGETransformer:
    torch.manual_seed(0)
    m = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)
    return MoGETransformer(m, MoGEConfig(d_model=16, num_experts=4, num_groups=2, top_k=2, expert_hidden=8))


def _tokens(B=2, L=8):
    return torch.randint(0, 64, (B, L), generator=torch.Generator().manual_seed(0))


def test_compiled_half_runs_only_for_training_steps():
    model = _model()
    calls = []

    def spy(block, x, rope):
        calls.append(block.index)
        return block.attention_half(x, rope, None)

    for block in model.blocks:
        block.compiled_attention = spy
    x = _tokens()
    model.train()(x, x)
    assert calls == [0, 1]
    with torch.no_grad():
        model(x)
    model.eval()(x)
    model.generate(x[:, :4], 3, temperature=0.0)
    model.train()
    model(x[:, :4], cache=model.new_cache(8))  # training mode, gradients on, but a KV cache
    model.check_finite = True
    model(x, x)
    assert calls == [0, 1]  # no-grad, eval, KV-cache and check_finite forwards ran eagerly


def test_a_failing_compile_warns_and_leaves_the_model_eager(monkeypatch):
    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler\nmore detail")

        return run

    monkeypatch.setattr(compiled_mod.torch, "compile", broken)
    model = _model()
    with pytest.warns(CompileWarning, match="no C\\+\\+ compiler"):
        reason = compile_attention(model, (2, 8))
    assert reason == "RuntimeError: no C++ compiler"
    assert all(b.compiled_attention is None for b in model.blocks)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(RuntimeError, match="train.compile"):
        compile_attention(model, (2, 8), strict=True)
    x = _tokens()
    model(x, x).loss.backward()  # still trains


def test_compile_is_a_bool_and_one_process_only():
    moe = {"num_experts": 4, "num_groups": 2, "top_k": 2, "expert_hidden": 8}
    with pytest.raises(ValueError, match="train.compile: expected true or false"):
        config_from_dict({"name": "c", "moe": moe, "train": {"compile": "yes"}})
    cfg = config_from_dict({"name": "c", "moe": moe, "train": {"compile": True}})
    with pytest.raises(ValueError, match="one process"):
        loop._compile(cfg, SimpleNamespace(size=2, main=True), _model())


@pytest.mark.slow  # torch.compile takes tens of seconds on two cores
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_compiled_attention_equals_eager_forward_and_backward(dtype):
    eager, fast = _model(), _model()
    assert compile_attention(fast, (2, 8), dtype, strict=True) is None
    x = _tokens()
    grads = []
    for model in (eager, fast):
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = model(x, x)
        out.loss.backward()
        grads.append((out.logits.detach(), [p.grad.clone() for p in model.parameters()]))
    tol = {} if dtype is None else {"rtol": 2e-2, "atol": 2e-2}
    assert_close(grads[1][0], grads[0][0], **tol)
    for a, b in zip(grads[1][1], grads[0][1]):
        assert_close(
            a, b, **({"rtol": 1e-4, "atol": 1e-5} if dtype is None else {"rtol": 5e-2, "atol": 5e-3})
        )
