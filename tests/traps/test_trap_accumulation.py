"""Trap: a batch split into micro-batches (or ranks) changes the balance statistics.

The counts behind the aux-loss-free bias and the global-batch loss must not depend on
how a batch arrives: 1 x 16 tokens, 4 x 4 micro-batches, or 2 ranks x 2 micro-batches
whose counts are all-reduced (MoGELayer.step_load, all-reduced by moge.distributed.expert_parallel.GlobalLoadMoGE).
The aux loss averaged over ranks is the one-call loss: not multiplied by the world size
(a transformers bug).
"""

import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from moge import MoGEConfig, MoGELayer
from moge.balance import balance_loss_from_counts, load_balancing_loss
from moge.distributed.expert_parallel import GlobalLoadMoGE

BASE = dict(d_model=16, num_experts=8, num_groups=4, top_k=4, expert_hidden=12)


def make(cls=MoGELayer, **kw):
    torch.manual_seed(0)
    return cls(MoGEConfig(**{**BASE, **kw}))


def tokens16():
    return torch.randn(16, 16, generator=torch.Generator().manual_seed(7))


def one_call_counts(x):
    layer = make().eval()
    out = layer(x)
    return out.scores, torch.bincount(out.expert_ids.flatten(), minlength=8)


@pytest.mark.parametrize("router", ["grouped", "global"])
@pytest.mark.parametrize("aux_loss_type", ["batch", "global_batch"])
def test_bias_and_counts_do_not_depend_on_micro_batching(router, aux_loss_type):
    x = tokens16()
    whole = make(router=router, aux_loss_type=aux_loss_type, bias_update_rate=0.05)
    split = make(router=router, aux_loss_type=aux_loss_type, bias_update_rate=0.05)
    whole(x)
    for part in x.chunk(4):
        split(part)
    assert_close(split.load_accum_E, whole.load_accum_E, rtol=0, atol=0)
    whole.end_step()
    split.end_step()
    assert whole.balance_bias_E.abs().sum() > 0
    assert_close(split.balance_bias_E, whole.balance_bias_E, rtol=0, atol=0)


def test_global_batch_loss_reaches_the_one_call_counts():
    """Micro-batch i weighs its scores with the step's counts so far; the last one with
    the whole batch's, so its loss is f(16 tokens) . p(its own tokens)."""
    x = tokens16()
    scores16, counts16 = one_call_counts(x)
    layer = make(aux_loss_type="global_batch")
    outs = [layer(part) for part in x.chunk(4)]
    last = outs[-1]
    f_E = counts16.float() * 8 / (4 * 16)  # Eq. 8's f over the 16 tokens, written out
    assert_close(last.lb_loss, (f_E * last.scores.mean(0)).sum(), rtol=1e-6, atol=0)
    # Pooling every micro-batch's p with those counts is the one-call loss exactly.
    pooled = torch.stack([balance_loss_from_counts(o.scores, counts16, 16, 4) for o in outs]).mean()
    assert_close(pooled, load_balancing_loss(scores16, torch.cat([o.expert_ids for o in outs]), 8))
    assert_close(pooled, make(aux_loss_type="global_batch")(x).lb_loss, rtol=1e-6, atol=0)
    # The first micro-batch saw only its own 4 tokens: the causal limit of accumulation.
    assert_close(outs[0].lb_loss, load_balancing_loss(outs[0].scores, outs[0].expert_ids, 8))


class TwoRanks(MoGELayer):
    """A rank whose step_load adds the other rank's load: an all-reduce written out."""

    other_loads: list

    def step_load(self, load_E):
        return load_E + self.other_loads.pop(0)


def test_two_ranks_of_two_micro_batches_equal_one_call():
    x = tokens16()
    scores16, counts16 = one_call_counts(x)
    rank_x = [x[:8], x[8:]]  # rank r holds 8 tokens, as 2 micro-batches of 4
    probe = make().eval()
    loads = [[probe(m).load for m in xr.chunk(2)] for xr in rank_x]
    ranks = [make(TwoRanks, aux_loss_type="global_batch", bias_update_rate=0.05) for _ in range(2)]
    for r, layer in enumerate(ranks):
        layer.other_loads = list(loads[1 - r])
    last = {}
    for m in range(2):  # micro-batch m on both ranks, as lockstep data parallelism runs it
        for r, layer in enumerate(ranks):
            last[r] = layer(rank_x[r].chunk(2)[m])
    whole = make(aux_loss_type="global_batch", bias_update_rate=0.05)
    one = whole(x)
    for layer in ranks:
        assert_close(layer.load_accum_E, counts16, rtol=0, atol=0)
    # Each rank's last micro-batch uses the whole batch's counts; averaged over ranks (what
    # the data-parallel gradient mean sees) that is f(16 tokens) . mean_r p_r: no factor of the world size.
    f_E = counts16.float() * 8 / (4 * 16)
    p_ranks = torch.stack([last[r].scores.mean(0) for r in range(2)]).mean(0)
    assert_close((last[0].lb_loss + last[1].lb_loss) / 2, (f_E * p_ranks).sum(), rtol=1e-6, atol=0)
    whole.end_step()
    for layer in ranks:
        layer.end_step()
        assert_close(layer.balance_bias_E, whole.balance_bias_E, rtol=0, atol=0)
    assert_close(one.load, counts16, rtol=0, atol=0)


def _rank(rank, world, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    try:
        # The data-parallel layer of moge.distributed: step_load all-reduces the counts.
        layer = make(GlobalLoadMoGE, aux_loss_type="global_batch", bias_update_rate=0.05)
        mine = tokens16()[rank * 8 : (rank + 1) * 8]
        for part in mine.chunk(2):  # 2 micro-batches of 4 tokens
            out = layer(part)
            (out.aux_loss / 2).backward()
        grad = layer.router.weight.grad.clone()
        dist.all_reduce(grad)
        grad /= world  # what data parallelism (DDP, FSDP2) does: the mean of the ranks' gradients
        counts = layer.load_accum_E.clone()
        layer.end_step()
        save_file(
            {"counts": counts, "bias": layer.balance_bias_E, "grad": grad, "last": out.lb_loss.detach()},
            f"{out_dir}/rank{rank}.safetensors",
        )
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process(tmp_path):
    procs = tmp.start_processes(_rank, args=(2, str(tmp_path)), nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + 120
    while not procs.join(timeout=1):
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.kill()
            pytest.fail("2 ranks did not finish in 120 s (a collective hung?)")
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    # One process: micro-batch m holds both ranks' micro-batch m (8 tokens), same counts.
    x = tokens16()
    one = make(aux_loss_type="global_batch", bias_update_rate=0.05)
    for m in range(2):
        out = one(torch.cat([x[r * 8 : (r + 1) * 8].chunk(2)[m] for r in range(2)]))
        (out.aux_loss / 2).backward()
    counts = one.load_accum_E.clone()
    one.end_step()
    for got in ranks:
        assert_close(got["counts"], counts, rtol=0, atol=0)
        assert_close(got["bias"], one.balance_bias_E, rtol=0, atol=0)
        # The mean of the ranks' gradients is the one process's: the aux loss carries
        # no factor of the world size.
        assert_close(got["grad"], one.router.weight.grad, rtol=1e-5, atol=1e-9)
    assert_close((ranks[0]["last"] + ranks[1]["last"]) / 2, out.lb_loss.detach(), rtol=1e-6, atol=0)
