"""Tests of the one training loop on 2 and 4 gloo ranks (moge.training + moge.distributed).

A run on P processes draws the same micro-batches as one process with P times the
grad_accum, so single-process runs are the references. Workers are forked (a spawned
worker re-imports torch, seconds per process on 2 cores); each launch runs several
scenarios, the parent trains the references and compares.

Launches: K (2 ranks, one SIGKILLed mid-run), A (4 ranks, dp 2 x ep 2, stops at step 3),
B (2 ranks: ep 2 vs one process, 4 -> 2 resume, the killed run resumed, the
DTensor placements, failures agreed on).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp
from allocations import LargestAllocation
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor, Shard
from torch.multiprocessing.spawn import ProcessException
from torch.testing import assert_close

import moge.model.init as init_mod
import moge.training.loop as loop_mod
from moge.cli import _should_print
from moge.distributed.agree import PeerError, agree
from moge.distributed.mesh import connect, single_process
from moge.distributed.parallelize import checkpoint_views, local
from moge.tools.plan import _meta_model, memory_plan
from moge.tools.plan_activations import activations, paths_for, weights_used
from moge.training import NonFiniteLossError, train
from moge.training.checkpoint import find_checkpoint, load_checkpoint, load_run, read_tensors, save_checkpoint
from moge.training.config import config_from_dict
from moge.training.data import load_dataset
from moge.training.loop import rank_batches

STEPS, STOP = 6, 3
LOSS_KEYS = ("loss", "lm_loss", "aux_loss", "grad_norm")
ROUTING_KEYS = ("imbalance_score", "max_over_mean", "load_entropy", "dead_experts", "cv", "lb_loss", "z_loss")


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


def weights(run_dir: Path) -> dict:
    """Model weights and AdamW state, whole (the RNG states differ by design)."""
    return {k: v for k, v in read_tensors(run_dir).items() if not k.startswith("rng.")}


# --- workers ------------------------------------------------------------------------------


def _agree_scenario(world, root: Path) -> None:
    """Rank 1 alone fails: it reports its own error, rank 0 a quiet PeerError."""

    def fail_on_rank_1():
        if world.rank == 1:
            raise ValueError("train.out_dir: only rank 1 sees this")
        return "fine"

    try:
        agree(world, "testing", fail_on_rank_1)
        got = {"type": "none"}
    except (ValueError, PeerError) as err:
        got = {"type": type(err).__name__, "report": err.moge_report, "message": str(err),
               "usage": getattr(err, "usage", None)}  # fmt: skip
    got["ok"] = agree(world, "testing", lambda: "fine")
    (root / f"agree.rank{world.rank}.json").write_text(json.dumps(got))


def _interrupt_scenario(world, root: Path) -> None:
    """A KeyboardInterrupt (Ctrl-C, or a second SIGTERM) inside a phase on rank 1 is
    shared like an error: rank 0 stops with a PeerError instead of waiting in a collective."""

    def interrupt_rank_1():
        if world.rank == 1:
            raise KeyboardInterrupt
        return "fine"

    try:
        agree(world, "testing", interrupt_rank_1)
        got = {"type": "none"}
    except (KeyboardInterrupt, PeerError) as err:
        got = {"type": type(err).__name__, "report": err.moge_report, "usage": getattr(err, "usage", None)}
    got["ok"] = agree(world, "testing", lambda: "fine")
    (root / f"interrupt.rank{world.rank}.json").write_text(json.dumps(got))


def _bad_rng_scenario(world, root: Path) -> None:
    """Rank 1's own RNG state is cut short: both ranks stop while reading the checkpoint
    (rank 1 reports, rank 0 a PeerError), so neither trains on waiting for the other."""
    from safetensors import safe_open

    from moge.training.manifest import write_manifest

    bad = root / "bad_rng"
    if world.rank == 0:
        shutil.copytree(root / "ep2", bad)
        folder = find_checkpoint(bad)
        file = folder / "rng.safetensors"
        with safe_open(str(file), "pt") as f:
            meta = f.metadata()
        tensors = load_file(str(file))
        tensors["torch_cpu_rank1"] = tensors["torch_cpu_rank1"][:10].clone()
        save_file(tensors, str(file), metadata=meta)
        write_manifest(folder, json.loads((folder / "state.json").read_text()))  # vouches for it
    dist.barrier()
    model, opt = loop_mod._build(make_cfg(bad, 2), world)
    try:
        load_checkpoint(bad, model, opt, torch.Generator(), world)
        got = {"type": "none"}
    except (ValueError, PeerError) as err:
        got = {"type": type(err).__name__, "report": err.moge_report, "message": str(err)}
    got["ok"] = agree(world, "testing", lambda: "fine")
    (root / f"bad_rng.rank{world.rank}.json").write_text(json.dumps(got))


def _poison_router(model, rank, calls):
    def hook(layer, args):
        calls["n"] += 1
        if calls["n"] == 2 and rank == 1:
            with torch.no_grad():
                local(layer.router.weight)[0, 0] = float("nan")

    model.blocks[1].ffn.register_forward_pre_hook(hook)


def _poison_grad(model, rank, calls):
    def nan_grad(grad):
        return torch.full_like(grad, float("nan"))

    def hook(module, args, output):
        calls["n"] += 1
        if calls["n"] == 2 and rank == 1:
            output.register_hook(nan_grad)  # NaN into q_proj's weight gradient, and below it

    model.blocks[0].attn.q_proj.register_forward_hook(hook)


def _nan_scenario(rank: int, root: Path, name: str, poison) -> None:
    """Rank 1 goes NaN in step 2: both ranks stop, only rank 1 reports."""
    real_build = loop_mod.build_optimizer
    calls = {"n": 0}

    def build_and_hook(model, tc):
        poison(model, rank, calls)
        return real_build(model, tc)

    loop_mod.build_optimizer = build_and_hook  # a forked worker: the parent's module is untouched
    try:
        train(make_cfg(root / name, 2, steps=4), progress=False)
        got = {"type": "none"}
    except NonFiniteLossError as err:
        got = {"type": type(err).__name__, "report": err.moge_report, "message": str(err)}
    finally:
        loop_mod.build_optimizer = real_build
    (root / f"{name}.rank{rank}.json").write_text(json.dumps(got))


def _shard_report(model, opt, world) -> dict:
    """Per parameter: a DTensor of Shard placements only? Its local and whole sizes, one
    row's size (the most torch.chunk's rounding adds), and its AdamW moments' local sizes."""
    views = checkpoint_views(model, world)
    found = {}
    for name, p in model.named_parameters():
        whole = views[name](p) if name in views else p
        moments = (
            [opt.state[p][k] for k in ("exp_avg", "exp_avg_sq")] if opt is not None and p in opt.state else []
        )
        found[name] = {
            "dtensor": isinstance(p, DTensor) and all(isinstance(m, DTensor) for m in moments),
            "shard": [isinstance(pl, Shard) for pl in p.placements] if isinstance(p, DTensor) else [],
            "local": local(p).numel(), "moments_local": [local(m).numel() for m in moments],
            "whole": whole.numel(), "row": whole.numel() // whole.shape[0], "expert": name in views,
            "meta": local(p).is_meta,
        }  # fmt: skip
    return found


