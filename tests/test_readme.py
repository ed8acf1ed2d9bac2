"""README.md runs as written, top to bottom, so it cannot drift from the code.

How blocks are treated (any section, including ones added later):

- The info string of a fenced block is "LANGUAGE [FLAGS]". All blocks run in the order
  of the file, in one folder: ```python blocks in one shared namespace (the layer built
  in one block is used by the next, a run trained by a shell block is loaded by a Python
  block); ```bash / ```sh / ```shell blocks line by line (`\\` continues a line, `#`
  starts a comment, `&&` chains commands, and a one-line
  `for X in A B; do CMD $X; done` runs CMD once per word); every other language (text,
  yaml, json, ...) is output or data and is not run.
- The flag `no-run` (```bash no-run, ```python no-run) marks a block that is
  intentionally not run: placeholders such as HOST or CONFIG, machines we do not have.
- Every shell command must start with moge, torchrun or python; anything else fails the
  structure test, so a new section has to decide (run it or mark it `no-run`).
  `pip install ...` and `python -m pytest ...` are skipped: the test runs inside the
  installed environment and inside that suite.

Cheap mode (the default suite) keeps the commands and their order but makes each small:
`moge train` (also under torchrun / `moge torchrun`) gets train.steps=2 and one eval
batch, with `train.out_dir` pinned to the folder the command as written would use, so
later commands (`moge eval runs/...`, `train.resume=true`) find what they expect;
`moge eval` gets `--batches 1`, `moge simulate` `--trials 2`, `moge bench` one tiny
round; `python scripts/X.py ...` runs `--help` only, in this process (the scripts are
benchmarks of minutes). With MOGE_README_FULL=1 (and `-m slow`) every command runs exactly as written,
which takes as long as the README says (hours on 2 cores; no command run as a process may
take over 15 minutes). MOGE_README_FULL_FROM=N runs the blocks that open at README line N or later as
written and the ones before cheaply, so a full run can resume at a section;
MOGE_README_LOG=DIR keeps what every command run as a process (scripts, torchrun) printed,
and its time, in DIR/commands.txt.

All of it runs in a fresh temporary folder holding a link to configs/, like a fresh clone.
"""

from __future__ import annotations

import os
import re
import runpy
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FULL = os.environ.get("MOGE_README_FULL") == "1"
FULL_FROM = int(os.environ.get("MOGE_README_FULL_FROM", "1"))  # first README line run as written
COMMAND_SECONDS = 900  # the most one README command may take, as written, on 2 cores
LOG = os.environ.get("MOGE_README_LOG")  # folder for the output of commands run as written
SHELLS = ("bash", "sh", "shell", "console")
CHEAP_TRAIN = ("train.steps=2", "train.eval_batches=1", "train.eval_every=0", "train.save_every=0",
               "train.warmup_steps=1", "train.log_every=1")  # fmt: skip
CHEAP_BENCH = ("--iters", "1", "--warmup", "0", "--no-peers", "--dtype", "fp32", "--tokens", "64",
               "--max-call-seconds", "10")  # fmt: skip


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    language: str
    flags: tuple[str, ...]
    code: str

    @property
    def runs(self) -> bool:
        return "no-run" not in self.flags and self.language in ("python", *SHELLS)


