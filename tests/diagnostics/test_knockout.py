"""moge.diagnostics.knockout: interventions on hand-made scores, sweeps with known answers, `moge eval --knockout`."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch.testing import assert_close

from moge import capacity
from moge.cli import main
from moge.diagnostics.knockout import (
    Intervention,
    drop_lowest_per_group,
    intervene,
    knocked_out,
    knockout_sweep,
    mean_loss,
)
from moge.layer import MoGEConfig, MoGELayer
from moge.model import MoGETransformer
from moge.training import train
from moge.training.config import config_from_dict
from moge.training.corpus import Batch

SCORES = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]])


def _layer(**kw) -> MoGELayer:
    cfg = dict(d_model=8, num_experts=4, num_groups=2, top_k=2, expert_hidden=4, **kw)
    return MoGELayer(MoGEConfig(**cfg))


def _run(layer, iv, scores=SCORES):
    ids = torch.tensor([[0, 2], [1, 3]])
    out = type("Out", (), {"scores": scores, "expert_ids": ids})()
    return intervene(layer, out, None, iv, torch.Generator().manual_seed(0))


def test_remove_one_expert_reroutes_within_its_group():
    ids, gates = _run(_layer(), Intervention("remove", (0,)))
    assert ids.tolist() == [[1, 2], [1, 3]]  # token 0 takes expert 1, the next best of group 0
    assert_close(gates, torch.tensor([[0.3, 0.2], [0.2, 0.4]]))


def test_remove_a_group_zeroes_its_slot():
    ids, gates = _run(_layer(), Intervention("remove", (0, 1)))
    assert ids[:, 1].tolist() == [2, 3]
    assert_close(gates[:, 0], torch.zeros(2))  # nothing left in group 0
    assert_close(gates[:, 1], torch.tensor([0.2, 0.4]))


def test_remove_renormalises_and_scales_like_the_router():
    layer = _layer(normalize_weights=True, route_scale=2.0, learned_expert_scale=True)
    with torch.no_grad():
        layer.expert_scale_E.copy_(torch.tensor([1.0, 3.0, 1.0, 1.0]))
    _, gates = _run(layer, Intervention("remove", (0,)))
    # token 0: experts 1 and 2, scores 0.3 and 0.2 -> 0.6 and 0.4, x2, expert 1 x3.
    assert_close(gates[0], torch.tensor([3.6, 0.8]))


def test_uniform_routing_keeps_the_group_quota_and_equal_gates():
    scores = torch.rand(200, 4, generator=torch.Generator().manual_seed(1)).softmax(-1)
    ids, gates = _run(_layer(), Intervention("uniform"), scores)
    assert ((ids[:, 0] < 2) & (ids[:, 1] >= 2)).all()  # one expert from each group
    assert_close(gates, torch.full((200, 2), 0.25))
    counts = torch.bincount(ids.flatten(), minlength=4)
    assert counts.min() > 70  # ~100 each: drawn at random, not by the scores


def test_drop_one_per_group():
    raw = torch.tensor([[0.4, 0.1, 0.3, 0.2], [0.5, 0.6, 0.1, 0.2]])
    ids = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])  # K' = 2 in both groups
    keep = drop_lowest_per_group(raw, ids, num_groups=2, num_experts=4)
    assert keep.tolist() == [[True, False, True, False], [False, True, False, True]]
    # A group the token did not use is left alone; K' = 1 drops everything routed.
    keep1 = drop_lowest_per_group(torch.tensor([[0.3, 0.2]]), torch.tensor([[0, 2]]), 2, 4)
    assert keep1.tolist() == [[False, False]]


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = config_from_dict({
        "name": "ko", "model": {"d_model": 16, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 8},
        "moe": {"num_experts": 4, "num_groups": 2, "top_k": 2, "expert_hidden": 8, "num_shared_experts": 1},
        "data": {"seq_len": 8},
    })  # fmt: skip
    model = MoGETransformer(cfg.model, cfg.moe).eval()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (2, 3, 8), generator=gen)
    return model, [(x[0], x[1]), (x[1], x[0])]


def test_knocked_out_restores_the_model():
    model, batches = _tiny_model()
    base = mean_loss(model, batches)
    with knocked_out(model, {0: Intervention("uniform"), 1: Intervention("remove", (1,))}):
        assert mean_loss(model, batches) != base
    assert all("route_tokens" not in layer.__dict__ for layer in model.moe_layers())
    assert mean_loss(model, batches) == base


def test_sweep_known_answers():
    model, batches = _tiny_model()
    with torch.no_grad():  # layer 0's routed experts output nothing: no intervention there matters
        next(model.moe_layers()).experts.w_down_EFD.zero_()
    k = knockout_sweep(model, batches, [0, 1])
    assert k["layers"] == [0, 1] and k["tokens"] == 48
    assert k["experts"][0] == [0.0] * 4 and k["groups"][0] == [0.0] * 2
    assert k["uniform"][0] == 0.0 and k["drop_one_per_group"][0] == 0.0
    # K' = 1: one fewer per group drops every routed expert of layer 1, as zeroing them does.
    bare = copy.deepcopy(model)
    with torch.no_grad():
        list(bare.moe_layers())[1].experts.w_down_EFD.zero_()
    expected = mean_loss(bare, batches) - k["baseline"]
    assert k["drop_one_per_group"][1] == pytest.approx(expected, abs=1e-6) and expected != 0.0
    assert k["all_layers"]["drop_one_per_group"] == pytest.approx(expected, abs=1e-6)
    assert all(d != 0.0 for d in k["experts"][1])


def test_eval_knockout_cli(tmp_path, capsys):
    cfg = config_from_dict({
        "name": "ko-run",
        "model": {"d_model": 16, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 16},
        "moe": {"num_experts": 4, "num_groups": 2, "top_k": 2, "expert_hidden": 8},
        "data": {"seq_len": 16},
        "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "log_every": 2, "eval_every": 0,
                  "eval_batches": 1, "save_every": 0, "threads": 1, "out_dir": str(tmp_path / "run")},
        "eval": {"batches": 1, "batch_size": 2},
        "monitor": {"every": 1},
    })  # fmt: skip
    train(cfg, progress=False)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--knockout", "1"]) == 0
    out = capsys.readouterr().out
    assert "knock-out on 32 val tokens" in out and "collapse monitor at step 2" in out
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert len(report["knockout"]["experts"]) == 2 and len(report["knockout"]["experts"][0]) == 4
    assert report["collapse"]["step"] == 2 and len(report["collapse"]["layers"]) == 2
    assert (tmp_path / "run" / "knockout.png").read_bytes()[:4] == b"\x89PNG"


def _two_level_model():
    """Two domains on the PanGu-Sigma router (K = 4 over a domain's 2 groups: 2 experts of each)."""
    torch.manual_seed(0)
    cfg = config_from_dict({
        "name": "ko-sigma", "model": {"d_model": 16, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 8},
        "moe": {"num_experts": 12, "num_groups": 4, "top_k": 4, "expert_hidden": 8, "router": "random",
                "rre_domain_groups": {"a": [0, 3], "b": [1, 2]}, "learned_expert_scale": True,
                "num_shared_experts": 1, "route_scale": 1.5},
        "data": {"seq_len": 8, "domains": {"a": ["*"], "b": ["b*"]}},
    })  # fmt: skip
    model = MoGETransformer(cfg.model, cfg.moe).eval()
    with torch.no_grad():  # experts far from their init, so that each one matters
        for layer in model.moe_layers():
            layer.experts.w_gate_up_EDH.normal_(std=1.0)
            layer.experts.w_down_EFD.normal_(std=1.0)
            layer.expert_scale_E.uniform_(0.5, 2.0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 8), generator=gen)
    return model, [Batch(x[0], x[1], torch.tensor([0, 1, 0])), Batch(x[1], x[0], torch.tensor([1, 1, 0]))]


