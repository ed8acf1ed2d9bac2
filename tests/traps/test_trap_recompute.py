"""Trap: activation checkpointing runs forward twice and counts every token twice.

(torchtitan met it: load counts and the bias update doubled under recompute.)
With model.activation_checkpointing the loss, every gradient, the step's load counts
and the bias after a step equal the run without it.
"""

import dataclasses
import json

import pytest
import torch
from torch.testing import assert_close
from torch.utils.checkpoint import checkpoint

import moge
from moge import MoGEConfig
from moge.model import MoGETransformer
from moge.model.config import ModelConfig
from moge.model.recompute import checkpoint_block
from moge.training import train
from moge.training.checkpoint import read_tensors
from moge.training.config import config_from_dict

MOE = MoGEConfig(d_model=16, num_experts=8, num_groups=4, top_k=4, expert_hidden=12)
MODEL = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=16)


def make_model(checkpointing, **moe):
    torch.manual_seed(0)
    cfg = dataclasses.replace(MODEL, activation_checkpointing=checkpointing)
    return MoGETransformer(cfg, dataclasses.replace(MOE, **moe)).train()


def micro_batches():
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, 64, (2, 8), generator=gen) for _ in range(3)]


def run_step(model, mask=None):
    """Three accumulated micro-batches, then the layers' end_step."""
    losses = []
    for tokens in micro_batches():
        out = model(tokens, tokens.roll(-1, 1), mask=mask)
        (out.loss / 3).backward()
        losses.append(out.loss.detach())
    counts = [layer.load_accum_E.clone() for layer in model.moe_layers()]
    moge.end_step(model)
    return losses, counts


@pytest.mark.parametrize("aux_loss_type", ["batch", "global_batch", "released"])
def test_checkpointing_changes_nothing(aux_loss_type):
    kw = dict(aux_loss_type=aux_loss_type, bias_update_rate=0.01, z_loss_coef=0.01, aux_loss_coef=0.1)
    plain, ckpt = make_model(False, **kw), make_model(True, **kw)
    losses_p, counts_p = run_step(plain)
    losses_c, counts_c = run_step(ckpt)
    assert_close(torch.stack(losses_c), torch.stack(losses_p), rtol=0, atol=0)
    for a, b in zip(counts_c, counts_p, strict=True):
        assert_close(a, b, rtol=0, atol=0)
        assert int(a.sum()) == 3 * 16 * 4  # each token-slot once
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-8, msg=name)
    for a, b in zip(plain.moe_layers(), ckpt.moe_layers(), strict=True):
        assert a.balance_bias_E.abs().sum() > 0
        assert_close(b.balance_bias_E, a.balance_bias_E, rtol=0, atol=0)
        assert b.calls_since_end_step == 0 and not b._replay_counts


def test_checkpointing_with_capacity_and_padding_changes_nothing():
    kw = dict(aux_loss_type="global_batch", bias_update_rate=0.01, capacity_factor=0.75)
    mask = torch.arange(8)[None, :] < torch.tensor([8, 5])[:, None]
    plain, ckpt = make_model(False, **kw), make_model(True, **kw)
    losses_p, counts_p = run_step(plain, mask)
    losses_c, counts_c = run_step(ckpt, mask)
    assert_close(torch.stack(losses_c), torch.stack(losses_p), rtol=0, atol=0)
    for a, b in zip(counts_c, counts_p, strict=True):
        assert int(a.sum()) == int(b.sum()) == 3 * 13 * 4  # real token-slots, once each
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-8, msg=name)
    for a, b in zip(plain.moe_layers(), ckpt.moe_layers(), strict=True):
        assert_close(b.balance_bias_E, a.balance_bias_E, rtol=0, atol=0)


@pytest.mark.parametrize("order", ["one_backward_for_two_calls", "a_call_without_backward_first"])
def test_each_recompute_replays_the_counts_of_its_own_call(order):
    """A global-batch loss without a counting pass weighs each call with the counts of the
    step so far, which differ from call to call. A recompute must replay the counts of
    the call it recomputes, whatever order the backwards run in: two calls summed into one
    backward (autograd recomputes the later call first), or a call whose loss is never
    backpropagated before one that is."""
    kw = dict(aux_loss_type="global_batch", aux_loss_coef=1.0)
    tokens_a, tokens_b = micro_batches()[:2]
    grads = []
    for checkpointing in (False, True):
        model = make_model(checkpointing, **kw)
        if order == "one_backward_for_two_calls":
            sum(model(t, t.roll(-1, 1)).loss for t in (tokens_a, tokens_b)).backward()
        else:
            model(tokens_a, tokens_a.roll(-1, 1))  # counted; its graph is dropped
            model(tokens_b, tokens_b.roll(-1, 1)).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        assert all(int(layer.load_accum_E.sum()) == 2 * 16 * 4 for layer in model.moe_layers())
    plain, ckpt = grads
    for name, grad in plain.items():
        assert_close(ckpt[name], grad, rtol=1e-5, atol=1e-8, msg=name)


