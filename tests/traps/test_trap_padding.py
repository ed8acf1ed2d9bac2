"""Trap: padded tokens counted in the balance losses, loads, bias and statistics.

(transformers' Mixtral loss once averaged over padding: its issues 28505 / 28517.)
A padded batch with a token mask must give what the real tokens alone give.
"""

import copy
import json

import pytest
import torch
import torch.distributed as dist
from ranks import run_ranks
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

import moge
from moge import MoGEConfig, MoGELayer
from moge.balance import load_balancing_loss, released_balance_loss, routing_stats
from moge.distributed.expert_parallel import ExpertParallelMoGE
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


def test_logged_routing_sums_and_collapse_window_leave_padding_out():
    """The trainer's logged statistics (routing_sums) and the collapse monitor's window
    see only the real tokens of a padded batch: the same as the real tokens alone."""
    from moge.diagnostics.collapse import _Window
    from moge.training.metrics import routing_sums

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=16)
    model = MoGETransformer(cfg, MoGEConfig(**BASE, aux_loss_type="released"))
    with torch.no_grad():  # sharper routing than at init, so that padding rows matter
        for layer in model.moe_layers():
            layer.router.weight.mul_(40)
    tokens = torch.randint(0, 64, (2, 8))
    mask = torch.arange(8)[None, :] < torch.tensor([8, 3])[:, None]
    out = model(tokens, mask=mask)
    real = model(tokens[:1])  # sequence 0 is whole: its routing is the same alone
    short = model(tokens[1:, :3])
    sums, sums_real, sums_short = routing_sums(out), routing_sums(real), routing_sums(short)
    # Score entropy (column 2): the mean over the 11 real tokens of both sequences.
    pooled = (8 * sums_real[:, 2] + 3 * sums_short[:, 2]) / 11
    assert_close(sums[:, 2], pooled, rtol=1e-6, atol=0)
    unmasked = routing_sums(model(tokens))
    assert (unmasked[:, 2] - pooled).abs().max() > 1e-2  # the padded rows would move it
    for i, routed in enumerate(out.routing):
        padded_w, alone_w = _Window(8), _Window(8)
        padded_w.add(routed.expert_ids, routed.scores, "softmax", routed.token_mask)
        for part in (real, short):
            alone_w.add(part.routing[i].expert_ids, part.routing[i].scores, "softmax")
        assert padded_w.tokens == alone_w.tokens == 11
        assert padded_w.load_E.tolist() == alone_w.load_E.tolist()
        assert padded_w.score_entropy_sum == pytest.approx(alone_w.score_entropy_sum, rel=1e-6)
        assert padded_w.logit_rms_sum == pytest.approx(alone_w.logit_rms_sum, rel=1e-6)


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


# --- padding under expert parallelism: 2 gloo ranks --------------------------------------

RANK_LENGTHS = {"uneven": ((6, 4, 1), (2, 0, 5)), "rank1_all_padding": ((6, 4, 1), (0, 0, 0))}
EP_SCENARIOS = {
    f"{router}-{aux}-dispatch_{dispatch}-{layout}": (
        dict(
            router=router,
            aux_loss_type=aux,
            dispatch_padding=dispatch,
            bias_update_rate=0.05,
            z_loss_coef=0.1,
        ),
        layout,
    )
    for router in ("grouped", "global")  # static splits, counted splits
    for aux in ("batch", "global_batch")
    for dispatch in (False, True)
    for layout in RANK_LENGTHS
}


def rank_batch(layout, rank):
    """Rank r's padded [3, 6, 16] batch, its mask and a target; padding rows are large."""
    gen = torch.Generator().manual_seed(10 + rank)
    lengths = torch.tensor(RANK_LENGTHS[layout][rank])
    mask_BL = torch.arange(6)[None, :] < lengths[:, None]
    x_BLD = torch.where(mask_BL[..., None], torch.randn(3, 6, 16, generator=gen), 30.0)
    return x_BLD, mask_BL, torch.randn(3, 6, 16, generator=gen)


def _stats(out, mask_T):
    return routing_stats(out.expert_ids, 8, 4, out.scores, mask=mask_T).as_dict()


