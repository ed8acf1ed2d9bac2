"""Trap: padded tokens counted in the balance losses, loads, bias and statistics.

(transformers' Mixtral loss once averaged over padding: its issues 28505 / 28517.)
A padded batch with a token mask must give what the real tokens alone give.
"""

import pytest
import torch
from torch.testing import assert_close

import moge
from moge import MoGEConfig, MoGELayer
from moge.balance import load_balancing_loss, released_balance_loss, routing_stats
from moge.model import MoGETransformer
from moge.model.config import ModelConfig

BASE = dict(d_model=16, num_experts=8, num_groups=4, top_k=4, expert_hidden=12)
LENGTHS = (6, 4, 1)  # three right-padded sequences of a [3, 6] batch


def make(**kw):
    torch.manual_seed(0)
    return MoGELayer(MoGEConfig(**{**BASE, **kw}))


def padded_batch():
    torch.manual_seed(1)
    x_BLD = torch.randn(3, 6, 16)
    mask_BL = torch.arange(6)[None, :] < torch.tensor(LENGTHS)[:, None]
    # Padding rows that would move every statistic if they were counted.
    x_BLD = torch.where(mask_BL[..., None], x_BLD, 30 * torch.randn(3, 6, 16))
    return x_BLD, mask_BL


@pytest.mark.parametrize("router", ["grouped", "global"])
@pytest.mark.parametrize("aux_loss_type", ["batch", "global_batch", "released"])
def test_padded_batch_equals_its_real_tokens_alone(router, aux_loss_type):
    kw = dict(router=router, aux_loss_type=aux_loss_type, bias_update_rate=0.01, z_loss_coef=0.1)
    padded, alone = make(**kw), make(**kw)
    x_BLD, mask_BL = padded_batch()
    real_RD = x_BLD[mask_BL]
    out_p = padded(x_BLD, mask=mask_BL)
    out_a = alone(real_RD)
    for name in ("lb_loss", "z_loss", "aux_loss", "load"):
        assert_close(getattr(out_p, name), getattr(out_a, name), rtol=1e-6, atol=0, msg=name)
    assert int(out_p.load.sum()) == sum(LENGTHS) * 4  # only real slots counted
    assert_close(padded.load_accum_E, alone.load_accum_E, rtol=0, atol=0)
    # The real tokens' outputs are untouched; padded ones skip the routed experts.
    assert_close(out_p.hidden[mask_BL], out_a.hidden, rtol=1e-6, atol=1e-7)
    assert bool((out_p.hidden[~mask_BL] == 0).all())
    # Same gradient reaching the router through the losses.
    out_p.aux_loss.backward()
    out_a.aux_loss.backward()
    assert_close(padded.router.weight.grad, alone.router.weight.grad, rtol=1e-5, atol=1e-9)
    padded.end_step()
    alone.end_step()
    assert padded.balance_bias_E.abs().sum() > 0
    assert_close(padded.balance_bias_E, alone.balance_bias_E, rtol=0, atol=0)
    stats_p = routing_stats(out_p.expert_ids, 8, 4, out_p.scores, mask=mask_BL.reshape(-1)).as_dict()
    stats_a = routing_stats(out_a.expert_ids, 8, 4, out_a.scores).as_dict()
    assert stats_p.keys() == stats_a.keys()
    for key, value in stats_a.items():
        assert stats_p[key] == (value if isinstance(value, list) else pytest.approx(value)), key


def test_sequence_loss_averages_each_real_sequence_alone():
    layer = make(aux_loss_type="sequence")
    x_BLD, mask_BL = padded_batch()
    out = layer(x_BLD, mask=mask_BL)
    per_seq = []
    for b, n in enumerate(LENGTHS):
        o = layer(x_BLD[b, :n][None])  # one sequence of its real length
        per_seq.append(load_balancing_loss(o.scores, o.expert_ids, 8))
    assert_close(out.lb_loss, torch.stack(per_seq).mean(), rtol=1e-6, atol=0)
    # An all-padding sequence is left out of the mean, not averaged in as 0.
    mask2 = mask_BL.clone()
    mask2[2] = False
    out2 = layer(x_BLD, mask=mask2)
    assert_close(out2.lb_loss, torch.stack(per_seq[:2]).mean(), rtol=1e-6, atol=0)


def test_dispatch_padding_runs_padded_tokens_like_unmasked():
    layer = make(dispatch_padding=True, num_shared_experts=1)
    x_BLD, mask_BL = padded_batch()
    out_m, out_u = layer(x_BLD, mask=mask_BL), layer(x_BLD)
    assert_close(out_m.hidden, out_u.hidden, rtol=0, atol=0)
    assert int(out_m.load.sum()) == sum(LENGTHS) * 4 < int(out_u.load.sum())


def test_bad_mask_is_refused():
    layer = make()
    x = torch.randn(2, 3, 16)
    with pytest.raises(ValueError, match="mask"):
        layer(x, mask=torch.ones(2, 3))  # not bool
    with pytest.raises(ValueError, match="mask"):
        layer(x, mask=torch.ones(3, 2, dtype=torch.bool))


def test_model_mask_counts_only_real_tokens():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=16)
    model = MoGETransformer(cfg, MoGEConfig(**BASE))
    tokens = torch.randint(0, 64, (2, 8))
    mask = torch.arange(8)[None, :] < torch.tensor([8, 5])[:, None]
    out = model(tokens, mask=mask)
    # Right padding: each sequence alone gives its real tokens' routing; pool them.
    alone = [model(tokens[b : b + 1, :n]) for b, n in enumerate((8, 5))]
    for i, routed in enumerate(out.routing):
        scores = torch.cat([a.routing[i].scores for a in alone])
        ids = torch.cat([a.routing[i].expert_ids for a in alone])
        assert_close(routed.lb_loss, load_balancing_loss(scores, ids, 8), rtol=1e-5, atol=0)
        assert_close(routed.load, torch.bincount(ids.flatten(), minlength=8), rtol=0, atol=0)


def test_dropin_layer_stats_leave_padding_out():
    torch.manual_seed(0)
    mlp = moge.MoGEMLP(MoGEConfig(**BASE, capacity_factor=1.0))
    x_BLD, mask_BL = padded_batch()
    y = mlp(x_BLD, mask=mask_BL)
    assert bool((y[~mask_BL] == 0).all())
    stats = moge.routing_stats(mlp)[""]
    alone = routing_stats(mlp.last.expert_ids[mask_BL.reshape(-1)], 8, 4)
    assert stats.expert_load.tolist() == alone.expert_load.tolist()
    assert int(stats.expert_load.sum()) == sum(LENGTHS) * 4
    assert stats.dropped_fraction == pytest.approx(int(mlp.last.dropped.sum()) / (sum(LENGTHS) * 4))


def test_model_released_loss_pools_only_real_rows():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=16)
    model = MoGETransformer(cfg, MoGEConfig(**BASE, aux_loss_type="released", aux_loss_coef=0.5))
    tokens = torch.randint(0, 64, (2, 8))
    mask = torch.arange(8)[None, :] < torch.tensor([8, 3])[:, None]
    out = model(tokens, mask=mask)
    rows = [r.scores[mask.reshape(-1)] for r in out.routing]
    assert_close(out.aux_loss, 0.5 * released_balance_loss(rows, 4), rtol=1e-6, atol=0)