def test_naive_checkpoint_would_count_twice():
    """Why checkpoint_block exists: plain torch checkpoint doubles the counts."""
    model = make_model(False)
    tokens = micro_batches()[0]
    block = model.blocks[0]
    x = model.embed(tokens)
    y, _ = checkpoint(block, x, tokens, model.rope, None, use_reentrant=False)
    y.sum().backward()
    assert int(block.ffn.load_accum_E.sum()) == 2 * 16 * 4
    block.ffn.end_step()
    y, _ = checkpoint_block(block, model.embed(tokens), tokens, model.rope, None)
    y.sum().backward()
    assert int(block.ffn.load_accum_E.sum()) == 16 * 4


def test_dropin_layer_queues_its_loss_once_under_recompute():
    torch.manual_seed(0)
    mlp = moge.MoGEMLP(MOE).train()
    x = torch.randn(2, 5, 16, requires_grad=True)
    y = checkpoint_block(mlp, x)
    y.sum().backward()
    assert len(mlp.pending_aux_losses) == 1
    assert int(mlp.load_accum_E.sum()) == 10 * 4


def test_eval_and_no_grad_do_not_checkpoint():
    model = make_model(True, bias_update_rate=0.01)
    tokens = micro_batches()[0]
    with torch.no_grad():
        model(tokens)
    assert all(not layer._replay_counts for layer in model.moe_layers())


def test_a_forward_with_a_kv_cache_trains_like_the_run_without_checkpointing():
    # The recompute ran after cache.advance, so it wrote and read the cache at the next
    # positions: torch's CheckpointError ("different metadata than during the forward pass").
    grads = []
    for checkpointing in (False, True):
        model = make_model(checkpointing)
        prefix, tokens = micro_batches()[:2]
        cache = model.new_cache()
        with torch.no_grad():
            model(prefix, cache=cache)
        out = model(tokens, tokens.roll(-1, 1), cache=cache)
        out.loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        assert cache.pos == 16
    assert grads[0].keys() == grads[1].keys()
    assert_close(grads[1], grads[0], rtol=0, atol=0)


def test_field_is_validated():
    with pytest.raises(ValueError, match="model.activation_checkpointing"):
        ModelConfig(activation_checkpointing="yes")


def _train_run(out_dir, checkpointing):
    cfg = config_from_dict(
        {
            "name": "ckpt-trap",
            "model": {"d_model": 16, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 16,
                      "activation_checkpointing": checkpointing},
            "moe": {"num_experts": 8, "num_groups": 4, "top_k": 4, "expert_hidden": 8,
                    "aux_loss_type": "global_batch", "aux_loss_coef": 0.1, "bias_update_rate": 0.01},
            "data": {"seq_len": 16},
            "train": {"steps": 2, "batch_size": 2, "grad_accum": 2, "warmup_steps": 1, "log_every": 1,
                      "eval_every": 0, "eval_batches": 1, "save_every": 0, "threads": 1, "out_dir": str(out_dir)},
        }
    )  # fmt: skip
    n = torch.get_num_threads()
    try:
        train(cfg, progress=False)
    finally:
        torch.set_num_threads(n)
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    losses = [(r["loss"], r["grad_norm"]) for r in map(json.loads, lines) if r["type"] == "train"]
    return losses, read_tensors(out_dir)


def test_the_training_loop_with_checkpointing_matches_without(tmp_path):
    losses_p, final_p = _train_run(tmp_path / "plain", False)
    losses_c, final_c = _train_run(tmp_path / "ckpt", True)
    assert len(losses_p) == 2 and losses_c == losses_p
    weights = [k for k in final_p if k.startswith("model.")]
    assert any("balance_bias_E" in k for k in weights)
    for key in weights:
        assert_close(final_c[key], final_p[key], rtol=1e-5, atol=1e-7, msg=key)