def _write_report(root: Path, stage: str, rank: int, report: dict) -> None:
    (root / f"shards.{stage}.rank{rank}.json").write_text(json.dumps(report))


def _placements(root: Path, rank: int) -> None:
    """After a real step: every parameter and AdamW moment is a DTensor shard; none is whole."""
    cfg = make_cfg(root / "unused", 2)
    world = connect(cfg.parallel, cfg.moe.num_groups)
    model, opt = loop_mod._build(cfg, world)
    x_BL = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(rank))
    model(x_BL, x_BL.roll(-1, 1)).loss.backward()
    opt.step()
    _write_report(root, "step", rank, _shard_report(model, opt, world))


SMALL_BLOCK = 100  # init blocks in _init_scenario: smaller than most parameters here


def _gathered(model, world) -> dict:
    """Every parameter whole and the persistent buffers (a collective)."""
    views = checkpoint_views(model, world)
    out = {n: (views[n](p) if n in views else p).full_tensor() for n, p in model.named_parameters()}
    return out | {n: b for n, b in model.state_dict().items() if n not in out}


def _init_scenario(root: Path, rank: int, tag: str, expert_parallel: int) -> None:
    """The loop's build on this world, watched: every parameter on meta when built,
    sharded by parallelize, allocated only as shards; the initial weights gathered."""
    cfg = make_cfg(root / "unused", expert_parallel)
    world = connect(cfg.parallel, cfg.moe.num_groups)
    real_parallelize, real_materialize, reports = loop_mod.parallelize, loop_mod.materialize, {}

    def parallelize(model, *args):
        reports["built"] = {n: {"meta": p.is_meta} for n, p in model.named_parameters()}
        out = real_parallelize(model, *args)
        reports["parallelized"] = _shard_report(out, None, world)
        return out

    def materialize(model, *args):
        out = real_materialize(model, *args)
        reports["materialized"] = _shard_report(out, None, world)
        return out

    loop_mod.parallelize, loop_mod.materialize = parallelize, materialize
    try:
        with pytest.MonkeyPatch.context() as mp, LargestAllocation() as probe:
            mp.setattr(init_mod, "BLOCK_NUMEL", SMALL_BLOCK)
            model, _ = loop_mod._build(cfg, world)
    finally:
        loop_mod.parallelize, loop_mod.materialize = real_parallelize, real_materialize
    small = _gathered(model, world)
    default = _gathered(loop_mod._build(cfg, world)[0], world)
    for stage, report in reports.items():
        _write_report(root, f"{stage}.{tag}", rank, report)
    info = {"largest": probe.largest, "op": probe.op, "buffers": max(b.nbytes for b in model.buffers())}
    (root / f"alloc.{tag}.rank{rank}.json").write_text(json.dumps(info))
    if rank == 0:
        save_file(
            {k: v.detach().contiguous() for k, v in small.items()}, root / f"init_small.{tag}.safetensors"
        )
        save_file({k: v.detach().contiguous() for k, v in default.items()}, root / f"init.{tag}.safetensors")


