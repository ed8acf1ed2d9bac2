"""Trap: a batch split into micro-batches (or ranks) changes the balance loss or statistics.

The global-batch balance loss (Eq. 8 with f from the whole global batch's selection)
must have the same value and gradients whether a batch of 16 sequences arrives as one
call, as 4 micro-batches of 4, or as 2 ranks x 2 micro-batches of 4, and carry no factor
of the world size or of grad_accum (a transformers bug). A micro-batch's forward cannot
know the later micro-batches' counts, so `moge.counting_pass` counts the step first
(one forward, no grad) and every micro-batch then weighs its scores with the whole
step's f. The counts and the aux-loss-free bias never depended on the split. The
per-call losses (batch, released) are by definition the micro-batch's; the sequence
loss averages sequences, so whole sequences per micro-batch give the one-call value.
"""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from ranks import run_ranks
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

import moge
from moge import MoGEConfig, MoGELayer
from moge.balance import load_balancing_loss, released_balance_loss
from moge.distributed.expert_parallel import ExpertParallelMoGE, GlobalLoadMoGE
from moge.model import MoGETransformer
from moge.model.config import ModelConfig
from moge.training import train
from moge.training.checkpoint import read_tensors
from moge.training.config import config_from_dict

BASE = dict(
    d_model=16, num_experts=8, num_groups=4, top_k=4, expert_hidden=12, num_shared_experts=1,
    learned_expert_scale=True, aux_loss_coef=1.0, z_loss_coef=0.1, bias_update_rate=0.05,
)  # fmt: skip
B, L, D = 16, 3, 16  # sequences, tokens per sequence, d_model
GRADS = ("router.weight", "expert_scale_E", "experts.w_gate_up_EDH", "experts.w_down_EFD",
         "shared.w_gate_up.weight", "shared.w_down.weight")  # fmt: skip


def make(cls=MoGELayer, **kw):
    torch.manual_seed(0)
    return cls(MoGEConfig(**{**BASE, **kw}))


def batch16():
    """16 sequences x_BLD, a fixed target and right padding (mask_BL) of 1..3 real tokens."""
    gen = torch.Generator().manual_seed(7)
    x_BLD = torch.randn(B, L, D, generator=gen)
    target_BLD = torch.randn(B, L, D, generator=gen)
    lengths_B = torch.randint(1, L + 1, (B,), generator=gen)
    return x_BLD, target_BLD, torch.arange(L)[None, :] < lengths_B[:, None]


def task_loss(out, target, mask, world):
    """This rank's share (times the world: ranks are averaged) of a linear loss on the
    real tokens' outputs, summed over the whole batch; micro-batches add up to it."""
    keep = torch.ones(target.shape[:-1], dtype=torch.bool) if mask is None else mask
    return (out.hidden * target)[keep].sum() * world / (B * L * D)


def run_step(layer, parts, counting=True, world=1):
    """One optimizer step over `parts` [(x, target, mask)]: an optional counting pass, then
    per part task + aux_loss / len(parts), backward. -> mean lb/aux loss, grads, counts; end_step."""
    if counting:
        with moge.counting_pass(layer):
            for x, _, mask in parts:
                layer(x, mask=mask)
    lb, aux = [], []
    for x, target, mask in parts:
        out = layer(x, mask=mask)
        (task_loss(out, target, mask, world) + out.aux_loss / len(parts)).backward()
        lb.append(out.lb_loss.detach())
        aux.append(out.aux_loss.detach())
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    counts = layer.load_accum_E.clone()
    layer.end_step()
    return torch.stack(lb).mean(), torch.stack(aux).mean(), grads, counts


def close(got, want, rtol=1e-5, msg="", scale=1e-6):
    """assert_close with atol far below the scale of `want` (scale times its largest entry)."""
    want = want.detach()
    assert_close(got, want, rtol=rtol, atol=scale * float(want.abs().max()), msg=msg)


def splits(masked):
    x, target, mask = batch16()
    mask = mask if masked else None

    def part(sl):
        return x[sl], target[sl], None if mask is None else mask[sl]

    return {
        "1x16": [part(slice(0, 16))],
        "4x4": [part(slice(i, i + 4)) for i in range(0, 16, 4)],
        "16x1": [part(slice(i, i + 1)) for i in range(16)],
    }


