"""`moge torchrun`: the launcher adds nothing to a failed rank's one error line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moge.distributed.launch import split_argv

ROOT = Path(__file__).resolve().parents[2]


def test_split_argv():
    launcher, rest = split_argv(["--standalone", "--nproc_per_node", "2", "train", "tiny-moge", "a=1"])
    assert launcher == ["--standalone", "--nproc_per_node", "2"] and rest == ["train", "tiny-moge", "a=1"]
    with pytest.raises(ValueError, match="expected \\[TORCHRUN OPTIONS\\] then a moge subcommand"):
        split_argv(["--standalone"])


def test_split_argv_skips_option_values_that_look_like_a_subcommand():
    argv = ["--rdzv_id", "train", "--log-dir", "eval", "--nproc_per_node", "2", "train", "tiny-moge"]
    launcher, rest = split_argv(argv)
    assert launcher == argv[:6] and rest == ["train", "tiny-moge"]
    launcher, rest = split_argv(["--rdzv_id=train", "--standalone", "eval", "runs/x"])
    assert launcher == ["--rdzv_id=train", "--standalone"] and rest == ["eval", "runs/x"]


def _moge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "moge", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_a_bad_override_under_torchrun_is_one_line_and_exit_2(tmp_path):
    proc = _moge(
        "torchrun", "--standalone", "--nproc_per_node", "2",
        "train", "tiny-moge", "parallel.expert_parallel=2", "train.steps=foo",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        "error: train.steps: expected an integer, got 'foo' (str) (in override 'train.steps=foo')"
    ], proc.stderr
    assert proc.stdout == ""


def _start_run(cwd: Path, run: Path) -> subprocess.Popen:
    """A 2-rank `moge torchrun ... train` that runs until stopped."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "moge", "torchrun", "--standalone", "--nproc_per_node", "2",
         "train", "tiny-moge", "parallel.expert_parallel=2", "train.steps=100000", "train.batch_size=1",
         "data.seq_len=16", "train.eval_every=0", "train.save_every=0", "train.threads=1",
         f"train.out_dir={run}"],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wait_for_a_step(proc: subprocess.Popen, run: Path) -> None:
    deadline = time.monotonic() + 90
    while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, "the run did not start"
        time.sleep(0.2)


def test_sigterm_to_the_launcher_saves_the_step_and_exits_143(tmp_path):
    """What a scheduler does to a job: SIGTERM to the launcher, which passes it to the
    ranks; they save the step in flight and say so, and the launcher adds nothing."""
    run = tmp_path / "run"
    proc = _start_run(tmp_path, run)
    try:
        _wait_for_a_step(proc, run)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr and "terminated (SIGTERM) after step" in stderr, stderr
    assert (run / "checkpoints" / "LATEST").exists()


def _rank_pid(launcher: int, rank: int) -> int:
    """The pid of the launcher's worker with RANK=rank (from /proc)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            env = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == launcher and f"RANK={rank}".encode() in env:
            return int(stat.parent.name)
    raise AssertionError(f"no worker of rank {rank}")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc")
def test_a_rank_killed_by_a_signal_is_named_and_exits_128_plus_the_signal(tmp_path):
    """A rank the OOM killer takes (SIGKILL) prints nothing itself; the launcher says which one."""
    run = tmp_path / "run"
    proc = _start_run(tmp_path, run)
    try:
        _wait_for_a_step(proc, run)
        rank0 = _rank_pid(proc.pid, 0)
        os.kill(rank0, signal.SIGSTOP)  # so that rank 1's death is the first failure torchrun sees
        os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
        time.sleep(1)  # torchrun polls its ranks every 0.1 s
        os.kill(rank0, signal.SIGCONT)
        _, stderr = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGKILL, stderr
    assert "error: rank 1 was killed by SIGKILL" in stderr, stderr
