"""`moge torchrun`: the launcher adds nothing to a failed rank's one error line."""

from __future__ import annotations

import os
import subprocess
import sys
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