@pytest.mark.parametrize("router", ["grouped", "global"])
@pytest.mark.parametrize("masked", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("split", ["4x4", "16x1"])
def test_global_batch_loss_and_gradients_equal_one_call(router, masked, split):
    """4 x 4 (or 16 x 1) micro-batches after a counting pass give the one call's loss value,
    gradients, counts and bias, also with padding that leaves micro-batches of unequal
    real tokens (each call's share is weighed by its tokens, not averaged). The z-loss is a
    mean over each call's tokens, so it joins in only where the calls are of equal size."""
    parts = splits(masked)
    kw = dict(router=router, aux_loss_type="global_batch", z_loss_coef=0.0 if masked else 0.1)
    one = run_step(make(**kw), parts["1x16"], counting=False)
    layer = make(**kw)
    lb, aux, grads, counts = run_step(layer, parts[split])
    close(lb, one[0], rtol=1e-6, msg="lb_loss")
    close(aux, one[1], rtol=1e-6, msg="aux_loss")
    assert set(grads) == set(GRADS)
    for name in GRADS:
        close(grads[name], one[2][name], msg=name)
    assert_close(counts, one[3], rtol=0, atol=0)
    bias = make(**kw)
    run_step(bias, parts["1x16"], counting=False)
    assert layer.balance_bias_E.abs().sum() > 0
    assert_close(layer.balance_bias_E, bias.balance_bias_E, rtol=0, atol=0)


def test_without_a_counting_pass_each_micro_batch_sees_the_counts_so_far():
    """The causal fallback: micro-batch i weighs its scores with the counts of micro-batches
    1..i, so the step's loss is not the one call's (the reason for counting_pass)."""
    parts = splits(False)
    one = run_step(make(aux_loss_type="global_batch"), parts["1x16"], counting=False)
    layer = make(aux_loss_type="global_batch")
    outs, seen_E = [], torch.zeros(8, dtype=torch.int64)
    for x, _, _ in parts["4x4"]:
        out = layer(x)
        seen_E += out.load
        tokens = int(seen_E.sum()) // 4
        f_E = seen_E.float() * 8 / (4 * tokens)  # Eq. 8's f over the micro-batches so far
        assert_close(out.lb_loss, (f_E * out.scores.mean(0)).sum(), rtol=1e-6, atol=0)
        outs.append(out)
    # The first micro-batch saw only its own tokens; the step's mean is off the one call's.
    assert_close(outs[0].lb_loss, load_balancing_loss(outs[0].scores, outs[0].expert_ids, 8))
    assert abs(float(torch.stack([o.lb_loss.detach() for o in outs]).mean() - one[0])) > 1e-4


def test_batch_loss_is_each_micro_batch_s_own():
    """aux_loss_type batch: Eq. 8 over each micro-batch's tokens (f and p its own); the
    step's loss is their mean, not the one call's; a counting pass changes nothing."""
    parts = splits(False)["4x4"]
    per_part = []
    for x, _, _ in parts:
        out = make(aux_loss_type="batch").eval()(x)
        per_part.append(load_balancing_loss(out.scores, out.expert_ids, 8))
    for counting in (False, True):
        lb, _, grads, _ = run_step(make(aux_loss_type="batch"), parts, counting=counting)
        close(lb, torch.stack(per_part).mean(), rtol=1e-6)
    plain = run_step(make(aux_loss_type="batch"), parts, counting=False)
    for name in GRADS:
        close(grads[name], plain[2][name], msg=name)
    one = run_step(make(aux_loss_type="batch"), splits(False)["1x16"], counting=False)
    assert abs(float(lb - one[0])) > 1e-4


def test_sequence_loss_of_whole_sequences_equals_one_call():
    """aux_loss_type sequence: the mean over sequences of their own Eq. 8; micro-batches of
    whole sequences, 4 each, average to the one call's value and gradients."""
    parts = splits(False)
    one = run_step(make(aux_loss_type="sequence"), parts["1x16"], counting=False)
    lb, aux, grads, _ = run_step(make(aux_loss_type="sequence"), parts["4x4"], counting=False)
    close(lb, one[0], rtol=1e-6)
    close(aux, one[1], rtol=1e-6)
    for name in GRADS:
        close(grads[name], one[2][name], msg=name)


def test_released_loss_is_each_micro_batch_s_own():
    """aux_loss_type released: the released objective over each call's rows (one layer
    here; a model pools its layers' rows of the same call)."""
    parts = splits(False)["4x4"]
    per_part = [released_balance_loss([make().eval()(x).scores], 4) for x, _, _ in parts]
    lb, _, _, _ = run_step(make(aux_loss_type="released"), parts, counting=False)
    close(lb, torch.stack(per_part).mean(), rtol=1e-6)


def test_counting_pass_guards():
    parts = splits(False)["4x4"]
    layer = make(aux_loss_type="global_batch")
    layer(parts[0][0])
    with pytest.raises(ValueError, match="already counted 1 calls"), moge.counting_pass(layer):
        pass
    layer.end_step()
    with moge.counting_pass(layer):
        for x, _, _ in parts[:2]:
            out = layer(x)
    assert not out.lb_loss.requires_grad  # the counting pass runs under no_grad
    for x, _, _ in parts[:2]:
        layer(x)
    with pytest.raises(RuntimeError, match="counting pass of this step ran 2 training calls"):
        layer(parts[2][0])
    layer.end_step()  # the 2 calls of the training pass routed what was counted: no warning
    with moge.counting_pass(layer):
        layer(parts[0][0])
    layer(parts[1][0])  # other tokens than counted
    with pytest.warns(moge.CountingPassWarning, match="the counting pass routed 1 calls"):
        layer.end_step()
    with pytest.raises(ValueError, match="eval mode"), moge.counting_pass(layer.eval()):
        pass


# --- 2 ranks x 2 micro-batches on gloo ---------------------------------------------------

SCENARIOS = {  # name -> (layer class, MoGEConfig overrides)
    "data_parallel": (GlobalLoadMoGE, dict(router="global")),
    "expert_parallel": (ExpertParallelMoGE, dict(router="grouped")),  # static splits
    "expert_parallel_counted": (ExpertParallelMoGE, dict(router="global")),  # counted splits
}


def _rank(rank, world, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    try:
        x, target, _ = batch16()
        mine = slice(rank * 8, (rank + 1) * 8)  # rank r: 8 sequences, as 2 micro-batches of 4
        parts = [(x[mine][i : i + 4], target[mine][i : i + 4], None) for i in (0, 4)]
        info = {}
        for name, (cls, kw) in SCENARIOS.items():
            layer = cls.from_layer(make(aux_loss_type="global_batch", **kw))
            if cls is ExpertParallelMoGE:
                layer.experts.grad_scale = 1.0 / world  # as parallelize sets it
            lb, aux, grads, counts = run_step(layer, parts, world=world)
            for n, g in grads.items():
                if not n.startswith("experts.") or cls is GlobalLoadMoGE:  # replicated: the rank mean
                    dist.all_reduce(g)
                    g /= world
            save_file(
                {
                    **{f"grad.{n}": g for n, g in grads.items()},
                    "counts": counts,
                    "bias": layer.balance_bias_E,
                },
                f"{out_dir}/{name}.rank{rank}.safetensors",
            )
            info[name] = {"lb": float(lb), "aux": float(aux)}
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(info, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("accum2")
    run_ranks(_rank, 2, str(out))
    return out


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_gloo_ranks_of_two_micro_batches_equal_one_call(two_ranks, name):
    """GlobalLoadMoGE and ExpertParallelMoGE (static and counted splits), 2 ranks x 2
    micro-batches: the loss averaged over ranks and micro-batches (what the data-parallel
    mean and loss / grad_accum give), every gradient, the counts and the bias equal one
    process's single call on the 16 sequences: no factor of the world size."""
    _, kw = SCENARIOS[name]
    lb1, aux1, grads1, counts1 = run_step(make(aux_loss_type="global_batch", **kw), splits(False)["1x16"])
    ref = make(aux_loss_type="global_batch", **kw)
    run_step(ref, splits(False)["1x16"], counting=False)
    infos = [json.loads((two_ranks / f"rank{r}.json").read_text())[name] for r in range(2)]
    close(torch.tensor(sum(i["lb"] for i in infos) / 2), lb1, rtol=1e-6, msg="lb_loss")
    close(torch.tensor(sum(i["aux"] for i in infos) / 2), aux1, rtol=1e-6, msg="aux_loss")
    for r in range(2):
        got = load_file(two_ranks / f"{name}.rank{r}.safetensors")
        assert_close(got["counts"], counts1, rtol=0, atol=0)
        assert_close(got["bias"], ref.balance_bias_E, rtol=0, atol=0)
        for n in GRADS:
            want = grads1[n]
            if n.startswith("experts.") and name.startswith("expert_parallel"):
                want = want[r * 4 : (r + 1) * 4]  # rank r holds experts 4r .. 4r + 3
            close(got[f"grad.{n}"], want, msg=f"rank {r} {n}")


# --- the training loop logs the global loss ---------------------------------------------


def _train_cfg(out_dir, batch_size, grad_accum, expert_parallel=1):
    return config_from_dict(
        {
            "name": "accum-trap",
            "model": {"d_model": 16, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 8},
            "moe": {"num_experts": 8, "num_groups": 4, "top_k": 4, "expert_hidden": 8, "router": "global",
                    "aux_loss_type": "global_batch", "aux_loss_coef": 0.5, "bias_update_rate": 0.01},
            "data": {"seq_len": 8},
            "train": {"steps": 2, "batch_size": batch_size, "grad_accum": grad_accum, "warmup_steps": 1,
                      "log_every": 1, "eval_every": 0, "eval_batches": 1, "save_every": 0, "threads": 1,
                      "out_dir": str(out_dir)},
            "parallel": {"expert_parallel": expert_parallel},
        }
    )  # fmt: skip


def _train_run(out_dir, batch_size, grad_accum):
    n = torch.get_num_threads()
    try:
        train(_train_cfg(out_dir, batch_size, grad_accum), progress=False)
    finally:
        torch.set_num_threads(n)
    return _train_records(out_dir)


def _train_records(out_dir):
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["type"] == "train"], read_tensors(out_dir)


def _same_runs(split, split_w, whole, whole_w):
    assert len(split) == len(whole) == 2
    for a, b in zip(split, whole, strict=True):
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), key
        for ra, rb in zip(a["routing"], b["routing"], strict=True):
            assert ra["lb_loss"] == pytest.approx(rb["lb_loss"], rel=1e-5)
            assert ra["load_entropy"] == rb["load_entropy"]
    weights = [k for k in whole_w if k.startswith("model.")]
    assert any("balance_bias_E" in k for k in weights)
    for key in weights:  # AdamW magnifies rounding of near-zero gradients: 1e-5 of the scale
        close(split_w[key], whole_w[key], msg=key, scale=1e-5)


def test_the_training_loop_logs_and_trains_the_one_call_loss(tmp_path):
    """train.grad_accum 4 x batch_size 1 draws the same sequences as 1 x 4: the logged
    losses (aux_loss, lb_loss per layer), gradient norms and the weights after 2 steps
    are the same."""
    split, split_w = _train_run(tmp_path / "split", 1, 4)
    whole, whole_w = _train_run(tmp_path / "whole", 4, 1)
    _same_runs(split, split_w, whole, whole_w)


def _train_rank(rank, world, out_dir):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    try:
        train(_train_cfg(Path(out_dir) / "ep2", 1, 2, expert_parallel=2), progress=False)
    finally:
        dist.destroy_process_group()


def test_the_training_loop_on_two_expert_parallel_ranks_trains_the_one_call_loss(tmp_path):
    """moge train on 2 gloo ranks (expert parallel, FSDP2) x grad_accum 2 x batch_size 1
    logs and trains what one process does with one micro-batch of 4 sequences."""
    threads = torch.get_num_threads()
    try:
        run_ranks(_train_rank, 2, str(tmp_path), timeout=180)
    finally:
        torch.set_num_threads(threads)
    whole, whole_w = _train_run(tmp_path / "whole", 4, 1)
    _same_runs(*_train_records(tmp_path / "ep2"), whole, whole_w)


# --- a model, with and without activation checkpointing -----------------------------------


@pytest.mark.parametrize("checkpointing", [False, True])
def test_model_micro_batches_after_a_counting_pass_equal_one_call(checkpointing):
    """A 2-MoE-layer decoder, 3 micro-batches of 2 sequences after moge.counting_pass:
    every parameter's gradient (the aux loss also reaches the layers below a router), the
    losses, counts and bias equal one call on the 6 sequences; under activation
    checkpointing the recompute neither counts nor changes the counts a call used."""
    moe = MoGEConfig(**{**BASE, "aux_loss_type": "global_batch", "router": "global"})
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=8,
                      activation_checkpointing=checkpointing)  # fmt: skip
    tokens = torch.randint(0, 64, (6, 8), generator=torch.Generator().manual_seed(3))

    def step(parts):
        torch.manual_seed(0)
        model = MoGETransformer(cfg, moe).train()
        if len(parts) > 1:
            with moge.counting_pass(model):
                for t in parts:
                    model(t)
        aux = []
        for t in parts:
            out = model(t, t.roll(-1, 1))
            (out.loss / len(parts)).backward()
            aux.append(out.aux_loss.detach())
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        counts = [layer.load_accum_E.clone() for layer in model.moe_layers()]
        moge.end_step(model)
        return torch.stack(aux).mean(), grads, counts, [layer.balance_bias_E for layer in model.moe_layers()]

    one, split = step([tokens]), step(list(tokens.split(2)))
    close(split[0], one[0], rtol=1e-6, msg="aux_loss")
    for name, grad in one[1].items():
        close(split[1][name], grad, msg=name)
    for a, b in zip(split[2] + split[3], one[2] + one[3], strict=True):
        assert_close(a, b, rtol=0, atol=0)
