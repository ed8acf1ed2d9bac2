"""Capacity and token dropping: which slots go, what happens to them, and MoGE's quota.

Rule (moge.capacity): every bucket (expert, or group = device) keeps at most
ceil(cf * slots / buckets) slots, those of highest router score; ties keep the earlier
token. A dropped slot's gate is 0: the token keeps its other experts and the residual.
"""

import json
import math

import pytest
import torch
from reference import reference_experts
from torch.testing import assert_close

from moge import MoGEConfig, MoGELayer
from moge.balance import routing_stats
from moge.capacity import bucket_capacity, keep_within_capacity
from moge.training import train
from moge.training.config import config_from_dict

BASE = dict(d_model=16, num_experts=8, num_groups=4, top_k=4, expert_hidden=12)


def make(**kw):
    torch.manual_seed(0)
    return MoGELayer(MoGEConfig(**{**BASE, **kw}))


def brute_force_keep(scores_TE, ids_TK, bucket_of, capacity):
    """Slot by slot: a slot stays if fewer than `capacity` slots of its bucket beat it."""
    T, K = ids_TK.shape
    slots = [
        (int(bucket_of(int(ids_TK[t, k]))), -float(scores_TE.detach()[t, ids_TK[t, k]]), t, k)
        for t in range(T)
        for k in range(K)
    ]
    keep = torch.zeros(T, K, dtype=torch.bool)
    for b in {s[0] for s in slots}:
        ranked = sorted(s for s in slots if s[0] == b)  # highest score, then earlier token
        for _, _, t, k in ranked[:capacity]:
            keep[t, k] = True
    return keep


def test_capacity_rounds_up_exactly():
    assert bucket_capacity(48, 8, 1.0) == 6
    assert bucket_capacity(48, 8, 1.1) == 7  # 6.6
    assert bucket_capacity(10, 4, 1.0) == 3  # 2.5
    assert bucket_capacity(16, 8, 1e-12) == 1  # a positive share below the rounding: still ceil = 1
    assert bucket_capacity(0, 8, 1.0) == 0  # no slots, no room
    with pytest.raises(ValueError, match="capacity_factor"):
        bucket_capacity(10, 4, 0.0)


@pytest.mark.parametrize("router", ["grouped", "global", "group_limited"])
def test_large_capacity_equals_dropless_exactly(router):
    kw = dict(router=router, topk_groups=2 if router == "group_limited" else None)
    dropless, capped = make(**kw), make(**kw, capacity_factor=float(BASE["num_experts"]))
    x = torch.randn(24, 16)
    a, b = dropless(x), capped(x)
    assert_close(b.hidden, a.hidden, rtol=0, atol=0)
    assert_close(b.weights, a.weights, rtol=0, atol=0)
    assert int(b.dropped.sum()) == 0 and b.dropped_fraction == 0.0
    a.hidden.square().sum().backward()
    b.hidden.square().sum().backward()
    for p, q in zip(dropless.parameters(), capped.parameters(), strict=True):
        assert_close(q.grad, p.grad, rtol=0, atol=0)


@pytest.mark.parametrize("scope", ["expert", "group"])
@pytest.mark.parametrize("router", ["grouped", "global"])
def test_dropped_slots_follow_the_rule_and_add_nothing(scope, router):
    layer = make(router=router, capacity_factor=0.75, capacity_scope=scope)
    torch.manual_seed(5)
    x = torch.randn(20, 16)
    out = layer(x)
    buckets = 8 if scope == "expert" else 4
    cap = math.ceil(0.75 * 20 * 4 / buckets)
    bucket_of = (lambda e: e) if scope == "expert" else (lambda e: e // 2)
    keep = brute_force_keep(out.scores, out.expert_ids, bucket_of, cap)
    assert not bool(keep.all())  # this case drops something
    full_w = out.scores.gather(1, out.expert_ids)  # no renormalisation, no scale: gate = score
    assert_close(out.weights, torch.where(keep, full_w, 0.0), rtol=0, atol=0)
    assert_close(out.dropped, torch.bincount(out.expert_ids[~keep], minlength=8), rtol=0, atol=0)
    assert out.dropped_fraction == pytest.approx(float((~keep).sum()) / 80)
    # The output is the kept slots' experts only (dropped tokens: residual only).
    w1, w2 = layer.experts.w_gate_up_EDH.detach(), layer.experts.w_down_EFD.detach()
    expected = reference_experts(x, out.expert_ids, torch.where(keep, full_w, 0.0), w1, w2)
    assert_close(out.hidden, expected, rtol=1e-5, atol=1e-6)
    stats = routing_stats(out.expert_ids, 8, 4, dropped=out.dropped)
    assert stats.dropped_fraction == pytest.approx(out.dropped_fraction)


def test_moge_per_group_capacity_one_drops_nothing_global_topk_does():
    grouped = make(router="grouped", capacity_factor=1.0, capacity_scope="group")
    plain = make(router="global", capacity_factor=1.0, capacity_scope="group")
    dropped_global = 0
    for seed in range(5):
        torch.manual_seed(seed)
        x = torch.randn(16, 16)
        assert int(grouped(x).dropped.sum()) == 0  # T*K/M slots per group, by construction
        dropped_global += int(plain(x).dropped.sum())
    assert dropped_global > 0


def test_padding_takes_no_capacity():
    layer = make(capacity_factor=1.0, capacity_scope="group")
    x = torch.randn(2, 6, 16)
    mask = torch.arange(6)[None, :] < torch.tensor([6, 3])[:, None]
    out = layer(x, mask=mask)
    assert int(out.dropped.sum()) == 0  # capacity from the 9 real tokens, padding never counted
    alone = layer(x[mask])
    assert_close(out.weights[mask.reshape(-1)], alone.weights, rtol=0, atol=0)


def test_keep_is_deterministic_on_ties():
    prio = torch.ones(4, 1)
    keep = keep_within_capacity(prio, torch.zeros(4, 1, dtype=torch.long), 1, 2)
    assert keep.squeeze(1).tolist() == [True, True, False, False]  # earlier tokens win ties


def test_bad_capacity_settings_are_refused():
    with pytest.raises(ValueError, match="capacity_factor"):
        make(capacity_factor=0.0)
    with pytest.raises(ValueError, match="capacity_scope"):
        make(capacity_factor=1.0, capacity_scope="device")


def test_training_records_the_dropped_fraction(tmp_path):
    def run(name, moe):
        cfg = config_from_dict(
            {
                "name": name,
                "model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 16},
                "moe": {"num_experts": 8, "num_groups": 4, "top_k": 4, "expert_hidden": 8, **moe},
                "data": {"seq_len": 16},
                "train": {"steps": 1, "batch_size": 2, "warmup_steps": 1, "log_every": 1, "eval_every": 0,
                          "eval_batches": 1, "save_every": 0, "threads": 1, "out_dir": str(tmp_path / name)},
            }
        )  # fmt: skip
        n = torch.get_num_threads()
        try:
            train(cfg, progress=False)
        finally:
            torch.set_num_threads(n)
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if r["type"] == "train"][0]["routing"][0][
            "dropped_fraction"
        ]

    assert run("dropless", {}) == 0.0
    # Under-filled experts do not lend their room, so more than half may go at 0.5.
    assert 0.0 < run("capped", {"router": "global", "capacity_factor": 0.5}) < 1.0
