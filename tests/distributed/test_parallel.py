"""Expert parallelism + FSDP2 on gloo (moge.distributed): forked workers run the layer
and the model parallelized by `parallelize` and write what they saw (gradients and
weights gathered whole through the DTensors); the parent runs the single-process layer
on every rank's tokens and compares.

One launch per world size (2 and 4) runs every scenario, so the suite pays the
process start-up twice. Workers are forked, not spawned: a spawned worker re-imports
torch, which takes seconds per process on a 2-core machine.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from init_cases import INIT_MODEL, INIT_MOE
from ranks import run_ranks
from safetensors.torch import load_file, save_file
from torch import nn
from torch.testing import assert_close
from torch.testing._internal.distributed.fake_pg import FakeStore

import moge
from moge.distributed.config import ParallelConfig
from moge.distributed.expert_parallel import ExpertParallelExperts, ExpertParallelMoGE, expert_placement
from moge.distributed.mesh import connect
from moge.distributed.parallelize import checkpoint_views, clip_grads_, grad_norm, local, parallelize
from moge.dropin import MoGEMLP
from moge.layer import MoGEConfig, MoGELayer
from moge.model import MoGETransformer
from moge.model.config import ModelConfig

T, STEPS, LR, VOCAB = 6, 2, 0.5, 50  # tokens per rank, steps, SGD rate, random-router vocab
BASE = dict(
    d_model=16, num_experts=8, num_groups=4, top_k=4, expert_hidden=8, num_shared_experts=1,
    aux_loss_coef=0.01, z_loss_coef=0.01, bias_update_rate=0.01,
)  # fmt: skip
# name -> (MoGEConfig overrides, test options)
SCENARIOS = {
    "grouped": (dict(router="grouped", learned_expert_scale=True), {}),
    "grouped_counted": (dict(router="grouped"), dict(static=False)),
    "global": (dict(router="global", normalize_weights=True), {}),
    "group_limited": (dict(router="group_limited", topk_groups=2, score_func="sigmoid", route_scale=2.0), {}),
    "random": (dict(router="random", rre_vocab_size=VOCAB, learned_expert_scale=True), {}),
    # Every token picks experts 0-3; "loop" gives no graph for 0 slots on its own.
    "skewed": (dict(router="global", expert_impl="loop"), dict(skew=True)),
    # Even ranks' tokens pick experts 0-3, odd ranks' 4-7: every expert idle on some rank,
    # busy on another (the case that doubled expert gradients in DeepSpeed/megablocks at EP=2).
    "idle_on_some_ranks": (dict(router="global", learned_expert_scale=True), dict(skew="by_rank")),
}
FAVOURED = torch.tensor([5.0, 5, 5, 5, -5, -5, -5, -5])
MAX_NORM = 0.01
TINY_MODEL = dict(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=8)


# --- what the workers and the parent both build ------------------------------------------


def build_layer(name: str) -> MoGELayer:
    kw, opts = SCENARIOS[name]
    torch.manual_seed(0)
    layer = MoGELayer(MoGEConfig(**{**BASE, **kw}))
    if opts.get("skew"):
        with torch.no_grad():
            layer.router.weight[:, 0] = FAVOURED  # with x[:, 0] > 0 these 4 experts win
    return layer


def make_data(name: str, world: int):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, world * T, BASE["d_model"], generator=gen)
    if SCENARIOS[name][1].get("skew"):
        x[..., 0] = x[..., 0].abs() + 1
    if SCENARIOS[name][1].get("skew") == "by_rank":
        sign_R = 1 - 2 * (torch.arange(world) % 2)  # +1 on even ranks, -1 on odd ones
        x[..., 0] *= sign_R.repeat_interleave(T)
    target = torch.randn(x.shape, generator=gen)
    ids = torch.randint(0, VOCAB, (STEPS, world * T), generator=gen)
    return x, target, ids


def rank_loss(layer, x, target, ids):
    """The loss of one rank's tokens: the output against a fixed target, plus aux."""
    out = layer(x, token_ids=ids if layer.config.router == "random" else None)
    return out, (out.hidden * target).sum() + out.aux_loss


