"""Reliability of the run folder: the run lock, LATEST lost, metrics.jsonl, resume order, SIGTERM.

Each test names the fault it tries; docs/reliability.md ("Run folders") points here.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from ranks import run_ranks

import moge.training.loop as train_mod
import moge.training.runfolder as runfolder
from moge.cli import main
from moge.training.checkpoint import find_checkpoint, load_run
from moge.training.config import config_from_dict
from moge.training.runfolder import RunFolderBusy, RunLock, Terminated, read_metrics, rewrite_metrics

pytestmark = pytest.mark.usefixtures("one_thread")
SHARD = "shard-00001-model-00001-of-00001.safetensors"  # the one shard (model + AdamW state) of one process

CFG = {
    "name": "rf",
    "model": {"d_model": 32, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 16},
    "moe": {"num_experts": 4, "num_groups": 2, "top_k": 2, "expert_hidden": 16},
    "data": {"seq_len": 16},
    "train": {"steps": 6, "batch_size": 2, "warmup_steps": 1, "log_every": 100, "eval_every": 0,
              "eval_batches": 1, "save_every": 2, "keep_last": 3, "threads": 1},
}  # fmt: skip


def raw_cfg(out_dir: Path, **train_kw) -> dict:
    raw = copy.deepcopy(CFG)
    raw["train"].update(out_dir=str(out_dir), **train_kw)
    return raw


def cfg_of(out_dir: Path, **train_kw):
    return config_from_dict(raw_cfg(out_dir, **train_kw))


@pytest.fixture(scope="module")
def done_run(tmp_path_factory) -> Path:
    """A finished 6-step run with checkpoints at steps 2, 4 and 6; tests copy it."""
    run = tmp_path_factory.mktemp("rf") / "run"
    train_mod.train(cfg_of(run), progress=False)
    return run


def copy_run(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, the lock file (rewritten by each run that takes it) left out."""
    files = (p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock")
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


def train_yaml(tmp_path: Path, run: Path, **train_kw) -> Path:
    path = tmp_path / "rf.yaml"
    path.write_text(yaml.safe_dump(raw_cfg(run, **train_kw)))
    return path


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ============================================================================ the run lock


def test_second_run_on_a_locked_folder_is_one_error_line_naming_the_pid(tmp_path, cli_error, done_run):
    run = copy_run(done_run, tmp_path)
    before = snapshot(run)
    with RunLock(run):  # another run holds it (flock conflicts across open files, even in one process)
        for resume in ("true", "false"):
            line = cli_error(["train", str(train_yaml(tmp_path, run)), f"train.resume={resume}"])
            assert "is in use by another run" in line and f"pid {os.getpid()}" in line, line
        assert (run / ".lock").read_text() == f"{os.getpid()}\n", "the refused run left the pid alone"
    assert snapshot(run) == before, "the busy folder is untouched"


def test_lock_held_by_another_process_names_its_pid(tmp_path):
    run = tmp_path / "run"
    # moge/training/runfolder.py imports nothing of moge (nor torch) at the top: load it alone, fast.
    code = (
        "import importlib.util, sys, time\n"
        "spec = importlib.util.spec_from_file_location('rf', sys.argv[1])\n"
        "rf = importlib.util.module_from_spec(spec); spec.loader.exec_module(rf)\n"
        "lock = rf.RunLock(sys.argv[2]).acquire(); print('ok', flush=True); time.sleep(60)\n"
    )
    args = [sys.executable, "-c", code, runfolder.__file__, str(run)]
    child = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ok"
        with pytest.raises(RunFolderBusy, match=f"pid {child.pid}"):
            RunLock(run).acquire()
    finally:
        child.kill()
        child.wait()
    with RunLock(run) as lock:  # the kernel dropped the dead holder's lock
        assert lock.stale_pid == child.pid


@pytest.mark.parametrize("content", ["dead_pid", "garbage", "empty", "huge_number"])
def test_stale_lock_file_is_taken_over(tmp_path, content):
    run = tmp_path / "run"
    run.mkdir()
    pid = dead_pid()
    text = {"dead_pid": f"{pid}\n", "garbage": "\xff\xfe lock", "empty": "", "huge_number": "9" * 30}[content]
    (run / ".lock").write_bytes(text.encode("utf-8", "surrogateescape"))
    with RunLock(run) as lock:
        assert (lock.stale_pid == pid) if content == "dead_pid" else lock.stale_pid is None
        assert (run / ".lock").read_text() == f"{os.getpid()}\n"


def test_stale_lock_then_training_says_so_and_runs(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    pid = dead_pid()
    (run / ".lock").write_text(f"{pid}\n")
    train_mod.train(cfg_of(run, steps=1, save_every=0), progress=False)
    assert f"left by pid {pid}, which is no longer running" in "".join(capsys.readouterr())
    assert find_checkpoint(run).name == "step_00000001"


def test_failed_run_leaves_no_folder_and_no_lock(tmp_path, cli_error):
    run = tmp_path / "run"
    line = cli_error(["train", str(train_yaml(tmp_path, run)), f"data.path={tmp_path / 'nope.txt'}"])
    assert line.startswith("error: data.path:"), line
    assert not run.exists()


def test_lock_on_an_out_dir_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="train.out_dir: .* exists and is not a folder"):
        RunLock(tmp_path / "f").acquire()


def test_an_out_dir_under_a_file_names_the_field(tmp_path, cli_error):
    (tmp_path / "f").write_text("x")
    line = cli_error(["train", "tiny-moge", f"train.out_dir={tmp_path / 'f' / 'run'}", "train.steps=1"])
    assert line.startswith(
        f"error: train.out_dir: {tmp_path / 'f'} exists and is not a folder (on the path of"
    )


def test_lock_file_alone_is_not_a_previous_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("1\n")
    train_mod.train(cfg_of(run, steps=1, save_every=0), progress=False)  # no "already holds a run"


# ============================================================================ LATEST missing


def test_latest_missing_is_noted_by_rank_0_only(tmp_path, done_run, capsys):
    run = copy_run(done_run, tmp_path)
    (run / "checkpoints" / "LATEST").unlink()
    newest = run / "checkpoints" / "step_00000006"
    assert train_mod._prepare_out_dir(run, True, main=False) == newest  # rank 1 of 2: same folder
    assert "LATEST is missing" not in "".join(capsys.readouterr())
    assert train_mod._prepare_out_dir(run, True, main=True) == newest
    assert "LATEST is missing; resuming from the newest verified checkpoint" in "".join(capsys.readouterr())


def test_latest_missing_resumes_from_the_newest_verified_step(tmp_path, done_run, capsys):
    run = copy_run(done_run, tmp_path)
    (run / "checkpoints" / "LATEST").unlink()
    shutil.rmtree(run / "checkpoints" / "step_00000006")  # a partial copy: 2 and 4 arrived
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    result = train_mod.train(cfg_of(run, resume=True), progress=False)
    assert "LATEST is missing; resuming from the newest verified checkpoint" in "".join(capsys.readouterr())
    assert result.step == 6 and find_checkpoint(run).name == "step_00000006"
    reference, _, _ = load_run(done_run)
    resumed, _, _ = load_run(run)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    again = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [[(r["step"], r["loss"]) for r in rs if r["type"] == "train"] for rs in (again, metrics)]
    assert losses[0] == losses[1] and len(losses[0]) == 6, "steps 1-4 kept, 5-6 redone alike"


@pytest.mark.parametrize(
    "damage", ["newest_truncated", "newest_no_state", "newest_state_flipped", "all_damaged"]
)
def test_latest_missing_and_newest_step_damaged_refuses_and_changes_nothing(
    tmp_path, done_run, cli_error, damage
):
    run = copy_run(done_run, tmp_path)
    root = run / "checkpoints"
    (root / "LATEST").unlink()
    newest = root / "step_00000006"
    if damage == "newest_truncated":
        (newest / SHARD).write_bytes((newest / SHARD).read_bytes()[:100])
    elif damage == "newest_no_state":
        (newest / "state.json").unlink()
    elif damage == "newest_state_flipped":
        data = bytearray((newest / "state.json").read_bytes())
        data[20] ^= 0x01
        (newest / "state.json").write_bytes(bytes(data))
    else:
        for folder in root.iterdir():
            (folder / "state.json.sha256").unlink()
    before = snapshot(run)
    line = cli_error(["train", str(train_yaml(tmp_path, run)), "train.resume=true"])
    assert "LATEST is missing and the newest step folder" in line and "step_00000006" in line, line
    assert snapshot(run) == before, "nothing in the run folder changed"


def test_without_resume_a_folder_with_step_folders_is_never_overwritten(tmp_path, done_run, cli_error):
    run = copy_run(done_run, tmp_path)
    (run / "checkpoints" / "LATEST").unlink()
    (run / "metrics.jsonl").unlink()
    (run / "config.yaml").unlink()
    before = snapshot(run)
    line = cli_error(["train", str(train_yaml(tmp_path, run))])
    assert "already holds a run" in line, line
    assert snapshot(run) == before


# ============================================================================ metrics.jsonl


def test_metrics_rewrite_is_atomic_when_the_rename_fails(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n')

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runfolder.os, "replace", boom)
    with pytest.raises(OSError, match="metrics.jsonl: writing failed .*previous content is kept"):
        rewrite_metrics(path, [{"step": 1}])
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"], "no temporary file left"


def test_metrics_rewrite_fsyncs_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(runfolder.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(
        runfolder.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1]
    )
    rewrite_metrics(tmp_path / "metrics.jsonl", [{"step": 1}])
    assert events == ["fsync", "replace", "fsync"], "file fsynced, renamed, folder fsynced"


@pytest.mark.parametrize(
    "content, kept",
    [
        (b'{"step": 1}\n{"step": 2}\n{"st', [1, 2]),  # torn last line (a kill mid-write)
        (b'{"step": 1}\n\n{"step": 5}\n', [1]),  # beyond the resumed step
        (b'{"step": true}\n{"step": 1.0}\n{"step": "2"}\n[1]\n{"step": 2}\n', [2]),  # wrong types
        (b'{"step": 1, "loss": NaN}\n', [1]),  # Python's JSON extension, written by json.dumps
    ],
)
def test_read_metrics_keeps_only_whole_records_up_to_the_step(tmp_path, content, kept):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(content)
    assert [r["step"] for r in read_metrics(path, 2)] == kept


@pytest.mark.parametrize("where", ["train", "eval"])
def test_metrics_that_are_not_utf8_name_the_file(tmp_path, done_run, cli_error, where):
    run = copy_run(done_run, tmp_path)
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 3, "note": "\xff\xfe"}\n')
    if where == "train":
        line = cli_error(["train", str(train_yaml(tmp_path, run, steps=8)), "train.resume=true"])
        assert find_checkpoint(run).name == "step_00000006", "nothing trained"
    else:
        line = cli_error(["eval", str(run), "--batches", "1"])
    assert "metrics.jsonl" in line and "UTF-8" in line, line


