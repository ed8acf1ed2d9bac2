"""PanGu-Sigma's two-level RRE (moge.sigma.routing): the routing rule and its errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from ranks import run_ranks

from moge.layer import MoGEConfig, MoGELayer, total_aux_loss
from moge.sigma.routing import (
    domain_columns,
    domain_routed,
    make_domain_routing_table,
    reachable_experts,
)
from moge.training.config import config_from_dict

GROUPS = {"chat": [0, 1], "code": [2, 3], "math": [4, 5], "law": [6, 7]}


def layer_cfg(**kw) -> MoGEConfig:
    base = dict(
        d_model=16, num_experts=16, num_groups=8, top_k=2, expert_hidden=8, router="random",
        rre_vocab_size=50, rre_domain_groups=GROUPS, num_shared_experts=1, learned_expert_scale=True,
    )  # fmt: skip
    return MoGEConfig(**{**base, **kw})


def route(layer: MoGELayer, tokens_T: torch.Tensor, domains_T: torch.Tensor, x=None):
    x = torch.randn(tokens_T.shape[0], layer.config.d_model) if x is None else x
    return layer(x, token_ids=tokens_T, domain_ids=domains_T)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), n_tokens=st.integers(1, 64), rre_seed=st.integers(0, 1000))
def test_a_domains_tokens_never_leave_its_groups(seed, n_tokens, rre_seed):
    gen = torch.Generator().manual_seed(seed)
    layer = MoGELayer(layer_cfg(rre_seed=rre_seed))
    tokens = torch.randint(0, 50, (n_tokens,), generator=gen)
    domains = torch.randint(0, 4, (n_tokens,), generator=gen)
    out = route(layer, tokens, domains)
    groups_TK = out.expert_ids // layer.config.experts_per_group
    allowed = list(GROUPS.values())
    for t in range(n_tokens):
        # One expert from each of the domain's groups, in group order: nothing else.
        assert groups_TK[t].tolist() == allowed[int(domains[t])], (t, out.expert_ids[t])
    # The load lands only on the groups of the domains present.
    used = {g for d in domains.unique().tolist() for g in allowed[d]}
    load_M = out.load.view(8, 2).sum(-1)
    assert all((load_M[g] > 0) == (g in used) for g in range(8))


def test_routing_is_fixed_across_calls_inputs_and_instances():
    tokens = torch.arange(50).repeat(2)
    domains = torch.arange(100) % 4
    a = MoGELayer(layer_cfg())
    first = route(a, tokens, domains).expert_ids
    # Another call, another hidden state, another torch seed for the weights: same experts.
    torch.manual_seed(123)
    b = MoGELayer(layer_cfg())
    assert torch.equal(route(a, tokens, domains, x=torch.randn(100, 16) * 10).expert_ids, first)
    assert torch.equal(route(b, tokens, domains).expert_ids, first)
    # It depends on the token id and the domain only: a token repeated routes the same way.
    same = route(a, torch.full((3,), 7), torch.ones(3, dtype=torch.long)).expert_ids
    assert torch.equal(same, first[57:58].expand(3, 2))  # position 57: token 7, domain 57 % 4 = 1
    again = route(a, tokens[:4], domains[:4]).expert_ids
    assert torch.equal(again, first[:4])


def test_routing_is_fixed_across_checkpoints(tmp_path):
    from safetensors.torch import load_file, save_file

    layer = MoGELayer(layer_cfg())
    tokens, domains = torch.arange(50), torch.arange(50) % 4
    before = route(layer, tokens, domains).expert_ids
    assert "rre_table_VK" not in layer.state_dict()  # derived from the config, never stored
    save_file(layer.state_dict(), str(tmp_path / "layer.safetensors"))
    torch.manual_seed(7)
    loaded = MoGELayer(layer_cfg())
    loaded.load_state_dict(load_file(str(tmp_path / "layer.safetensors")))
    assert torch.equal(route(loaded, tokens, domains).expert_ids, before)
    assert torch.equal(loaded.rre_table_VK, layer.rre_table_VK)


def test_gates_are_uniform_and_nothing_is_learned_by_the_routing():
    layer = MoGELayer(layer_cfg(route_scale=2.0))
    out = route(layer, torch.arange(10), torch.zeros(10, dtype=torch.long))
    torch.testing.assert_close(out.weights, torch.full((10, 2), 1.0), rtol=0, atol=0)
    # The router weight gets no gradient through the output (only through aux/z losses).
    layer.config.aux_loss_coef = 0.0
    out = route(layer, torch.arange(10), torch.zeros(10, dtype=torch.long))
    out.hidden.sum().backward()
    assert layer.router.weight.grad is None


@pytest.mark.parametrize("aux_type", ["batch", "sequence", "released"])
def test_balance_and_z_losses_are_reported_but_move_nothing(aux_type):
    # The gates do not read the router, so a loss on its scores could only push the hidden
    # states through it: the losses are statistics, with their values, and no gradient.
    torch.manual_seed(0)
    layer = MoGELayer(layer_cfg(aux_loss_coef=0.5, z_loss_coef=0.5, aux_loss_type=aux_type))
    x = torch.randn(2, 6, 16, requires_grad=True)
    out = layer(x, token_ids=torch.arange(12).view(2, 6), domain_ids=torch.zeros(2, 6, dtype=torch.long))
    assert out.lb_loss.item() > 0 and out.z_loss.item() > 0
    torch.testing.assert_close(out.aux_loss, 0.5 * out.lb_loss + 0.5 * out.z_loss, rtol=1e-6, atol=0)
    assert not out.aux_loss.requires_grad and not out.scores.requires_grad
    (out.hidden.sum() + total_aux_loss([out], layer.config)).backward()
    assert layer.router.weight.grad is None
    plain = x.grad.clone()
    x.grad = None
    layer(
        x, token_ids=torch.arange(12).view(2, 6), domain_ids=torch.zeros(2, 6, dtype=torch.long)
    ).hidden.sum().backward()
    torch.testing.assert_close(x.grad, plain, rtol=0, atol=0)


def test_table_columns_of_kept_groups_are_redrawn_exactly():
    full = make_domain_routing_table(50, experts_per_group=4, per_group=2, seed=3, group_ids=range(6))
    part = make_domain_routing_table(50, experts_per_group=4, per_group=2, seed=3, group_ids=[2, 5])
    # Groups 2 and 5 of the full table are groups 0 and 1 of the part (ids shifted by group).
    torch.testing.assert_close(part[:, :2], full[:, 4:6] - 2 * 4, rtol=0, atol=0)
    torch.testing.assert_close(part[:, 2:], full[:, 10:12] - (5 - 1) * 4, rtol=0, atol=0)
    # Distinct experts of the right group within every (token, group), ascending.
    local = full.view(50, 6, 2) - torch.arange(6).view(1, 6, 1) * 4
    assert bool(((local >= 0) & (local < 4)).all()) and bool((local[..., 0] < local[..., 1]).all())


def test_domain_columns_and_reachable_experts():
    cols = domain_columns({"a": [3, 1], "b": [0, 2]}, per_group=2)
    assert cols.tolist() == [[2, 3, 6, 7], [0, 1, 4, 5]]  # ascending groups
    assert reachable_experts({"a": [3, 1]}, "a", 2) == [2, 3, 6, 7]


def test_a_single_domain_layer_needs_no_domain_ids():
    layer = MoGELayer(layer_cfg(rre_domain_groups={"only": [1, 4]}))
    out = layer(torch.randn(2, 5, 16), token_ids=torch.randint(0, 50, (2, 5)))
    assert sorted(set((out.expert_ids // 2).flatten().tolist())) == [1, 4]


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(rre_domain_groups={"a": [0, 8]}), "group 8 does not exist; groups are 0..7"),
        (dict(rre_domain_groups={"a": [0, 0]}), "listed twice"),
        (dict(rre_domain_groups={"a": [0, 1], "b": [2]}), "same number of groups"),
        (dict(rre_domain_groups={"a": [0, 1, 2]}, top_k=2), "cannot be split evenly over 3 groups"),
        (dict(rre_domain_groups={"a": [0]}, top_k=4), "asks 4 experts of a group of 2"),
        (dict(rre_domain_groups={"a": []}), "non-empty list of groups"),
        (dict(rre_domain_groups={}), "non-empty mapping"),
        (dict(router="grouped", top_k=8), "needs router: random"),
        (dict(rre_domain_groups=None, rre_group_ids=[0, 1]), "only meaningful with rre_domain_groups"),
        # rre_group_ids alone with another router: the error names the field that was set.
        (
            dict(router="grouped", top_k=8, rre_domain_groups=None, rre_group_ids=[0, 1]),
            "rre_group_ids: only meaningful with rre_domain_groups",
        ),
        (dict(rre_group_ids=[0, 0, 1, 2, 3, 4, 5, 6]), "distinct group numbers"),
    ],
)
def test_a_mapping_that_does_not_fit_the_groups_is_refused(kwargs, fragment):
    with pytest.raises(ValueError, match="rre_") as err:
        layer_cfg(**kwargs)
    assert fragment in str(err.value)


def test_unknown_or_missing_domains_are_clear_errors():
    layer = MoGELayer(layer_cfg())
    with pytest.raises(ValueError, match="domain_ids: 4 is not a domain; this layer has 4"):
        route(layer, torch.arange(3), torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match="has 4 domains and needs the domain of every sequence"):
        layer(torch.randn(3, 16), token_ids=torch.arange(3))
    with pytest.raises(ValueError, match="domain_ids: expected shape"):
        domain_routed(
            torch.arange(3), torch.zeros(2, dtype=torch.long), layer.rre_table_VK, layer.rre_columns_NK
        )


RUN = {
    "name": "t",
    "model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 16},
    "moe": {"num_experts": 8, "num_groups": 4, "top_k": 1, "expert_hidden": 8, "router": "random",
            "rre_domain_groups": {"statements": [0], "expressions": [1], "library": [2], "datamodel": [3]}},
    "data": {"seq_len": 16, "domains": "topics"},
}  # fmt: skip


def _with(section: str, **kw) -> dict:
    return {**RUN, section: {**RUN[section], **kw}}


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (_with("moe", rre_domain_groups={"statements": [0], "chat": [1], "library": [2], "datamodel": [3]}),
         "domain 'expressions' (data.domains) has no expert groups"),
        (_with("moe", rre_domain_groups={"statements": [0], "library": [2], "expressions": [1], "datamodel": [3]}),
         "differs from the data's"),
        (_with("data", domains={"statements": ["*"]}), "domain 'expressions' is not in the data"),
        (_with("data", domains=None), "4 domains need data whose sequences carry a domain"),
        ({**RUN, "parallel": {"expert_parallel": 2}}, "keep parallel.expert_parallel=1 (several processes train it data-parallel)"),
        (_with("data", only_domain="chat"), "data.only_domain: unknown domain 'chat'"),
        (_with("data", domains="topic"), "data.domains: expected one of topics, subfolders"),
    ],
)  # fmt: skip
def test_run_config_checks_domains_against_the_groups(raw, fragment):
    with pytest.raises(ValueError) as err:
        config_from_dict(raw)
    assert fragment in str(err.value)


def test_run_config_accepts_the_two_level_router_and_round_trips():
    from moge.training.config import config_to_dict

    cfg = config_from_dict(RUN)
    assert list(cfg.moe.rre_domain_groups) == ["statements", "expressions", "library", "datamodel"]
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_tiny_sigma_and_its_baseline_are_the_same_size_and_data():
    from pathlib import Path

    from moge.model import count_parameters
    from moge.training.config import load_config

    root = Path(__file__).resolve().parents[2] / "configs"
    sigma, base = load_config(root / "tiny-sigma.yaml"), load_config(root / "tiny-sigma-moge.yaml")
    assert count_parameters(sigma.model, sigma.moe) == count_parameters(base.model, base.moe)
    assert sigma.model == base.model and sigma.data == base.data and sigma.train == base.train
    assert list(sigma.moe.rre_domain_groups) == ["statements", "expressions", "library", "datamodel"]


def test_domains_may_share_groups_and_then_share_the_table():
    layer = MoGELayer(layer_cfg(rre_domain_groups={"a": [0, 1], "general": [1, 2]}))
    tokens = torch.arange(50)
    a = route(layer, tokens, torch.zeros(50, dtype=torch.long)).expert_ids
    g = route(layer, tokens, torch.ones(50, dtype=torch.long)).expert_ids
    assert set((a // 2).flatten().tolist()) == {0, 1} and set((g // 2).flatten().tolist()) == {1, 2}
    # In the shared group 1 a token meets the same expert whichever domain it comes from.
    assert torch.equal(a[:, 1], g[:, 0])


def _two_level_run(out_dir, **train) -> dict:
    steps = {"steps": 2, "batch_size": 2, "warmup_steps": 1, "eval_every": 0, "save_every": 0, "threads": 1}
    return {**RUN, "train": {**steps, "out_dir": str(out_dir), **train}}


def _data_parallel_worker(rank: int, world: int, root: str) -> None:
    from moge.training import train

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=world)
    try:
        train(config_from_dict(_two_level_run(Path(root) / "dp2")), progress=False)
    finally:
        dist.destroy_process_group()


def test_two_level_runs_train_data_parallel_as_one_process(tmp_path):
    # Refused with expert_parallel > 1 (above); with 1, every rank holds every expert and
    # routes its own sequences by their domains: one process with grad_accum 2 on the same draws.
    from moge.training import train

    run_ranks(_data_parallel_worker, 2, str(tmp_path), timeout=120)
    train(config_from_dict(_two_level_run(tmp_path / "one", grad_accum=2)), progress=False)
    lines = {name: (tmp_path / name / "metrics.jsonl").read_text().splitlines() for name in ("dp2", "one")}
    losses = {
        name: [r["loss"] for r in map(json.loads, v) if r["type"] == "train"] for name, v in lines.items()
    }
    assert len(losses["one"]) == 2
    torch.testing.assert_close(losses["dp2"], losses["one"], rtol=1e-5, atol=1e-6)