@torch.no_grad()
def sgd(module) -> None:
    for p in module.parameters():
        p -= LR * p.grad


def build_model(seed: int = 0) -> MoGETransformer:
    torch.manual_seed(seed)
    moe = MoGEConfig(**{**BASE, "router": "global", "learned_expert_scale": True})
    return MoGETransformer(ModelConfig(**TINY_MODEL), moe)


def model_batch(world: int):
    """[2 (tokens, targets), world, B, L] token ids."""
    gen = torch.Generator().manual_seed(2)
    return torch.randint(0, TINY_MODEL["vocab_size"], (2, world, 2, 4), generator=gen)


# --- workers --------------------------------------------------------------------------------


def _save(out_dir: str, stem: str, tensors: dict, info: dict) -> None:
    save_file(
        {k: v.detach().contiguous().clone() for k, v in tensors.items()}, f"{out_dir}/{stem}.safetensors"
    )
    Path(f"{out_dir}/{stem}.json").write_text(json.dumps(info))


class Holder(nn.Module):
    """A bare layer as the root FSDP2 module (its forward gathers the shards)."""

    def __init__(self, layer: MoGELayer) -> None:
        super().__init__()
        self.ffn = layer

    def forward(self, x, ids):
        return self.ffn(x, token_ids=ids if self.ffn.config.router == "random" else None)


def whole(module, world, tensors: dict) -> dict:
    """Name -> the whole tensor of a parameter-shaped DTensor (a collective)."""
    views = checkpoint_views(module, world)
    return {n: (views[n](t) if n in views else t).full_tensor() for n, t in tensors.items()}


def _layer_scenario(name: str, out_dir: str, ep: int, tag: str = "") -> None:
    static = SCENARIOS[name][1].get("static")
    world = connect(ParallelConfig(expert_parallel=ep), BASE["num_groups"])
    holder = parallelize(Holder(build_layer(name)), world, static)
    layer = holder.ffn
    x_all, target_all, ids_all = make_data(name, world.size)
    rows = slice(world.rank * T, (world.rank + 1) * T)
    res, stats = {}, []
    for step in range(STEPS):
        holder.zero_grad()
        x = x_all[step, rows].clone().requires_grad_()
        out = holder(x, ids_all[step, rows])
        ((out.hidden * target_all[step, rows]).sum() + out.aux_loss).backward()
        res.update({f"{step}.hidden": out.hidden, f"{step}.aux": out.aux_loss, f"{step}.ids": out.expert_ids})
        res[f"{step}.x_grad"] = x.grad
        grads = whole(holder, world, {n: p.grad for n, p in holder.named_parameters()})
        res.update({f"{step}.grad.{n[4:]}": g for n, g in grads.items()})
        stats.append(layer.last_exchange.as_dict())
        res[f"{step}.norm"] = grad_norm(holder, world)
        clip_grads_(holder, MAX_NORM, res[f"{step}.norm"])
        sgd(holder)
        layer.end_step()
        res[f"{step}.bias"] = layer.balance_bias_E.clone()
    sd = whole(holder, world, {n: p for n, p in holder.named_parameters()})
    res.update({f"sd.{k[4:]}": v for k, v in sd.items()})
    info = dict(
        stats=stats, count_exchanges=layer.experts.count_exchanges, calls=layer.experts.calls,
        local_shape=list(layer.experts.w_gate_up_EDH.to_local().shape),
    )  # fmt: skip
    _save(out_dir, f"{tag}{name}.rank{world.rank}", res, info)


def _model_scenario(out_dir: str, ep: int) -> None:
    world = connect(ParallelConfig(expert_parallel=ep), BASE["num_groups"])
    model = parallelize(build_model(), world)
    batch = model_batch(world.size)
    out = model(batch[0, world.rank], batch[1, world.rank])
    out.loss.backward()
    norm = grad_norm(model, world)
    clip_grads_(model, MAX_NORM, norm)
    grads = whole(model, world, {n: p.grad for n, p in model.named_parameters()})
    weights = whole(model, world, dict(model.named_parameters()))
    info = dict(
        types=sorted({type(b.ffn).__name__ for b in model.blocks}), moe_layers=len(list(model.moe_layers()))
    )
    tensors = {**{f"grad.{k}": v for k, v in grads.items()}, **{f"sd.{k}": v for k, v in weights.items()}}
    _save(out_dir, f"model.rank{world.rank}", {**tensors, "norm": norm}, info)


