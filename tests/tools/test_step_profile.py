import torch

from moge.experts import GroupedExperts
from moge.tools.bench_train import build_train_cases, dense_equivalent, moge_case
from moge.tools.step_profile import (
    GROUPS,
    counting_chunks,
    format_profiles,
    merge_profiles,
    module_groups,
    profile_steps,
)
from moge.training.config import config_from_dict

CFG = {
    "name": "prof-tiny",
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 16},
    "moe": {"num_experts": 8, "num_groups": 2, "top_k": 2, "expert_hidden": 16, "num_shared_experts": 1},
    "data": {"seq_len": 16},
    "train": {"batch_size": 2},
}


def _profile(cfg, steps=2, case=None):
    """profile_steps of `steps` steps of the case (a new moge_case of cfg when None)."""
    case = case or moge_case(cfg, "case", seed=0)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (2, 17), generator=gen) for _ in range(2 * steps + 1)]

    def step():
        b = batches.pop()
        case.step(b[:, :-1], b[:, 1:], 1e-3, 1.0, record=False)

    step()  # warm
    return profile_steps(case.model, step, steps)


def test_forward_and_backward_time_lands_in_the_groups_that_ran():
    cfg = config_from_dict(CFG)
    moe = _profile(cfg)["ms"]
    for group in ("attention", "norms", "router and losses", "routed experts", "shared expert"):
        # The backward is found through the forward's sequence numbers: its own group.
        assert moe[(group, "forward")] > 0 and moe[(group, "backward")] > 0, group
    assert moe[("optimizer (AdamW)", "step")] > 0 and moe[("clip", "step")] > 0
    assert ("dense FFN", "forward") not in moe
    dense = _profile(dense_equivalent(cfg))
    assert dense["ms"][("dense FFN", "backward")] > 0 and ("routed experts", "forward") not in dense["ms"]
    assert all(g in GROUPS for g, _ in moe)
    text = format_profiles({"moge": {"ms": moe, "items": {}, "faults": 0.0}, "dense": dense})
    assert "routed experts" in text and "[2] dense" in text


def test_every_moe_module_has_a_group():
    cases, _ = build_train_cases(config_from_dict(CFG), seed=0, peers=False)
    groups = module_groups(cases[0].model)
    layer = next(cases[0].model.moe_layers())
    assert groups[layer] == "router and losses" and groups[layer.experts] == "routed experts"
    assert groups[layer.shared] == "shared expert"


def test_profile_counts_every_fused_chunk_of_the_step_and_restores_the_plan():
    cfg = config_from_dict(CFG)
    case = moge_case(cfg, "case", seed=0)
    moe = _profile(cfg, case=case)
    assert not any("_fused_plan" in vars(m) for m in case.model.modules())  # the plan method is back
    # 2 MoE layers, each call 2 groups of one token block: 4 chunks a step, of either kind.
    chunks = moe["chunks"]
    assert chunks["one bmm"] + chunks["one mm per expert"] == 4
    assert chunks["padding %"] >= 0
    dense = _profile(dense_equivalent(cfg))
    assert dense["chunks"]["one bmm"] == dense["chunks"]["one mm per expert"] == 0
    text = format_profiles({"moge": moe, "dense": dense})
    assert "fused chunks: one mm per expert" in text and "fused padding rows, % of slots" in text


def test_counting_chunks_tells_bmm_from_per_expert_chunks_and_changes_no_output():
    torch.manual_seed(0)
    experts = GroupedExperts(6, 8, 6, impl="fused")
    experts.reset_parameters()  # built uninitialised
    experts.experts_per_chunk = 2
    # Experts 0-1 and 2-3: 3 slots each (equal: one bmm a chunk); 4-5: 1 and 5 (one mm each).
    ids_TK = torch.tensor([[0, 2, 4], [0, 2, 5], [0, 2, 5], [1, 3, 5], [1, 3, 5], [1, 3, 5]])
    x_TD, w_TK = torch.randn(6, 8), torch.rand(6, 3)
    plain = experts(x_TD, ids_TK, w_TK)
    with counting_chunks(experts) as counts:
        counted = experts(x_TD, ids_TK, w_TK)
    assert counts == {"one bmm": 2, "one mm per expert": 1, "rows": 18, "slots": 18}
    torch.testing.assert_close(counted, plain, rtol=0, atol=0)
    assert "_fused_plan" not in vars(experts)  # the method is back
    experts(x_TD, ids_TK, w_TK)
    assert counts["one bmm"] == 2  # a call after the block counts nowhere


def test_merge_profiles_averages_the_chunk_counts():
    a = {
        "ms": {},
        "items": {},
        "faults": 1.0,
        "chunks": {"one bmm": 2.0, "one mm per expert": 6.0, "padding %": 1.0},
    }
    b = {
        "ms": {},
        "items": {},
        "faults": 3.0,
        "chunks": {"one bmm": 0.0, "one mm per expert": 8.0, "padding %": 3.0},
    }
    merged = merge_profiles([a, b])
    assert merged["chunks"] == {"one bmm": 1.0, "one mm per expert": 7.0, "padding %": 2.0}
    assert merged["faults"] == 2.0