# ============================================================================ resume order


def test_failed_resume_changes_nothing_in_the_run_folder(tmp_path, done_run, cli_error):
    run = copy_run(done_run, tmp_path)
    folder = find_checkpoint(run)
    data = bytearray((folder / SHARD).read_bytes())
    data[-2] ^= 0x40
    (folder / SHARD).write_bytes(bytes(data))
    before = snapshot(run)
    line = cli_error(
        ["train", str(train_yaml(tmp_path, run, steps=8, weight_decay=0.5)), "train.resume=true"]
    )
    assert f"{SHARD}: corrupted" in line, line
    assert snapshot(run) == before, "config.yaml, metrics.jsonl and the checkpoints are untouched"


def test_resume_applies_and_records_changed_optimizer_settings(tmp_path, done_run, capsys):
    run = copy_run(done_run, tmp_path)
    train_mod.train(
        cfg_of(run, steps=8, resume=True, weight_decay=0.05, beta1=0.8, beta2=0.9), progress=False
    )
    err = "".join(capsys.readouterr())
    assert "applied group 0 weight_decay: 0.1 -> 0.05" in err and "betas: (0.9, 0.95) -> (0.8, 0.9)" in err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    resume = [r for r in records if r["type"] == "resume"]
    assert resume == [{"type": "resume", "step": 6, "optimizer_changes": resume[0]["optimizer_changes"]}]
    assert len(resume[0]["optimizer_changes"]) == 3  # weight decay of group 0, betas of both groups
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["weight_decay"] == 0.05
    groups = json.loads((find_checkpoint(run) / "state.json").read_text())["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0] and groups[0]["betas"] == [0.8, 0.9]


def test_unchanged_resume_records_no_change(tmp_path, done_run):
    run = copy_run(done_run, tmp_path)
    train_mod.train(cfg_of(run, steps=8, resume=True), progress=False)
    assert '"resume"' not in (run / "metrics.jsonl").read_text()


def test_reapply_refuses_a_structural_optimizer_change():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], amsgrad=False)
    wanted = runfolder.optimizer_settings(opt)
    wanted[0]["amsgrad"] = True
    with pytest.raises(ValueError, match="'amsgrad' was False in the checkpoint and is True now"):
        runfolder.reapply_optimizer_settings(opt, wanted)
    with pytest.raises(ValueError, match="1 saved param groups, the config builds 2"):
        runfolder.reapply_optimizer_settings(opt, wanted * 2)


