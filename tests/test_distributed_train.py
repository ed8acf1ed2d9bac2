"""Tests of moge/distributed_train.py: `train` on 2 gloo ranks against one process.

A run on P processes draws the same micro-batches as one process with P times the
grad_accum, so the single-process run with grad_accum=2 is the reference for 2 ranks
with grad_accum=1. Workers are forked (as in tests/test_parallel.py) and run every
scenario in one launch; the parent trains the references and compares.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp
from safetensors.torch import load_file
from torch.testing import assert_close

import moge.distributed_train as dt
from moge.checkpoint import find_checkpoint, load_run
from moge.cli import _should_print
from moge.config import config_from_dict
from moge.data import load_dataset
from moge.distributed_train import PeerError, agree, rank_batches
from moge.parallel import destroy, init_distributed
from moge.train import NonFiniteLossError, train

STEPS, STOP = 6, 3
LOSS_KEYS = ("loss", "lm_loss", "aux_loss", "grad_norm")


def make_cfg(out_dir, expert_parallel: int = 1, moe: dict | None = None, **train_kw):
    raw = {
        "name": "tiny-dist",
        "model": {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 32},
        "moe": {"num_experts": 8, "num_groups": 4, "top_k": 4, "expert_hidden": 16, "num_shared_experts": 1,
                "learned_expert_scale": True, "aux_loss_coef": 0.01, "bias_update_rate": 0.01, **(moe or {})},
        "data": {"seq_len": 32},
        "train": {"steps": STEPS, "batch_size": 4, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "log_every": 3,
                  "eval_every": 0, "eval_batches": 2, "save_every": 0, "keep_last": 2, "threads": 1,
                  "out_dir": str(out_dir), **train_kw},
        "parallel": {"expert_parallel": expert_parallel},
    }  # fmt: skip
    return config_from_dict(raw)


def records(run_dir: Path, kind: str = "train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def final_tensors(run_dir: Path) -> dict:
    folder = find_checkpoint(run_dir)
    return {
        **load_file(str(folder / "model.safetensors")),
        **{f"opt.{k}": v for k, v in load_file(str(folder / "optimizer.safetensors")).items()},
        **{f"rng.{k}": v for k, v in load_file(str(folder / "rng.safetensors")).items()},
    }


# --- workers ------------------------------------------------------------------------------


def _agree_scenario(ctx, root: Path) -> None:
    """Rank 1 alone fails: it reports its own error, rank 0 a quiet PeerError."""

    def fail_on_rank_1():
        if ctx.rank == 1:
            raise ValueError("train.out_dir: only rank 1 sees this")
        return "fine"

    try:
        agree(ctx, "testing", fail_on_rank_1)
        got = {"type": "none"}
    except (ValueError, PeerError) as err:
        got = {"type": type(err).__name__, "report": err.moge_report, "message": str(err),
               "usage": getattr(err, "usage", None)}  # fmt: skip
    got["ok"] = agree(ctx, "testing", lambda: "fine")
    (root / f"agree.rank{ctx.rank}.json").write_text(json.dumps(got))


def _poison_router(model, ctx, calls):
    def hook(layer, args):
        calls["n"] += 1
        if calls["n"] == 2 and ctx.rank == 1:
            with torch.no_grad():
                layer.router.weight[0, 0] = float("nan")

    model.blocks[1].ffn.register_forward_pre_hook(hook)


def _poison_expert_grad(model, ctx, calls):
    def hook(grad):
        calls["n"] += 1
        return torch.full_like(grad, float("nan")) if calls["n"] == 2 and ctx.rank == 1 else grad

    model.blocks[0].ffn.experts.w_down_EFD.register_hook(hook)  # rank 1's own experts


def _nan_scenario(ctx, root: Path, name: str, poison) -> None:
    """Rank 1 goes NaN in step 2: both ranks stop, only rank 1 reports."""
    real_build = dt.build_optimizer
    calls = {"n": 0}

    def build_and_hook(model, tc):
        poison(model, ctx, calls)
        return real_build(model, tc)

    dt.build_optimizer = build_and_hook  # a forked worker: the parent's module is untouched
    try:
        train(make_cfg(root / name, 2, steps=4), progress=False)
        got = {"type": "none"}
    except NonFiniteLossError as err:
        got = {"type": type(err).__name__, "report": err.moge_report, "message": str(err)}
    finally:
        dt.build_optimizer = real_build
    (root / f"{name}.rank{ctx.rank}.json").write_text(json.dumps(got))


def _worker(rank: int, world: int, root: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    root = Path(root)
    ctx = init_distributed("gloo", init_method=f"file://{root}/rendezvous", timeout_s=60)
    try:
        train(make_cfg(root / "ep2", 2, eval_every=3), progress=False)
        train(make_cfg(root / "split", 2, eval_every=3), progress=False, stop_at=STOP)
        if rank == 0:
            shutil.copytree(root / "split", root / "split_at3")  # for one process to resume
        dist.barrier()
        train(make_cfg(root / "split", 2, eval_every=3, resume=True), progress=False)
        train(make_cfg(root / "from1", 2, resume=True), progress=False)  # the parent's 1-process run
        train(make_cfg(root / "dp", 1), progress=False, stop_at=STOP)  # 2 replicas, no sharding
        _agree_scenario(ctx, root)
        _nan_scenario(ctx, root, "nan_loss", _poison_router)
        _nan_scenario(ctx, root, "nan_grad", _poison_expert_grad)
    finally:
        destroy()


def _launch(world: int, root: Path, timeout: float = 120.0) -> None:
    procs = tmp.start_processes(
        _worker, args=(world, str(root)), nprocs=world, join=False, start_method="fork"
    )
    deadline = time.monotonic() + timeout
    while not procs.join(timeout=1):
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.kill()
            pytest.fail(f"{world} workers did not finish in {timeout} s (a collective hung?)")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The folder of every run: references in this process, the rest on 2 ranks."""
    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("dist")
    try:
        train(make_cfg(root / "single", grad_accum=2, eval_every=3), progress=False)
        train(make_cfg(root / "from1", grad_accum=2), progress=False, stop_at=STOP)
        _launch(2, root)
        # One process picks up the 2-rank checkpoint of step 3.
        train(make_cfg(root / "split_at3", grad_accum=2, eval_every=3, resume=True), progress=False)
    finally:
        torch.set_num_threads(threads)
    return root