def test_sweep_on_the_two_level_router_gives_the_batches_domains_and_keeps_its_table():
    model, batches = _two_level_model()
    k = knockout_sweep(model, batches, [0, 1])
    assert k["baseline"] == pytest.approx(mean_loss(model, batches), abs=0)
    # The fixed table has nothing else to offer: removing an expert is zeroing its weights.
    for pos, e in ((0, 0), (1, 7), (1, 11)):
        bare = copy.deepcopy(model)
        with torch.no_grad():
            list(bare.moe_layers())[pos].experts.w_down_EFD[e].zero_()
        expected = mean_loss(bare, batches) - k["baseline"]
        assert abs(expected) > 1e-4 and k["experts"][pos][e] == pytest.approx(expected, abs=1e-6)
    # The gates are already those of a router without preferences: uniform changes nothing.
    assert k["uniform"] == [0.0, 0.0] and k["all_layers"]["uniform"] == 0.0
    # One fewer per group keeps the higher-gated of a group's two experts, at its own gate.
    layer = next(model.moe_layers())
    x_TD = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    tokens_T, domains_T = torch.tensor([3, 7, 200, 3, 9]), torch.tensor([0, 1, 1, 0, 0])
    with torch.no_grad():
        out = layer(x_TD, tokens_T, domains_T)
    ids, gates = intervene(layer, out, tokens_T, Intervention("drop_one_per_group"), torch.Generator())
    assert torch.equal(ids, out.expert_ids)
    pairs_TMq = gates.reshape(5, 2, 2)  # a domain's two groups, two experts each
    assert ((pairs_TMq == 0).sum(-1) == 1).all()
    assert_close(pairs_TMq.amax(-1), out.weights.reshape(5, 2, 2).amax(-1), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("scope", "factor", "buckets", "room"), [("expert", 1.0, 4, 32), ("group", 0.75, 2, 48)]
)
def test_interventions_go_through_the_capacity_like_the_router(scope, factor, buckets, room):
    """The baseline drops the slots over capacity; an intervention must not lift that limit."""
    layer = _layer(capacity_factor=factor, capacity_scope=scope).eval()  # 4 experts, 2 groups, K' = 1
    x_TD = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))  # 128 slots over the buckets
    model = type("Model", (), {"moe_layers": lambda self: [layer]})()
    with torch.no_grad():
        base = layer(x_TD)
        for iv in (Intervention("remove", (0,)), Intervention("uniform", seed=3)):
            want_ids, gates = intervene(layer, base, None, iv, torch.Generator().manual_seed(iv.seed))
            with knocked_out(model, {0: iv}):
                got = layer(x_TD)
            assert torch.equal(got.expert_ids, want_ids)
            bucket_TK = want_ids if scope == "expert" else want_ids // 2
            live_TK = gates != 0  # a slot the intervention zeroed takes no room
            keep_TK = capacity.keep_within_capacity(
                base.scores.gather(1, want_ids), bucket_TK.masked_fill(~live_TK, buckets), buckets + 1, room
            )
            assert_close(got.weights, torch.where(keep_TK, gates, 0.0), rtol=0, atol=0)
            kept_B = torch.bincount(bucket_TK[got.weights != 0], minlength=buckets)
            assert int(kept_B.max()) <= room, iv.kind
            assert torch.equal(got.dropped, torch.bincount(want_ids[live_TK & ~keep_TK], minlength=4))
            if iv.kind == "remove" and scope == "expert":  # expert 1 takes all 64 tokens of group 0
                assert int(got.dropped[1]) == 64 - room