# ============================================================================ SIGTERM


def _sigterm_at(monkeypatch, step: int, times: int = 1) -> None:
    real = train_mod._train_step

    def step_and_signal(s, *args):
        if s + 1 == step:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGTERM)
        return real(s, *args)

    monkeypatch.setattr(train_mod, "_train_step", step_and_signal)


def test_sigterm_finishes_the_step_saves_it_and_says_how_to_resume(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    _sigterm_at(monkeypatch, 3)  # arrives during step 3; save_every=2 would not save it
    code = main(["train", str(train_yaml(tmp_path, run))])
    err = "".join(capsys.readouterr())
    assert code == 143
    assert (
        "terminated (SIGTERM) after step 3" in err and "train.resume=true" in err and "Traceback" not in err
    )
    assert find_checkpoint(run).name == "step_00000003"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "the handler is removed again"
    monkeypatch.undo()
    result = train_mod.train(cfg_of(run, resume=True), progress=False)
    assert result.step == 6
    reference = tmp_path / "ref"
    train_mod.train(cfg_of(reference), progress=False)
    for a, b in zip(load_run(reference)[0].state_dict().values(), load_run(run)[0].state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_second_sigterm_abandons_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _sigterm_at(monkeypatch, 4, times=2)
    with pytest.raises(Terminated, match="second SIGTERM.*last checkpoint is kept"):
        train_mod.train(cfg_of(run), progress=False)
    assert find_checkpoint(run).name == "step_00000002"
    assert not any(p.name.startswith(".tmp") for p in (run / "checkpoints").iterdir())


def _sigterm_worker(rank: int, world: int, root: str) -> None:
    import torch.distributed as dist

    dt = train_mod
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=world)
    real = dt._train_step

    def step_and_signal(step, run):
        if step + 1 == 3 and rank == 1:  # only rank 1 is signalled, during step 3
            os.kill(os.getpid(), signal.SIGTERM)
        return real(step, run)

    dt._train_step = step_and_signal  # a forked worker: the parent's module is untouched
    raw = raw_cfg(Path(root) / "run")
    raw["parallel"] = {"expert_parallel": 2}
    try:
        train_mod.train(config_from_dict(raw), progress=False)
        got = "finished"
    except Terminated as err:
        got = str(err)
    finally:
        dist.destroy_process_group()
    (Path(root) / f"rank{rank}.txt").write_text(got)


def test_sigterm_on_one_rank_stops_every_rank_after_saving_the_step(tmp_path):
    run_ranks(_sigterm_worker, 2, str(tmp_path), what="the ranks did not stop together")
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text().startswith("terminated (SIGTERM) after step 3")
    assert find_checkpoint(tmp_path / "run").name == "step_00000003"
    assert load_run(tmp_path / "run")[2] == 3


def test_full_disk_while_logging_a_metrics_record_is_one_line_naming_the_file(
    tmp_path, cli_error, monkeypatch
):
    run = tmp_path / "run"
    real = runfolder.append_record

    class FullDisk:
        name = str(run / "metrics.jsonl")

        def write(self, text):
            raise OSError(28, "No space left on device")

        def flush(self):
            pass

    calls = {"n": 0}

    def third_record_fails(f, rec):
        calls["n"] += 1
        return real(FullDisk() if calls["n"] == 3 else f, rec)

    monkeypatch.setattr(train_mod, "append_record", third_record_fails)
    line = cli_error(["train", str(train_yaml(tmp_path, run))])
    assert (
        line == f"error: {run / 'metrics.jsonl'}: writing a metrics record failed (No space left on device)"
    )
    assert find_checkpoint(run).name == "step_00000002", "the checkpoint before it is kept"


def test_a_finished_run_leaves_no_pid_so_a_resume_reports_no_stale_lock(tmp_path, capsys):
    run = tmp_path / "run"
    train_mod.train(cfg_of(run, steps=2, save_every=0), progress=False)
    assert (run / ".lock").read_bytes() == b""
    train_mod.train(cfg_of(run, steps=3, save_every=0, resume=True), progress=False)
    assert "no longer running" not in "".join(capsys.readouterr())