def _ep_rank(rank, world, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    try:
        info = {}
        for name, (kw, layout) in EP_SCENARIOS.items():
            layer = ExpertParallelMoGE.from_layer(make(**kw))
            x_BLD, mask_BL, target_BLD = rank_batch(layout, rank)
            out = layer(x_BLD, mask=mask_BL)
            ((out.hidden * target_BLD)[mask_BL].sum() + out.aux_loss).backward()
            grads = {n: p.grad for n, p in layer.named_parameters()}
            dist.all_reduce(grads["router.weight"])  # replicated: the sum over ranks
            counts = layer.load_accum_E.clone()
            layer.end_step()
            tensors = {"hidden": out.hidden, "load": out.load, "counts": counts, "bias": layer.balance_bias_E}
            tensors.update({f"grad.{n}": g for n, g in grads.items()})
            save_file({k: v.detach().contiguous() for k, v in tensors.items()}, f"{out_dir}/{name}.{rank}.st")
            info[name] = {
                "lb": float(out.lb_loss), "z": float(out.z_loss), "aux": float(out.aux_loss),
                "stats": _stats(out, mask_BL.reshape(-1)),
            }  # fmt: skip
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(info, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ep_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("padding_ep")
    run_ranks(_ep_rank, 2, str(out))
    return out


@pytest.mark.parametrize("name", list(EP_SCENARIOS))
def test_padded_batch_under_expert_parallelism_equals_its_real_tokens_alone(ep_ranks, name):
    """2 expert-parallel ranks with padded batches of different real lengths: every rank's
    real-token outputs, losses, load, statistics and gradients, the step's counts and the
    bias equal one process running each rank's real tokens alone (one call per rank's
    tokens, after a counting pass, so global_batch sees both). Padded tokens get 0 from the
    routed experts (dispatch_padding false; under static splits they travel with gate 0)
    or what the unmasked layer gives them (true)."""
    kw, layout = EP_SCENARIOS[name]
    ref = make(**kw)
    batches = [rank_batch(layout, r) for r in range(2)]
    unmasked = [copy.deepcopy(ref).eval()(x).hidden for x, _, _ in batches]  # same weights and bias
    with moge.counting_pass(ref):
        for x, mask, _ in batches:
            ref(x[mask])
    outs = [ref(x[mask]) for x, mask, _ in batches]
    sum((o.hidden * t[m]).sum() + o.aux_loss for o, (_, m, t) in zip(outs, batches, strict=True)).backward()
    counts = ref.load_accum_E.clone()
    ref.end_step()
    infos = [json.loads((ep_ranks / f"rank{r}.json").read_text())[name] for r in range(2)]
    for r, ((_, mask, _), out, info) in enumerate(zip(batches, outs, infos, strict=True)):
        got = load_file(ep_ranks / f"{name}.{r}.st")
        assert_close(got["hidden"][mask], out.hidden, rtol=1e-5, atol=1e-6)
        if kw["dispatch_padding"]:
            assert_close(got["hidden"][~mask], unmasked[r][~mask], rtol=1e-5, atol=1e-5)
        else:
            assert bool((got["hidden"][~mask] == 0).all())
        for key, value in (("lb", out.lb_loss), ("z", out.z_loss), ("aux", out.aux_loss)):
            assert info[key] == pytest.approx(float(value.detach()), rel=1e-5, abs=1e-7), key
        assert_close(got["load"], out.load, rtol=0, atol=0)
        assert int(got["load"].sum()) == int(mask.sum()) * 4
        want_stats = _stats(out, None)
        assert info["stats"].keys() == want_stats.keys()
        for key, value in want_stats.items():  # an empty rank's max/mean and CV are NaN on both sides
            want = pytest.approx(value, nan_ok=True) if isinstance(value, float) else value
            assert info["stats"][key] == want, key
        assert_close(got["counts"], counts, rtol=0, atol=0)
        assert_close(got["bias"], ref.balance_bias_E, rtol=0, atol=0)
        assert_close(got["grad.router.weight"], ref.router.weight.grad, rtol=1e-5, atol=1e-6)
        for key in ("experts.w_gate_up_EDH", "experts.w_down_EFD"):  # rank r holds experts 4r .. 4r+3
            want = getattr(ref.experts, key.split(".")[1]).grad[4 * r : 4 * r + 4]
            assert_close(got[f"grad.{key}"], want, rtol=1e-5, atol=1e-6, msg=key)
    assert ref.balance_bias_E.abs().sum() > 0