def _measure(root: Path, rank: int, tag: str, expert_parallel: int) -> None:
    """Bytes this rank holds after a real step: parameters, gradients, AdamW state."""
    cfg = make_cfg(root / "unused", expert_parallel)
    world = connect(cfg.parallel, cfg.moe.num_groups)
    model, opt = loop_mod._build(cfg, world)
    x_BL = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(rank))
    kept = []  # the storages autograd keeps: FSDP2's all-gathered weights are freed (0 bytes) after forward
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: kept.append(t.untyped_storage()) or t, lambda t: t
    ):
        out = model(x_BL, x_BL.roll(-1, 1))
    kept.append(out.logits.untyped_storage())  # and the logits, alive in the output
    shards = {local(p).untyped_storage().data_ptr() for p in model.parameters()}
    held = sum(
        st.nbytes() for st in {st.data_ptr(): st for st in kept if st.data_ptr() not in shards}.values()
    )
    out.loss.backward()
    opt.step()

    def nbytes(t):
        return local(t).numel() * local(t).element_size()

    got = {
        "params": sum(nbytes(p) for p in model.parameters()),
        "grads": sum(nbytes(p.grad) for p in model.parameters()),
        "optimizer": sum(nbytes(v) for s in opt.state.values() for v in s.values()),
    }
    (root / f"bytes.{tag}.rank{rank}.json").write_text(json.dumps({**got, "held": held}))


def _resave(root: Path, src: str, dst: str) -> None:
    """Load a checkpoint into this world's shards and save it again, without a step."""
    cfg = make_cfg(root / dst, 2)
    world = connect(cfg.parallel, cfg.moe.num_groups)
    model, opt = loop_mod._build(cfg, world)
    gen = torch.Generator()
    step = load_checkpoint(root / src, model, opt, gen, world)
    _write_report(root, "load", world.rank, _shard_report(model, opt, world))
    save_checkpoint(root / dst, step, model, opt, gen, cfg, 1, world)