def test_a_slot_the_intervention_zeroed_takes_no_room():
    """One fewer per group (K' = 2) zeroes every token's second expert: those slots must not
    fill the room of the experts whose live slots the baseline would have kept."""
    cfg = dict(d_model=8, num_experts=4, num_groups=1, top_k=2, expert_hidden=4, capacity_factor=0.75)
    layer = MoGELayer(MoGEConfig(**cfg)).eval()  # K' = 2, room 0.75 T*K/E = 24
    x_TD = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    model = type("Model", (), {"moe_layers": lambda self: [layer]})()
    iv = Intervention("drop_one_per_group")
    with torch.no_grad():
        base = layer(x_TD)
        ids, gates = intervene(layer, base, None, iv, torch.Generator())
        with knocked_out(model, {0: iv}):
            got = layer(x_TD)
    priority_TK, zeroed_TK = base.scores.gather(1, ids), gates == 0
    assert int(zeroed_TK.sum()) == 64  # one slot of every token
    keep_TK = capacity.keep_within_capacity(priority_TK, ids.masked_fill(zeroed_TK, 4), 5, 24)
    assert_close(got.weights, torch.where(keep_TK, gates, 0.0), rtol=0, atol=0)
    assert torch.equal(got.dropped, torch.bincount(ids[~zeroed_TK & ~keep_TK], minlength=4))
    # Had the zeroed slots taken room, live slots would have been dropped for them.
    crowded_TK = capacity.keep_within_capacity(priority_TK, ids, 4, 24)
    assert int((~crowded_TK & ~zeroed_TK).sum()) > int((~keep_TK & ~zeroed_TK).sum())
