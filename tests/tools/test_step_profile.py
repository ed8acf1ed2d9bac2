import torch

from moge.tools.bench_train import build_train_cases, dense_equivalent, moge_case
from moge.tools.step_profile import GROUPS, format_profiles, module_groups, profile_steps
from moge.training.config import config_from_dict

CFG = {
    "name": "prof-tiny",
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 16},
    "moe": {"num_experts": 8, "num_groups": 2, "top_k": 2, "expert_hidden": 16, "num_shared_experts": 1},
    "data": {"seq_len": 16},
    "train": {"batch_size": 2},
}


def _profile(cfg, steps=2):
    case = moge_case(cfg, "case", seed=0)
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