# --- tests: no processes ------------------------------------------------------------------


def test_rank_batches_split_the_draws_of_one_process():
    dataset = load_dataset(make_cfg("unused").data)
    seq = torch.Generator().manual_seed(3)
    single = [dataset.get_batch("train", 2, seq) for _ in range(4)]  # grad_accum 4 in one process
    got = []
    for rank in range(2):
        gen = torch.Generator().manual_seed(3)
        for _ in range(2):  # two steps: the generator moves past the other rank's draws
            batches = rank_batches(dataset, gen, 2, 1, rank, 2)
            assert len(batches) == 1
            got.append(batches[0])
    for (x, y), (x_ref, y_ref) in zip(got, [single[0], single[2], single[1], single[3]]):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    gen = torch.Generator().manual_seed(3)
    accum = rank_batches(dataset, gen, 2, 2, 1, 2)  # rank 1 of 2 with grad_accum 2: draws 2 and 3
    assert all(torch.equal(a[0], b[0]) for a, b in zip(accum, single[2:]))


def test_expert_parallel_without_torchrun_says_how_to_launch(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match=r"^parallel\.expert_parallel: 2 needs .*torchrun --standalone"):
        train(make_cfg(tmp_path / "run", 2), progress=False)
    assert not (tmp_path / "run").exists()