def readme_blocks(text: str) -> list[Block]:
    """Fenced blocks (``` at the start of a line) in order."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        match = re.match(r"^```(.*)$", lines[i])
        if not match:
            i += 1
            continue
        words = match.group(1).split()
        start, body = i + 1, []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        blocks.append(Block(start, words[0] if words else "", tuple(words[1:]), "\n".join(body) + "\n"))
        i += 1
    return blocks


_FOR = re.compile(r"^\s*for (\w+) in ([^;]+); do (.+?);? done\s*$")


def _expand_for(line: str) -> list[str]:
    """`for X in A B; do CMD $X; done` -> [CMD A, CMD B]; other lines as they are."""
    match = _FOR.match(line)
    if not match:
        return [line]
    var, words, body = match.groups()
    return [re.sub(rf"\$\{{?{var}\}}?", word, body) for word in shlex.split(words)]


def shell_commands(code: str) -> list[list[str]]:
    """Commands of a shell block as argv lists: continuations joined, comments dropped,
    && split, one-line for loops unrolled."""
    commands = []
    lines = [cmd for line in code.replace("\\\n", " ").splitlines() for cmd in _expand_for(line)]
    for line in lines:
        argv: list[str] = []
        for token in shlex.split(line, comments=True):
            if token == "&&":
                commands.append(argv)
                argv = []
            else:
                argv.append(token)
        if argv:
            commands.append(argv)
    return commands


def _kind(argv: list[str]) -> str:
    if argv[0] == "pip" or argv[:3] == ["python", "-m", "pytest"]:
        return "skip"
    if argv[0] in ("moge", "torchrun"):
        return argv[0]
    if argv[0] in ("python", "python3") and len(argv) > 1 and argv[1].startswith("scripts/"):
        return "script"
    return "unknown"


# ---------------------------------------------------------------- cheap rewrites


def _cheap_train(args: list[str]) -> list[str]:
    """`train CONFIG OVERRIDES` made small, writing where the command as written would."""
    from moge.training.config import load_config

    config, overrides = args[1], [a for a in args[2:] if "=" in a]
    cfg = load_config(config, overrides)
    out_dir = cfg.train.out_dir or f"runs/{cfg.name}"
    return [*args, *CHEAP_TRAIN, f"train.out_dir={out_dir}"]


def cheap_moge_args(args: list[str], full: bool = FULL) -> list[str]:
    """The arguments after `moge` (or `-m moge`), made cheap unless `full`; see the
    module docstring."""
    if full or not args:
        return args
    sub = args[0]
    if sub == "train":
        return _cheap_train(args)
    if sub == "torchrun":
        i = next(i for i, a in enumerate(args) if a in ("train", "params", "eval", "generate", "simulate"))
        return [*args[:i], *cheap_moge_args(args[i:], full)]
    if sub == "eval":
        return [*args, "--batches", "1"]
    if sub == "simulate":
        return [*args, "--trials", "2"]
    if sub == "bench":
        return [*args, *CHEAP_BENCH]
    return args


def _log(argv: list[str], proc: subprocess.CompletedProcess, seconds: float) -> None:
    """Append one command's output and wall time to LOG/commands.txt."""
    assert LOG is not None
    Path(LOG).mkdir(parents=True, exist_ok=True)
    with open(Path(LOG) / "commands.txt", "a", encoding="utf-8") as f:
        f.write(f"$ {shlex.join(argv)}\n{proc.stdout}{proc.stderr}")
        f.write(f"[exit {proc.returncode} after {seconds:.0f} s]\n\n")