def reset_module_by_module(model: nn.Module) -> None:
    """to_empty, every tensor 7 (to_empty's memory holds any bits), then reset_parameters()
    on every module that has one, parents first: FSDP's meta-device materialisation."""
    model.to_empty(device="cpu")
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            local(t).fill_(7)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()


def _worker(rank: int, world: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    try:
        for name in SCENARIOS:
            _layer_scenario(name, out_dir, world)
        if world == 4:  # a (dp 2 x ep 2) mesh
            _layer_scenario("grouped", out_dir, 2, tag="dp_")
        _model_scenario(out_dir, world)
    finally:
        dist.destroy_process_group()


def _launch(world: int, out_dir: Path, timeout: float = 120.0) -> None:
    run_ranks(_worker, world, str(out_dir), timeout=timeout)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """run(world) -> folder of that world's results; each world is launched once."""
    done: dict[int, Path] = {}

    def get(world: int) -> Path:
        if world not in done:
            folder = tmp_path_factory.mktemp(f"ep{world}")
            _launch(world, folder)
            done[world] = folder
        return done[world]

    return get


def load_rank(folder: Path, stem: str, rank: int) -> tuple[dict, dict]:
    info = json.loads((folder / f"{stem}.rank{rank}.json").read_text())
    return load_file(folder / f"{stem}.rank{rank}.safetensors"), info


# --- the single-process reference ----------------------------------------------------------


@functools.cache
def reference(name: str, world: int) -> dict:
    """The full layer on every rank's tokens, loss = mean of the per-rank losses."""
    layer = build_layer(name)
    x_all, target_all, ids_all = make_data(name, world)
    ref = {}
    for step in range(STEPS):
        layer.zero_grad()
        xs, total = [], 0.0
        for r in range(world):
            rows = slice(r * T, (r + 1) * T)
            xs.append(x_all[step, rows].clone().requires_grad_())
            out, loss = rank_loss(layer, xs[-1], target_all[step, rows], ids_all[step, rows])
            total = total + loss / world
            ref.update({f"{step}.hidden.{r}": out.hidden.detach(), f"{step}.aux.{r}": out.aux_loss.detach()})
            ref[f"{step}.ids.{r}"] = out.expert_ids
        total.backward()
        for r, x in enumerate(xs):
            ref[f"{step}.x_grad.{r}"] = x.grad
        ref.update({f"{step}.grad.{n}": p.grad.clone() for n, p in layer.named_parameters()})
        ref[f"{step}.norm"] = torch.nn.utils.clip_grad_norm_(layer.parameters(), MAX_NORM)
        sgd(layer)
        layer.end_step()  # the per-rank calls accumulated every rank's load
        ref[f"{step}.bias"] = layer.balance_bias_E.clone()
    ref.update({f"sd.{k}": v for k, v in layer.state_dict().items()})
    return ref


def owners(world: int) -> torch.Tensor:
    owner_E = torch.empty(BASE["num_experts"], dtype=torch.long)
    for r, row in enumerate(expert_placement(BASE["num_experts"], BASE["num_groups"], world)):
        owner_E[row] = r
    return owner_E


# --- tests: placement and validation (no processes) -----------------------------------------


def test_placement_is_contiguous_blocks_of_groups():
    assert expert_placement(8, 4, 2).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert expert_placement(8, 4, 4).tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert expert_placement(8, 4, 1).tolist() == [list(range(8))]
    assert sorted(expert_placement(64, 8, 4).reshape(-1).tolist()) == list(range(64))


@pytest.mark.parametrize("world", [3, 8, 0])
def test_placement_rejects_a_world_that_does_not_divide_the_groups(world):
    with pytest.raises(ValueError, match=r"^parallel\.expert_parallel: "):
        expert_placement(8, 4, world)


def test_static_splits_need_a_quota_router():
    with pytest.raises(ValueError, match=r"^static_splits: the global router"):
        ExpertParallelMoGE(MoGEConfig(**{**BASE, "router": "global"}), static_splits=True)


# --- tests: against the single-process layer --------------------------------------------------


@pytest.mark.parametrize("world", [2, 4])
def test_idle_scenario_leaves_each_expert_idle_on_some_rank(world):
    ref = reference("idle_on_some_ranks", world)
    for step in range(STEPS):
        for r in range(world):
            used = set(ref[f"{step}.ids.{r}"].flatten().tolist())
            assert used == ({0, 1, 2, 3} if r % 2 == 0 else {4, 5, 6, 7})


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_outputs_and_grads_match_the_single_process_layer(run, world, name):
    folder, ref = run(world), reference(name, world)
    for r in range(world):
        got, info = load_rank(folder, name, r)
        assert info["local_shape"] == [
            BASE["num_experts"] // world,
            BASE["d_model"],
            2 * BASE["expert_hidden"],
        ]
        for step in range(STEPS):
            assert torch.equal(got[f"{step}.ids"], ref[f"{step}.ids.{r}"])
            assert_close(got[f"{step}.hidden"], ref[f"{step}.hidden.{r}"])
            assert_close(got[f"{step}.aux"], ref[f"{step}.aux.{r}"])
            # Each rank backpropagates its own loss; the global loss is their mean.
            assert_close(got[f"{step}.x_grad"], world * ref[f"{step}.x_grad.{r}"])
            grads = {k.split(".grad.")[1]: v for k, v in got.items() if k.startswith(f"{step}.grad.")}
            ref_grads = {k.split(".grad.")[1]: v for k, v in ref.items() if k.startswith(f"{step}.grad.")}
            assert grads.keys() == ref_grads.keys() and len(grads) >= 5
            for n in ref_grads:
                assert_close(grads[n], ref_grads[n], msg=lambda m: f"rank {r} step {step} {n}: {m}")
            # Clipped by the norm of the whole layer, the same on every rank.
            assert ref[f"{step}.norm"] > 2 * MAX_NORM
            assert_close(got[f"{step}.norm"], ref[f"{step}.norm"])


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", ["grouped", "global"])
def test_bias_update_uses_the_global_load(run, world, name):
    folder, ref = run(world), reference(name, world)
    for step in range(STEPS):
        for r in range(world):
            got, _ = load_rank(folder, name, r)
            assert torch.equal(got[f"{step}.bias"], ref[f"{step}.bias"])
    assert ref["0.bias"].abs().sum() > 0  # the update did something


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", ["grouped", "random"])
def test_quota_routers_skip_the_count_exchange_and_move_equal_volumes(run, world, name):
    folder = run(world)
    per_rank = T * BASE["top_k"] // world
    volumes = set()
    for r in range(world):
        _, info = load_rank(folder, name, r)
        assert info["count_exchanges"] == 0 and info["calls"] == STEPS
        for s in info["stats"]:
            assert s["static"] and not s["count_exchange"]
            assert s["send_slots"] == [per_rank] * world and s["recv_slots"] == [per_rank] * world
            volumes.add((s["token_bytes"], s["meta_bytes"]))
    assert volumes == {(2 * T * BASE["top_k"] * BASE["d_model"] * 4, T * BASE["top_k"] * 4)}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", ["grouped_counted", "global", "group_limited", "skewed"])
def test_other_routers_exchange_counts_and_split_by_the_routing(run, world, name):
    folder, ref = run(world), reference(name, world)
    owner_E = owners(world)
    sends = []
    for r in range(world):
        _, info = load_rank(folder, name, r)
        assert info["count_exchanges"] == STEPS
        sends.append([s["send_slots"] for s in info["stats"]])
        for step, s in enumerate(info["stats"]):
            assert not s["static"] and s["count_exchange"]
            expected = torch.bincount(owner_E[ref[f"{step}.ids.{r}"].reshape(-1)], minlength=world)
            assert s["send_slots"] == expected.tolist()
    for r in range(world):
        _, info = load_rank(folder, name, r)
        for step, s in enumerate(info["stats"]):
            assert s["recv_slots"] == [sends[src][step][r] for src in range(world)]


@pytest.mark.parametrize("world", [2, 4])
def test_zero_splits_when_every_token_picks_the_same_experts(run, world):
    folder = run(world)
    idle = {1} if world == 2 else {2, 3}  # ranks that hold none of experts 0-3
    for r in range(world):
        _, info = load_rank(folder, "skewed", r)
        for s in info["stats"]:
            assert [i for i, n in enumerate(s["send_slots"]) if n == 0] == sorted(idle)
            assert (sum(s["recv_slots"]) == 0) == (r in idle)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_the_shards_make_up_the_single_process_weights(run, world, name):
    folder, ref = run(world), reference(name, world)
    for r in range(world):
        got, _ = load_rank(folder, name, r)
        sd = {k: v for k, v in got.items() if k.startswith("sd.")}
        ref_sd = {k: v for k, v in ref.items() if k.startswith("sd.") and not k.endswith("balance_bias_E")}
        assert sd.keys() == ref_sd.keys()
        for k in ref_sd:
            assert_close(sd[k], ref_sd[k], msg=lambda m: f"rank {r} {k}: {m}")


def test_a_dp2_x_ep2_mesh_shards_the_experts_over_both(run):
    folder, ref = run(4), reference("grouped", 4)
    for r in range(4):
        got, info = load_rank(folder, "dp_grouped", r)
        # ep cuts the experts, FSDP2 over dp their second axis
        assert info["local_shape"] == [
            BASE["num_experts"] // 2,
            BASE["d_model"] // 2,
            2 * BASE["expert_hidden"],
        ]
        assert info["count_exchanges"] == 0
        assert all(s["send_slots"] == [T * BASE["top_k"] // 2] * 2 for s in info["stats"])
        for step in range(STEPS):
            assert_close(got[f"{step}.hidden"], ref[f"{step}.hidden.{r}"])
            assert_close(got[f"{step}.x_grad"], 4 * ref[f"{step}.x_grad.{r}"])
            assert torch.equal(got[f"{step}.bias"], ref[f"{step}.bias"])
            assert_close(got[f"{step}.norm"], ref[f"{step}.norm"])
            for n, p in ref.items():
                if n.startswith(f"{step}.grad."):
                    assert_close(got[n], p, msg=lambda m: f"rank {r} {n}: {m}")
        for k in (k for k in ref if k.startswith("sd.") and not k.endswith("balance_bias_E")):
            assert_close(got[k], ref[k])


@pytest.mark.parametrize("world", [2, 4])
def test_parallelized_model_matches_the_single_process_model(run, world):
    folder = run(world)
    model, batch = build_model(), model_batch(world)
    (sum(model(batch[0, r], batch[1, r]).loss for r in range(world)) / world).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    assert norm > 2 * MAX_NORM  # the clipping did scale the grads
    for r in range(world):
        got, info = load_rank(folder, "model", r)
        assert info["types"] == ["ExpertParallelMoGE"] and info["moe_layers"] == 2
        assert_close(got["norm"], norm)
        for n, p in model.named_parameters():
            assert_close(got[f"grad.{n}"], p.grad, msg=lambda m: f"rank {r} {n}: {m}")
        for k, v in model.named_parameters():
            assert torch.equal(got[f"sd.{k}"], v), k


# --- the two-level random router (PanGu-Sigma): no per-group quota ------------------------------

# Domain "low" reaches groups 0-1 only, "high" groups 2-3: under ep 2 a rank whose tokens
# are all "low" sends every slot to rank 0, so the splits follow the routing.
TWO_LEVEL = dict(
    router="random", rre_vocab_size=VOCAB, top_k=2, rre_domain_groups={"low": [0, 1], "high": [2, 3]}
)


def _two_level_data(world: int):
    gen = torch.Generator().manual_seed(3)
    x_RTD = torch.randn(world, T, BASE["d_model"], generator=gen)
    target_RTD = torch.randn(x_RTD.shape, generator=gen)
    ids_RT = torch.randint(0, VOCAB, (world, T), generator=gen)
    domains_RT = torch.zeros(world, T, dtype=torch.long)
    domains_RT[0, T // 2 :] = 1  # rank 0: both domains; rank 1: "low" only
    return x_RTD, target_RTD, ids_RT, domains_RT


def _two_level_layer() -> MoGELayer:
    torch.manual_seed(0)
    return MoGELayer(MoGEConfig(**{**BASE, **TWO_LEVEL}))


def _two_level_worker(rank: int, world: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    try:
        group = dist.new_group(list(range(world)))
        layer = ExpertParallelMoGE.from_layer(_two_level_layer(), group)  # static_splits: the default
        x_RTD, target_RTD, ids_RT, domains_RT = _two_level_data(world)
        x_TD = x_RTD[rank].clone().requires_grad_()
        out = layer(x_TD, token_ids=ids_RT[rank], domain_ids=domains_RT[rank])
        (out.hidden * target_RTD[rank]).sum().backward()
        info = {"static": layer.experts.static_splits, "send": list(layer.last_exchange.send_slots)}
        _save(out_dir, f"two_level.rank{rank}", {"hidden": out.hidden, "x_grad": x_TD.grad}, info)
    finally:
        dist.destroy_process_group()


def test_the_two_level_random_router_has_no_quota_for_static_splits():
    with pytest.raises(ValueError, match=r"^static_splits: the random router with rre_domain_groups"):
        ExpertParallelMoGE(MoGEConfig(**{**BASE, **TWO_LEVEL}), static_splits=True)


def test_the_two_level_random_router_exchanges_counts_and_matches_one_process(tmp_path):
    world = 2
    run_ranks(_two_level_worker, world, str(tmp_path), timeout=60)
    layer, (x_RTD, target_RTD, ids_RT, domains_RT) = _two_level_layer(), _two_level_data(world)
    for r in range(world):
        got, info = load_rank(tmp_path, "two_level", r)
        x_TD = x_RTD[r].clone().requires_grad_()
        out = layer(x_TD, token_ids=ids_RT[r], domain_ids=domains_RT[r])
        (out.hidden * target_RTD[r]).sum().backward()
        assert info["static"] is False
        assert_close(got["hidden"], out.hidden, rtol=1e-5, atol=1e-6)
        assert_close(got["x_grad"], x_TD.grad, rtol=1e-5, atol=1e-6)
    # Rank 1's tokens are all "low": every slot goes to rank 0 (uneven, as static splits cannot be).
    assert load_rank(tmp_path, "two_level", 1)[1]["send"] == [T * TWO_LEVEL["top_k"], 0]


# --- the drop-in MLP (moge.MoGEMLP) inside any model -------------------------------------------


def _mlp_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(MoGEMLP(MoGEConfig(**BASE)))  # the grouped router, with the balance bias


def _mlp_data(world: int):
    """[world, T, D] inputs and targets: each rank's tokens of the first step."""
    x, target, _ = make_data("grouped", world)
    return x[0].view(world, T, -1), target[0].view(world, T, -1)


def _mlp_worker(rank: int, world: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    try:
        mesh = connect(ParallelConfig(expert_parallel=world), BASE["num_groups"])
        model = parallelize(_mlp_model(), mesh)
        x_RTD, target_RTD = _mlp_data(world)
        x_TD = x_RTD[rank].clone().requires_grad_()
        y_TD = model(x_TD)
        ((y_TD * target_RTD[rank]).sum() + moge.aux_loss(model)).backward()
        grads = whole(model, mesh, {n: p.grad for n, p in model.named_parameters()})
        moge.end_step(model)
        tensors = {"hidden": y_TD, "x_grad": x_TD.grad, "bias": model[0].balance_bias_E}
        tensors.update({f"grad.{n}": g for n, g in grads.items()})
        _save(out_dir, f"mlp.rank{rank}", tensors, {"type": type(model[0]).__name__})
    finally:
        dist.destroy_process_group()


def test_the_drop_in_mlp_is_expert_parallel_and_matches_one_process(tmp_path):
    world = 2
    run_ranks(_mlp_worker, world, str(tmp_path), timeout=60)
    model, (x_RTD, target_RTD) = _mlp_model(), _mlp_data(world)
    xs_TD = [x_RTD[r].clone().requires_grad_() for r in range(world)]
    ys_TD = [model(x_TD) for x_TD in xs_TD]
    total = sum((y_TD * target_RTD[r]).sum() for r, y_TD in enumerate(ys_TD)) + moge.aux_loss(model)
    (total / world).backward()  # the mean of the ranks' losses
    ref_grads = {n: p.grad for n, p in model.named_parameters()}
    moge.end_step(model)  # the bias from every rank's load
    for r in range(world):
        got, info = load_rank(tmp_path, "mlp", r)
        assert info["type"] == "ExpertParallelMoGEMLP"
        assert_close(got["hidden"], ys_TD[r].detach())
        assert_close(got["x_grad"], world * xs_TD[r].grad)
        for n, g in ref_grads.items():
            assert_close(got[f"grad.{n}"], g, msg=lambda m: f"rank {r} {n}: {m}")
        assert torch.equal(got["bias"], model[0].balance_bias_E)


@contextlib.contextmanager
def fake_world(size: int):
    """This process as rank 0 of a fake process group of `size` ranks (nothing is sent)."""
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_a_moge_layer_subclass_without_a_parallel_version_is_refused():
    class Custom(MoGELayer):
        pass

    with fake_world(2):
        world = connect(ParallelConfig(expert_parallel=2), BASE["num_groups"])
        model = nn.Sequential(nn.Sequential(Custom(MoGEConfig(**BASE))))
        with pytest.raises(
            ValueError,
            match=r"^0\.0: parallelize has parallel versions of MoGELayer and MoGEMLP, not of their subclass Custom",
        ):
            parallelize(model, world)


@pytest.mark.parametrize("d_model, expert_hidden", [(15, 8), (16, 9)])
def test_a_dp_that_cannot_cut_the_experts_evenly_is_a_data_parallel_error(d_model, expert_hidden):
    # dp 2 x ep 2: FSDP2 cuts the experts' second axis (d_model, expert_hidden) over dp.
    with fake_world(4):
        world = connect(ParallelConfig(expert_parallel=2), BASE["num_groups"])
        cfg = MoGEConfig(**{**BASE, "d_model": d_model, "expert_hidden": expert_hidden})
        with torch.device("meta"):
            model = Holder(MoGELayer(cfg))
        with pytest.raises(
            ValueError,
            match=rf"^parallel\.data_parallel: dp=2 .*d_model={d_model}.*expert_hidden={expert_hidden}",
        ):
            parallelize(model, world)


def test_expert_parallel_experts_reset_parameters_without_arguments_as_fsdp_materialises():
    # FSDP's meta-device materialisation (and any module-by-module init loop) calls
    # reset_parameters() with no argument; the experts then draw N(0, init_std) and
    # N(0, down_std), as GroupedExperts, and re-create their placement tables.
    with fake_world(2):
        cfg = MoGEConfig(**{**BASE, "init_std": 0.5})
        experts = ExpertParallelExperts(cfg)
        assert experts.down_std == 0.5
        experts.down_std = 0.25
        tables = {n: b.clone() for n, b in experts.named_buffers()}
        for b in experts.buffers():
            b.fill_(7)
        torch.manual_seed(3)
        experts.reset_parameters()
        torch.manual_seed(3)
        want_gate_up = torch.empty_like(experts.w_gate_up_EDH).normal_(std=0.5)
        want_down = torch.empty_like(experts.w_down_EFD).normal_(std=0.25)
        assert_close(experts.w_gate_up_EDH.detach(), want_gate_up, rtol=0, atol=0)
        assert_close(experts.w_down_EFD.detach(), want_down, rtol=0, atol=0)
        for n, b in experts.named_buffers():
            assert torch.equal(b, tables[n]), n


# --- a module-by-module init loop on a parallelized meta build ------------------------------------

INIT_EPS = (2, 1)  # ExpertParallelMoGE; GlobalLoadMoGE (dp 2)


def build_init_model() -> MoGETransformer:
    torch.manual_seed(0)
    return MoGETransformer(ModelConfig(**INIT_MODEL), MoGEConfig(**INIT_MOE))


def _loop_init_scenario(out_dir: str, rank: int, ep: int, forward: bool) -> None:
    """The eagerly parallelized model and a meta build parallelized, to_empty'd and reset
    module by module. forward False: this rank's pieces and buffers of both. True: both
    models' logits once the loop-built one holds the eager one's weights (forward then
    reads its buffers, the placement tables above all)."""
    world = connect(ParallelConfig(expert_parallel=ep), INIT_MOE["num_groups"])
    eager = parallelize(build_init_model(), world)
    with torch.device("meta"):
        model = parallelize(build_init_model(), world)
    reset_module_by_module(model)
    pairs = (("eager", eager), ("loop", model))
    if not forward:
        out = {
            f"{tag}.{n}": local(t) for tag, m in pairs for n, t in [*m.named_parameters(), *m.named_buffers()]
        }
        _save(out_dir, f"ep{ep}.rank{rank}", out, {"buffers": [n for n, _ in model.named_buffers()]})
        return
    with torch.no_grad():
        for n, p in model.named_parameters():
            local(p).copy_(local(eager.get_parameter(n)))
    tokens, targets = model_batch(world.size)[:, rank]
    _save(out_dir, f"ep{ep}.rank{rank}", {f"{tag}.logits": m(tokens, targets).logits for tag, m in pairs}, {})


def _loop_init_worker(rank: int, world: int, out_dir: str, forward: bool) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    try:
        for ep in INIT_EPS:
            _loop_init_scenario(out_dir, rank, ep, forward)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def loop_init(tmp_path_factory):
    """loop_init(forward) -> the folder of that launch's results (each launched once; two
    launches, so that a forward that fails leaves the init checks to say what is wrong).

    Forked gloo ranks, not an in-process fake group: DTensor work under a fake group
    leaves state that later forked ranks inherit (a 2-rank checkpoint test then saw rank
    0's offsets for 1-D shards on both ranks)."""
    done: dict[bool, Path] = {}

    def get(forward: bool) -> Path:
        if forward not in done:
            done[forward] = tmp_path_factory.mktemp("loop_forward" if forward else "loop_init")
            run_ranks(_loop_init_worker, 2, str(done[forward]), forward, timeout=90)
        return done[forward]

    return get


@pytest.mark.parametrize("ep", INIT_EPS)
def test_a_module_by_module_reset_of_a_parallel_meta_build_gives_the_models_init(loop_init, ep):
    """Each rank's piece of every weight has the one-process model's std (the parallel
    layers, built from the MoE config, held its init_std 0.3 for the router, the experts and
    the shared experts), the constants and buffers those of the eagerly parallelized model."""
    full = build_init_model()
    for r in range(2):
        got, info = load_rank(loop_init(False), f"ep{ep}", r)
        for name, want in full.named_parameters():
            piece = got[f"loop.{name}"]
            if piece.numel() == 0:  # rank 1's part of shared_gate's one row
                continue
            if torch.all(want == want.reshape(-1)[0]):  # the constants: biases, norms, expert scales
                assert_close(piece, got[f"eager.{name}"], rtol=0, atol=0, msg=name)
                continue
            # Two sample stds, each within std / sqrt(2 N): 4 of their combined spread at most.
            tol = 4 / piece.numel() ** 0.5
            ratio = piece.std().item() / want.std().item()
            assert abs(ratio - 1) < tol, (r, name, ratio)
        tables = {f"blocks.1.ffn.experts.{t}" for t in ("placement_WJ", "owner_E", "local_E")}
        assert tables <= set(info["buffers"]) if ep > 1 else not tables & set(info["buffers"])
        for name in info["buffers"]:  # the RoPE tables, load counts, balance bias, placement
            assert_close(got[f"loop.{name}"], got[f"eager.{name}"], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("ep", INIT_EPS)
def test_a_module_by_module_reset_of_a_parallel_meta_build_runs_as_the_eager_one(loop_init, ep):
    for r in range(2):
        got, _ = load_rank(loop_init(True), f"ep{ep}", r)
        assert_close(got["loop.logits"], got["eager.logits"], rtol=0, atol=0)
