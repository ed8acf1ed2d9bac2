"""train.compile: the attention half and the FFNs' elementwise work through torch.compile,
their fallback, where they are used."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.testing import assert_close

from moge.experts import SwiGLU
from moge.kernels import fused
from moge.layer import MoGEConfig, MoGELayer
from moge.model import MoGETransformer
from moge.model import compiled as compiled_mod
from moge.model.compiled import CompileWarning, compile_attention, compile_ffn, compile_model
from moge.model.config import ModelConfig
from moge.training import loop
from moge.training.config import config_from_dict


def _model() -> MoGETransformer:
    torch.manual_seed(0)
    m = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16)
    return MoGETransformer(m, MoGEConfig(d_model=16, num_experts=4, num_groups=2, top_k=2, expert_hidden=8))


def _mixed_model() -> MoGETransformer:
    """A dense block, then a MoE block with a shared expert: every kind of FFN."""
    torch.manual_seed(0)
    m = ModelConfig(
        vocab_size=64, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16,
        first_dense_layers=1, dense_hidden=24,
    )  # fmt: skip
    moe = MoGEConfig(d_model=16, num_experts=4, num_groups=2, top_k=2, expert_hidden=8, num_shared_experts=1)
    return MoGETransformer(m, moe)


@pytest.fixture
def fresh_fused_compile():
    """fused._compiled caches its torch.compile'd functions per process: none before or after."""
    fused._compiled.cache_clear()
    yield
    fused._compiled.cache_clear()


def _tokens(B=2, L=8):
    return torch.randint(0, 64, (B, L), generator=torch.Generator().manual_seed(0))


def _logits_and_grads(models, dtype: torch.dtype | None) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """(float32 logits, parameter gradients) of one training step of each model on the same batch."""
    x = _tokens()
    out_ = []
    for model in models:
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = model(x, x)
        out.loss.backward()
        out_.append((out.logits.detach().float(), [p.grad.clone() for p in model.parameters()]))
    return out_


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
    grads = _logits_and_grads((eager, fast), dtype)
    tol = {} if dtype is None else {"rtol": 2e-2, "atol": 2e-2}
    assert_close(grads[1][0], grads[0][0], **tol)
    for a, b in zip(grads[1][1], grads[0][1]):
        assert_close(
            a, b, **({"rtol": 1e-4, "atol": 1e-5} if dtype is None else {"rtol": 5e-2, "atol": 5e-3})
        )


def _spy_compile(calls: list):
    """A torch.compile stand-in: the function itself, each call recorded by its name."""

    def compile_(fn, **kwargs):
        def run(*args):
            calls.append(fn.__name__)
            return fn(*args)

        return run

    return compile_


def test_compiled_ffn_runs_in_training_steps_and_equals_eager(monkeypatch, fresh_fused_compile):
    calls: list[str] = []
    monkeypatch.setattr(torch, "compile", _spy_compile(calls))
    eager, fast = _mixed_model(), _mixed_model()
    assert compile_ffn(fast, (2, 8)) is None
    dense = [m for m in fast.modules() if isinstance(m, SwiGLU)]
    assert len(dense) == 2 and all(m.compiled_act is not None for m in dense)  # dense block, shared expert
    assert all(m.experts.compile_elementwise for m in fast.modules() if isinstance(m, MoGELayer))
    assert {"swiglu_act", "_act_pure", "_act_grads_pure"} <= set(calls)  # the probe ran all three
    calls.clear()
    x = _tokens()
    grads = []
    for model in (eager, fast):
        out = model(x, x)
        out.loss.backward()
        grads.append((out.logits.detach(), [p.grad.clone() for p in model.parameters()]))
    # A training step: the dense block's and the shared expert's act, and the fused path's
    # forward and backward once per chunk (one group each: 2).
    assert sorted(calls) == ["_act_grads_pure"] * 2 + ["_act_pure"] * 2 + ["swiglu_act"] * 2
    assert_close(grads[1][0], grads[0][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads[1][1], grads[0][1]):
        assert_close(a, b, rtol=1e-4, atol=1e-6)
    calls.clear()
    with torch.no_grad():
        fast.eval()(x)
    assert "swiglu_act" not in calls  # the dense SwiGLUs run eagerly outside training steps


def test_a_failing_ffn_compile_warns_and_leaves_the_ffns_eager(monkeypatch, fresh_fused_compile):
    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    model = _mixed_model()
    with pytest.warns(CompileWarning, match="FFNs' elementwise work failed"):
        assert compile_ffn(model, (2, 8)) == "RuntimeError: no C++ compiler"
    assert all(m.compiled_act is None for m in model.modules() if isinstance(m, SwiGLU))
    assert not any(m.experts.compile_elementwise for m in model.modules() if isinstance(m, MoGELayer))
    assert all(p.grad is None for p in model.parameters())
    assert all(int(m.load_accum_E.sum()) == 0 for m in model.modules() if isinstance(m, MoGELayer))
    with pytest.raises(RuntimeError, match="train.compile"):
        compile_ffn(model, (2, 8), strict=True)
    with pytest.warns(CompileWarning):
        assert compile_model(model, (2, 8)) == "RuntimeError: no C++ compiler; RuntimeError: no C++ compiler"
    x = _tokens()
    model(x, x).loss.backward()  # still trains


@pytest.mark.slow  # torch.compile takes tens of seconds on two cores
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_compiled_model_equals_eager_forward_and_backward(dtype, fresh_fused_compile):
    eager, fast = _mixed_model(), _mixed_model()
    assert compile_model(fast, (2, 8), dtype, strict=True) is None
    grads = _logits_and_grads((eager, fast), dtype)
    scale = grads[0][0].abs().max()
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype is None else {"rtol": 0.0, "atol": 2e-2 * float(scale)}
    assert_close(grads[1][0], grads[0][0], **tol)
    for a, b in zip(grads[1][1], grads[0][1]):
        g_tol = (
            {"rtol": 1e-4, "atol": 1e-5}
            if dtype is None
            else {"rtol": 0.0, "atol": 5e-2 * float(b.abs().max())}
        )
        assert_close(a, b, **g_tol)