def test_errors_print_once(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert _should_print(ValueError("x"))
    monkeypatch.setenv("RANK", "1")
    assert not _should_print(ValueError("every rank hits this one; rank 0 prints it"))
    mine = ValueError("only rank 1 hit this")
    mine.moge_report = True
    assert _should_print(mine) and not _should_print(None)
    monkeypatch.setenv("RANK", "0")
    peer = PeerError("rank 1 failed", usage=True)
    peer.moge_report = False
    assert not _should_print(peer) and _should_print(None)


# --- tests: 2 ranks against one process -----------------------------------------------------


def test_two_ranks_follow_the_single_process_loss_curve(runs):
    ep2, single = records(runs / "ep2"), records(runs / "single")
    assert [r["step"] for r in ep2] == list(range(1, STEPS + 1))
    for key in LOSS_KEYS:
        assert_close([r[key] for r in ep2], [r[key] for r in single], rtol=2e-5, atol=1e-6, msg=key)
    assert max(r["grad_norm"] for r in single) > 1.0, "some step is clipped, by the global norm"
    assert [r["lr"] for r in ep2] == [r["lr"] for r in single]
    assert_close([r["val_loss"] for r in records(runs / "ep2", "eval")],
                 [r["val_loss"] for r in records(runs / "single", "eval")], rtol=2e-5, atol=1e-6)  # fmt: skip
    assert ep2[-1]["tokens_per_s"] > 0 and len(ep2[-1]["routing"]) == 2


def test_data_parallel_replicas_follow_it_too(runs):
    dp, single = records(runs / "dp"), records(runs / "single")[:STOP]
    for key in LOSS_KEYS:
        assert_close([r[key] for r in dp], [r[key] for r in single], rtol=2e-5, atol=1e-6, msg=key)


def test_checkpoint_of_two_ranks_loads_in_one_process(runs):
    got, ref = final_tensors(runs / "ep2"), final_tensors(runs / "single")
    assert got.keys() == ref.keys() | {"rng.torch_cpu_rank0", "rng.torch_cpu_rank1"}
    for key, value in ref.items():
        assert got[key].shape == value.shape, key
        if not key.startswith("rng."):  # weights and moments, experts gathered in order
            assert_close(got[key], value, rtol=1e-4, atol=1e-6, msg=key)
    assert got["blocks.0.ffn.balance_bias_E"].abs().sum() > 0, "the bias moved, by the global load"
    assert torch.equal(got["rng.data_gen"], ref["rng.data_gen"])
    model, cfg, step = load_run(runs / "ep2")
    assert step == STEPS and cfg.parallel.expert_parallel == 2
    assert torch.equal(model.blocks[0].ffn.experts.w_gate_up_EDH, got["blocks.0.ffn.experts.w_gate_up_EDH"])
    assert (runs / "ep2" / "config.yaml").exists()


def test_resume_on_two_ranks_is_exact(runs):
    assert_close(final_tensors(runs / "split"), final_tensors(runs / "ep2"), rtol=0, atol=0)
    assert records(runs / "split") == [{**r, "tokens_per_s": s["tokens_per_s"], "elapsed_s": s["elapsed_s"]}
                                       for r, s in zip(records(runs / "ep2"), records(runs / "split"))]  # fmt: skip


@pytest.mark.parametrize("run", ["from1", "split_at3"])
def test_checkpoints_move_between_one_process_and_two_ranks(runs, run):
    # from1: a 1-process checkpoint resumed on 2 ranks; split_at3: the other way round.
    got, single = records(runs / run), records(runs / "single")
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    for key in LOSS_KEYS:
        assert_close([r[key] for r in got], [r[key] for r in single], rtol=2e-5, atol=1e-6, msg=key)
    ref = final_tensors(runs / "single")
    for key, value in final_tensors(runs / run).items():
        if not key.startswith("rng."):
            assert_close(value, ref[key], rtol=1e-4, atol=1e-6, msg=key)


def test_a_failure_on_one_rank_stops_all_and_prints_once(runs):
    rank0, rank1 = (json.loads((runs / f"agree.rank{r}.json").read_text()) for r in range(2))
    assert rank1 == {"type": "ValueError", "report": True, "message": "train.out_dir: only rank 1 sees this",
                     "usage": None, "ok": "fine"}  # fmt: skip
    assert rank0["type"] == "PeerError" and rank0["report"] is False and rank0["usage"] is True
    assert rank0["message"] == "testing: rank 1 failed (see its error)" and rank0["ok"] == "fine"


@pytest.mark.parametrize(
    "name, rank1_says, rank0_says",
    [("nan_loss", "the loss is nan at layer 1 (MoE): non-finite router scores", "the loss is not finite on rank 1"),
     ("nan_grad", "the gradient norm is not finite; non-finite gradients in 1 parameter(s) on rank 1: "
                  "blocks.0.ffn.experts.w_down_EFD", "the gradient norm is not finite on rank 1")],
)  # fmt: skip
def test_a_nan_on_one_rank_stops_all_and_names_the_culprit(runs, name, rank1_says, rank0_says):
    rank0, rank1 = (json.loads((runs / f"{name}.rank{r}.json").read_text()) for r in range(2))
    assert rank1["type"] == rank0["type"] == "NonFiniteLossError"
    assert rank1["report"] and not rank0["report"]
    assert rank1["message"].startswith(f"step 2: {rank1_says}"), rank1["message"]
    assert rank0["message"].startswith(f"step 2: {rank0_says}"), rank0["message"]
    assert [r["step"] for r in records(runs / name)] == [1]