def _subprocess(argv: list[str], cwd: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("OMP_NUM_THREADS", "1")
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=COMMAND_SECONDS)
    if LOG:
        _log(argv, proc, time.perf_counter() - start)
    assert proc.returncode == 0, (
        f"{shlex.join(argv)} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )


def run_command(argv: list[str], cwd: Path, full: bool = FULL) -> None:
    from moge.cli import main

    kind = _kind(argv)
    if kind == "moge":
        args = cheap_moge_args(argv[1:], full)
        if args[:1] == ["torchrun"]:  # spawns ranks that import moge: run it as a process
            _subprocess([sys.executable, "-m", "moge", *args], cwd)
            return
        threads = torch.get_num_threads()
        try:
            code = main(args)
        finally:
            torch.set_num_threads(threads)
        assert code == 0, f"moge {shlex.join(args)} exited {code}"
    elif kind == "torchrun":
        i = argv.index("-m")
        assert argv[i + 1] == "moge", argv
        _subprocess([sys.executable, "-m", "torch.distributed.run", *argv[1 : i + 2],
                     *cheap_moge_args(argv[i + 2 :], full)], cwd)  # fmt: skip
    elif kind == "script":
        if full:
            _subprocess([sys.executable, str(ROOT / argv[1]), *argv[2:]], cwd)
        else:
            _script_help(ROOT / argv[1])


def _script_help(script: Path) -> None:
    """`python SCRIPT --help` in this process (no second torch import): it must exist and parse."""
    saved = sys.argv
    sys.argv = [str(script), "--help"]
    try:
        with pytest.raises(SystemExit) as exit_:
            runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = saved
    assert exit_.value.code in (0, None), f"{script} --help exited {exit_.value.code}"


# ---------------------------------------------------------------- tests


@pytest.fixture
def fresh_clone(tmp_path, monkeypatch):
    """An empty working folder with configs/ as in a checkout; the cwd during the test."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_parser_sees_blocks_flags_and_commands():
    text = "a\n```bash no-run\nx \\\n  y  # c\n```\n```python\nprint(1)\n```\n```\nraw\n```\n"
    blocks = readme_blocks(text)
    assert [(b.line, b.language, b.flags, b.runs) for b in blocks] == [
        (2, "bash", ("no-run",), False),
        (6, "python", (), True),
        (9, "", (), False),
    ]
    assert shell_commands("pip install -e . && moge train c.yaml # two\n# only a comment\n") == [
        ["pip", "install", "-e", "."],
        ["moge", "train", "c.yaml"],
    ]
    assert shell_commands(blocks[0].code) == [["x", "y"]]
    assert shell_commands("for d in a b; do moge x runs/t --domain $d runs/t-$d; done\n") == [
        ["moge", "x", "runs/t", "--domain", "a", "runs/t-a"],
        ["moge", "x", "runs/t", "--domain", "b", "runs/t-b"],
    ]


def test_every_readme_command_is_one_the_test_knows():
    """A new shell command must be runnable here or its block marked `no-run`."""
    for block in readme_blocks(README.read_text(encoding="utf-8")):
        if block.runs and block.language in SHELLS:
            for argv in shell_commands(block.code):
                assert _kind(argv) != "unknown", f"README.md:{block.line}: {shlex.join(argv)}"


def test_cheap_train_keeps_the_folder_the_command_would_use(fresh_clone):
    if FULL:
        pytest.skip("full mode runs commands as written")
    args = cheap_moge_args(["train", "configs/tiny-moge.yaml", "train.steps=50", "moe.router=global"])
    assert args[-1] == "train.out_dir=runs/tiny-moge,train.steps=50,moe.router=global"
    assert "train.steps=2" in args
    assert cheap_moge_args(["train", "tiny-moge"])[-1] == "train.out_dir=runs/tiny-moge"
    launcher = cheap_moge_args(
        ["torchrun", "--standalone", "train", "tiny-moge", "parallel.expert_parallel=2"]
    )
    assert launcher[:2] == ["torchrun", "--standalone"]
    assert launcher[-1] == "train.out_dir=runs/tiny-moge,parallel.expert_parallel=2"


def run_block(block: Block, namespace: dict, cwd: Path) -> int:
    """Run one block (see the module docstring); returns how many commands it ran."""
    if block.language == "python":
        code = compile(block.code, f"README.md:{block.line}", "exec")
        try:
            exec(code, namespace)
        except Exception as err:
            raise AssertionError(f"README.md:{block.line}: the Python block fails: {err!r}") from err
        return 1
    ran, full = 0, FULL and block.line >= FULL_FROM
    for argv in shell_commands(block.code):
        if _kind(argv) == "skip":
            continue
        try:
            run_command(argv, cwd, full)
        except AssertionError as err:
            raise AssertionError(f"README.md:{block.line}: {shlex.join(argv)}\n{err}") from err
        ran += 1
    return ran


def test_readme_runs_top_to_bottom(fresh_clone, one_thread):
    namespace: dict = {"__name__": "__readme__"}
    blocks = [b for b in readme_blocks(README.read_text(encoding="utf-8")) if b.runs]
    ran = sum(run_block(block, namespace, fresh_clone) for block in blocks)
    assert sum(b.language == "python" for b in blocks) >= 4 and ran >= 12
    assert (fresh_clone / "runs" / "tiny-moge" / "report.json").exists()
    assert "model" in namespace and "stats" in namespace  # the drop-in example ran


@pytest.mark.slow
def test_readme_shell_commands_as_written(fresh_clone):
    """Every command exactly as written (hours on 2 cores): MOGE_README_FULL=1 pytest -m slow."""
    if not FULL:
        pytest.skip("set MOGE_README_FULL=1 to run the README's commands as written")
    test_readme_runs_top_to_bottom(fresh_clone, None)


def test_full_from_runs_only_the_later_blocks_as_written(monkeypatch, tmp_path):
    """MOGE_README_FULL_FROM=N: blocks opening before line N get the cheap commands."""
    harness = sys.modules[__name__]
    seen = []
    monkeypatch.setattr(harness, "FULL", True)
    monkeypatch.setattr(harness, "FULL_FROM", 10)
    monkeypatch.setattr(harness, "run_command", lambda argv, cwd, full: seen.append((argv[1], full)))
    code = "moge train configs/tiny-moge.yaml\n"
    for line in (5, 10, 12):
        harness.run_block(Block(line, "bash", (), code), {}, tmp_path)
    assert seen == [("train", False), ("train", True), ("train", True)]
    assert "train.steps=2" in cheap_moge_args(["train", "configs/tiny-moge.yaml"], full=False)
    assert cheap_moge_args(["train", "configs/tiny-moge.yaml"], full=True) == [
        "train",
        "configs/tiny-moge.yaml",
    ]


def test_readme_log_keeps_each_process_output_and_time(monkeypatch, tmp_path):
    harness = sys.modules[__name__]
    monkeypatch.setattr(harness, "LOG", str(tmp_path / "log"))
    harness._subprocess([sys.executable, "-c", "print(42*1000+7)"], tmp_path)
    text = (tmp_path / "log" / "commands.txt").read_text()
    assert "print(42*1000+7)" in text and "\n42007\n" in text
    assert re.search(r"\[exit 0 after \d+ s\]", text)
    with pytest.raises(AssertionError, match="-> 3"):
        harness._subprocess([sys.executable, "-c", "raise SystemExit(3)"], tmp_path)
    assert text.count("[exit") == 1 and (tmp_path / "log" / "commands.txt").read_text().count("[exit 3") == 1