def _init(rank: int, world: int, root: Path, name: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group(
        "gloo", init_method=f"file://{root}/rendezvous-{name}", rank=rank, world_size=world
    )


def _worker_killed(rank: int, world: int, root: str) -> None:
    root = Path(root)
    _init(rank, world, root, "killed")
    real_save = loop_mod._save

    def slow_save(run, step):  # room for the parent to kill rank 1 between steps 2 and 8
        real_save(run, step)
        if step >= 2:
            time.sleep(0.5)

    loop_mod._save = slow_save
    train(make_cfg(root / "killed", 2, steps=8, save_every=1), progress=False)


def _worker_four(rank: int, world: int, root: str) -> None:
    root = Path(root)
    _init(rank, world, root, "four")
    try:
        train(make_cfg(root / "four", 2, eval_every=3), progress=False, stop_at=STOP)
        _measure(root, rank, "dp2xep2", 2)
        _init_scenario(root, rank, "dp2xep2", 2)
    finally:
        dist.destroy_process_group()


def _worker_two(rank: int, world: int, root: str) -> None:
    root = Path(root)
    _init(rank, world, root, "two")
    try:
        first = train(make_cfg(root / "ep2", 2, eval_every=3), progress=False)
        again = train(make_cfg(root / "ep2", 2, eval_every=3, resume=True), progress=False)  # nothing left
        report = {k: [getattr(r, k) for r in (first, again)] for k in ("step", "train_loss", "val_loss")}
        _write_report(root, "finished", rank, report)
        train(make_cfg(root / "on2", 2, eval_every=3, grad_accum=2, resume=True), progress=False)
        train(make_cfg(root / "killed", 2, steps=8, save_every=1, resume=True), progress=False)
        _resave(root, "four", "resaved2")
        _placements(root, rank)
        _init_scenario(root, rank, "ep2", 2)
        _init_scenario(root, rank, "dp2", 1)
        _measure(root, rank, "ep2", 2)
        _measure(root, rank, "dp2", 1)
        _agree_scenario(connect(make_cfg(root, 2).parallel, 4), root)
        _interrupt_scenario(connect(make_cfg(root, 2).parallel, 4), root)
        _bad_rng_scenario(connect(make_cfg(root, 2).parallel, 4), root)
        _nan_scenario(rank, root, "nan_loss", _poison_router)
        _nan_scenario(rank, root, "nan_grad", _poison_grad)
    finally:
        dist.destroy_process_group()


def _launch(fn, world: int, root: Path, timeout: float = 120.0, kill_when=None):
    procs = tmp.start_processes(fn, args=(world, str(root)), nprocs=world, join=False, start_method="fork")
    deadline = time.monotonic() + timeout
    while True:
        if kill_when is not None and kill_when():
            os.kill(procs.processes[1].pid, signal.SIGKILL)  # rank 1 dies; rank 0 cannot go on
            kill_when = None
            deadline = time.monotonic() + 30
        try:
            if procs.join(timeout=0.2):
                return
        except ProcessException:
            if kill_when is None:
                for p in procs.processes:
                    p.kill()
                return
            raise
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.kill()
            pytest.fail(f"{world} workers did not finish in {timeout} s (a collective hung?)")


def _checkpointed(run: Path, step: int):
    def ready() -> bool:
        latest = run / "checkpoints" / "LATEST"
        return latest.exists() and latest.read_text().strip() >= f"step_{step:08d}"

    return ready


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The folder of every run: references in this process, the rest on 2 and 4 ranks."""
    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("dist")
    try:
        _launch(_worker_killed, 2, root, kill_when=_checkpointed(root / "killed", 2))
        shutil.copytree(root / "killed", root / "killed_as_left")
        _launch(_worker_four, 4, root)
        for name in ("on2", "on1"):
            shutil.copytree(root / "four", root / name)
        train(make_cfg(root / "single", grad_accum=2, eval_every=3), progress=False)
        train(make_cfg(root / "single4", grad_accum=4, eval_every=3), progress=False)
        train(make_cfg(root / "killed_ref", grad_accum=2, steps=8), progress=False)
        _launch(_worker_two, 2, root)
        train(make_cfg(root / "on1", grad_accum=4, eval_every=3, resume=True), progress=False)
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


# --- tests: 2 and 4 ranks against one process -------------------------------------------------


def _same_curve(got: list[dict], ref: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for key in LOSS_KEYS:
        assert_close([r[key] for r in got], [r[key] for r in ref], rtol=2e-5, atol=1e-6, msg=key)
    for key in ROUTING_KEYS:  # statistics of the whole step's batch, every rank's tokens
        got_k = [layer[key] for r in got for layer in r["routing"]]
        ref_k = [layer[key] for r in ref for layer in r["routing"]]
        assert_close(got_k, ref_k, rtol=1e-4, atol=1e-6, msg=key)


def _same_weights(got: dict, ref: dict) -> None:
    # AdamW divides each element's step by its own gradient scale, so an element whose
    # gradient nearly cancels turns the float sums' order (ranks vs micro-batches) into
    # up to ~5e-6 of weight; atol 1e-5 is still 1/300 of one step (lr 3e-3).
    assert got.keys() == ref.keys()
    for key, value in ref.items():
        assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_ep2_follows_one_process_with_twice_the_grad_accum(runs):
    ep2, single = records(runs / "ep2"), records(runs / "single")
    assert [r["step"] for r in ep2] == list(range(1, STEPS + 1))
    _same_curve(ep2, single)
    assert max(r["grad_norm"] for r in single) > 1.0, "some step is clipped, by the global norm"
    assert [r["lr"] for r in ep2] == [r["lr"] for r in single]
    assert_close([r["val_loss"] for r in records(runs / "ep2", "eval")],
                 [r["val_loss"] for r in records(runs / "single", "eval")], rtol=2e-5, atol=1e-6)  # fmt: skip
    _same_weights(weights(runs / "ep2"), weights(runs / "single"))


def test_dp2_x_ep2_mesh_follows_one_process_with_four_times_the_grad_accum(runs):
    _same_curve(records(runs / "four"), records(runs / "single4")[:STOP])
    folder = find_checkpoint(runs / "four")
    state = json.loads((folder / "state.json").read_text())
    assert state["world"] == {"size": 4, "dp": 2, "ep": 2}
    shards = sorted(p.name for p in folder.glob("shard-*.safetensors"))
    assert len(shards) == 4 and set(state["files"]) == {*shards, "rng.safetensors"}


def test_the_global_load_moves_the_bias_the_same_way(runs):
    got, ref = weights(runs / "ep2"), weights(runs / "single")
    bias = "model.blocks.0.ffn.balance_bias_E"
    assert got[bias].abs().sum() > 0
    assert_close(got[bias], ref[bias], rtol=0, atol=1e-7)


def test_a_checkpoint_of_four_ranks_reloads_identically_on_two_and_on_one(runs):
    four = weights(runs / "four")
    assert_close(weights(runs / "resaved2"), four, rtol=0, atol=0)  # 4 -> 2 shards -> whole
    model, _, step = load_run(runs / "four")
    assert step == STOP
    for name, value in model.state_dict().items():
        assert torch.equal(value, four[f"model.{name}"]), name


def test_a_checkpoint_of_four_ranks_converts_slice_by_slice(runs, tmp_path):
    from moge.interop import convert
    from moge.interop.runfolder import CheckpointSource

    four = weights(runs / "four")
    source = CheckpointSource(find_checkpoint(runs / "four"))
    assert any(len(pieces) > 1 for pieces in source.pieces.values())  # experts split over the ranks
    for name, shape in source.shapes().items():
        assert torch.equal(source.read(name), four[f"model.{name}"]), name
        if "experts." in name:  # one expert of a stacked tensor whose rows two shards hold
            assert torch.equal(source.read(name, shape[0] - 1), four[f"model.{name}"][-1]), name
    convert(runs / "four", tmp_path / "back", to="moge")  # one process, one shard
    back, _, step = load_run(tmp_path / "back")
    assert step == 0
    for name, value in back.state_dict().items():
        assert torch.equal(value, four[f"model.{name}"]), name


@pytest.mark.parametrize("run", ["on2", "on1"])
def test_a_run_of_four_ranks_continues_on_two_and_on_one(runs, run):
    got, ref = records(runs / run), records(runs / "single4")
    _same_curve(got, ref)
    _same_weights(weights(runs / run), weights(runs / "single4"))


def test_sigkill_of_one_rank_leaves_the_last_checkpoint_intact_and_resumable(runs):
    left = runs / "killed_as_left"
    folder = find_checkpoint(left)
    step = int(folder.name.split("_")[1])
    assert 2 <= step < 8
    assert load_run(left)[2] == step  # every file listed in state.json verifies
    assert read_tensors(left)["model.norm.weight"].isfinite().all()
    # Resumed on 2 ranks to step 8: the uninterrupted single-process run's weights.
    _same_weights(weights(runs / "killed"), weights(runs / "killed_ref"))
    assert [r["step"] for r in records(runs / "killed")] == list(range(1, 9))


MESHES = [("ep2", 2), ("dp2", 2), ("dp2xep2", 4)]  # tag, processes


def _stages(runs: Path):
    """(stage, world, rank, report) of every shard report the workers wrote."""
    for tag, world in MESHES:
        for stage in ("parallelized", "materialized"):
            for rank in range(world):
                yield (
                    f"{stage}.{tag}",
                    world,
                    rank,
                    json.loads((runs / f"shards.{stage}.{tag}.rank{rank}.json").read_text()),
                )
    for stage in ("step", "load"):  # 2 ranks, ep 2: after a real step; after loading a 4-rank checkpoint
        for rank in range(2):
            yield stage, 2, rank, json.loads((runs / f"shards.{stage}.rank{rank}.json").read_text())


def test_a_finished_run_resumed_returns_its_metrics_on_every_rank(runs):
    reports = [json.loads((runs / f"shards.finished.rank{r}.json").read_text()) for r in (0, 1)]
    assert reports[0] == reports[1], reports  # only rank 0 reads metrics.jsonl: broadcast
    for key, (first, again) in reports[0].items():
        assert again == first and again is not None, (key, first, again)


def test_no_rank_holds_a_whole_sharded_parameter(runs):
    seen = set()
    for stage, world, rank, found in _stages(runs):
        seen.add(stage.split(".")[0])
        assert any(f["expert"] for f in found.values()) == ("dp2." not in stage + ".")  # ep > 1
        for name, f in found.items():  # 1/world of anything, give or take a row of torch.chunk's rounding
            where = (stage, rank, name)
            assert f["dtensor"] and f["shard"] and all(f["shard"]), where
            assert f["local"] < f["whole"] and f["local"] * world <= f["whole"] + world * f["row"], (where, f)
            assert f["meta"] == stage.startswith("parallelized"), where
            if stage in ("step", "load"):
                assert f["moments_local"] == [f["local"]] * 2, where
    assert seen == {"parallelized", "materialized", "step", "load"}


def test_the_model_is_built_on_meta_and_only_shards_are_allocated(runs):
    for tag, world in MESHES:
        for rank in range(world):
            built = json.loads((runs / f"shards.built.{tag}.rank{rank}.json").read_text())
            assert built and all(f["meta"] for f in built.values()), (tag, rank)
            shards = json.loads((runs / f"shards.materialized.{tag}.rank{rank}.json").read_text())
            alloc = json.loads((runs / f"alloc.{tag}.rank{rank}.json").read_text())
            # The largest tensor allocated while building: a shard, an init block or a
            # buffer, never a whole parameter (the biggest here spans several blocks).
            allowed = max(4 * max(f["local"] for f in shards.values()), 4 * SMALL_BLOCK, alloc["buffers"])
            assert alloc["largest"] <= allowed < 4 * max(f["whole"] for f in shards.values()), (
                tag,
                rank,
                alloc,
            )


@pytest.mark.parametrize("tag, block", [(t, b) for t, _ in MESHES for b in (None, SMALL_BLOCK)])
def test_every_mesh_starts_from_the_one_process_init(runs, monkeypatch, tag, block):
    if block is not None:
        monkeypatch.setattr(init_mod, "BLOCK_NUMEL", block)
    model, _ = loop_mod._build(make_cfg(runs / "unused"), single_process())
    want = dict(model.named_parameters()) | model.state_dict()
    got = load_file(runs / f"{'init' if block is None else 'init_small'}.{tag}.safetensors")
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value.detach()), key


def test_a_failure_on_one_rank_stops_all_and_prints_once(runs):
    rank0, rank1 = (json.loads((runs / f"agree.rank{r}.json").read_text()) for r in range(2))
    assert rank1 == {"type": "ValueError", "report": True, "message": "train.out_dir: only rank 1 sees this",
                     "usage": None, "ok": "fine"}  # fmt: skip
    assert rank0["type"] == "PeerError" and rank0["report"] is False and rank0["usage"] is True
    assert rank0["message"] == "testing: rank 1 failed (see its error)" and rank0["ok"] == "fine"


def test_an_interrupt_on_one_rank_stops_all(runs):
    rank0, rank1 = (json.loads((runs / f"interrupt.rank{r}.json").read_text()) for r in range(2))
    assert rank1 == {"type": "KeyboardInterrupt", "report": True, "usage": None, "ok": "fine"}
    assert rank0 == {"type": "PeerError", "report": False, "usage": False, "ok": "fine"}


def test_a_bad_rng_state_of_one_rank_stops_both_at_reading(runs):
    rank0, rank1 = (json.loads((runs / f"bad_rng.rank{r}.json").read_text()) for r in range(2))
    assert rank1["type"] == "ValueError" and rank1["report"] is True
    assert "rng.safetensors: not a valid RNG state: 'torch_cpu_rank1' holds 10 bytes" in rank1["message"]
    assert rank0["type"] == "PeerError" and rank0["report"] is False, rank0
    assert rank0["ok"] == rank1["ok"] == "fine"


def test_a_nan_loss_on_one_rank_stops_all_and_names_the_culprit(runs):
    rank0, rank1 = (json.loads((runs / f"nan_loss.rank{r}.json").read_text()) for r in range(2))
    assert rank1["type"] == rank0["type"] == "NonFiniteLossError"
    assert rank1["report"] and not rank0["report"]
    assert rank1["message"].startswith("step 2: the loss is nan at layer 1 (MoE): non-finite router scores")
    assert rank0["message"].startswith("step 2: the loss is not finite on rank 1"), rank0["message"]
    assert [r["step"] for r in records(runs / "nan_loss")] == [1]


def test_a_nan_gradient_stops_all_before_the_update(runs):
    # The reduce-scatter spreads rank 1's NaN into every rank's shards: each names its
    # own non-finite shards and the lowest rank reports.
    rank0, rank1 = (json.loads((runs / f"nan_grad.rank{r}.json").read_text()) for r in range(2))
    assert rank1["type"] == rank0["type"] == "NonFiniteLossError"
    assert rank0["report"] and not rank1["report"]
    for rank, got in enumerate((rank0, rank1)):
        assert got["message"].startswith("step 2: the gradient norm is not finite; non-finite gradients in")
        assert f"on rank {rank}: " in got["message"] and "embed.weight" in got["message"]
    assert [r["step"] for r in records(runs / "nan_grad")] == [1]


@pytest.mark.parametrize("tag, world, ep", [("ep2", 2, 2), ("dp2", 2, 1), ("dp2xep2", 4, 2)])
def test_the_memory_plan_matches_the_shards(runs, tag, world, ep):
    plan = memory_plan(make_cfg(runs / "unused"), world, expert_parallel=ep)
    got = json.loads((runs / f"bytes.{tag}.rank0.json").read_text())  # rank 0: the busiest
    held = got.pop("held")
    assert got == {"params": plan.params, "grads": plan.grads, "optimizer": plan.optimizer}
    # What autograd keeps over a forward of 2 x 32 tokens (float32: no weight copies),
    # through the expert-parallel path when ep > 1 (tolerance: tests/tools/test_plan_activations.py).
    cfg = make_cfg(runs / "unused", ep)
    paths = paths_for(cfg, "cpu", "float32", 2, expert_parallel=ep > 1)
    planned = activations(cfg, 2, paths, False, weights_used(_meta_model(cfg), ep, paths)).held
    assert abs(planned / held - 1) < 0.10, (tag, planned, held)
    for rank in range(1, world):
        other = json.loads((runs / f"bytes.{tag}.rank{rank}.json").read_text())
        assert all(other[k] <= got[k] for k in got)
