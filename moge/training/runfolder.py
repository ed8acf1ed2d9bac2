"""Run-folder safety for `moge train`: one run per folder, nothing lost on resume, SIGTERM.

- `RunLock`: an exclusive `fcntl.flock` on `<out_dir>/.lock`, held for the life of the run;
  the holder's pid is written into the file so a second run can name it. The kernel drops
  the lock when its holder dies, so a lock file left by a killed run (a stale pid) never
  blocks anything; the next run takes it over and says so.
- `read_metrics` / `rewrite_metrics`: metrics.jsonl is cut back to the resumed step by
  writing a temporary file, fsyncing it and renaming it over the old one, so a kill at any
  moment leaves either the old or the new log.
- `optimizer_settings` / `reapply_optimizer_settings`: a resume applies the config's
  optimizer settings (weight_decay, betas, eps) over the saved ones and reports each change.
- `StopOnSigterm`: SIGTERM (what schedulers send before SIGKILL) sets a flag the loop reads
  between steps: the step in flight finishes, a checkpoint of it is written, and the run
  stops with `Terminated`. A second SIGTERM abandons the step at once (the last checkpoint
  is kept either way).

Nothing here imports the trainer or the checkpoints; they call these functions (where to
resume is `moge.training.checkpoint.resume_point`).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from moge.training.durable import write_atomic

LOCK_NAME = ".lock"

try:  # POSIX only; elsewhere runs are not locked (documented in docs/reliability.md)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class RunFolderBusy(ValueError):
    """Another live process holds the run folder's lock."""


class Terminated(KeyboardInterrupt):
    """SIGTERM stopped the run; the message says which checkpoint is kept and how to resume."""


# ---------------------------------------------------------------- the lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _read_pid(path: Path) -> int | None:
    try:
        with open(path, "rb") as f:
            text = f.read(32).decode("ascii").strip()
        return int(text) if text.isdigit() and 0 < int(text) < 2**31 else None
    except (OSError, UnicodeDecodeError, ValueError):
        return None


class RunLock:
    """Exclusive lock on a run folder for the life of a run (a context manager).

    `acquire` creates the folder if needed; `release` removes the folder again when this
    lock created it and nothing but the lock file is in it (a run that failed before
    writing anything leaves no trace).
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self.fd: int | None = None
        self.created = False
        self.stale_pid: int | None = None  # a dead run's pid found in the lock file

    def acquire(self) -> RunLock:
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ValueError(f"train.out_dir: {self.out_dir} exists and is not a folder")
        self.created = not self.out_dir.exists()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                pid = _read_pid(self.path)
                who = f"pid {pid}" if pid is not None else "another process"
                raise RunFolderBusy(
                    f"train.out_dir: {self.out_dir} is in use by another run ({who} holds "
                    f"{self.path}); wait for it to finish or set train.out_dir to another folder"
                ) from None
            # A releasing run may have unlinked the file between our open and flock: retry.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        old = _read_pid(self.path)
        if old is not None and old != os.getpid() and not _pid_alive(old):
            self.stale_pid = old
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if self.created and [p.name for p in self.out_dir.iterdir()] == [LOCK_NAME]:
                self.path.unlink(missing_ok=True)  # still locked: no one can have taken it
                self.out_dir.rmdir()
            else:
                os.ftruncate(self.fd, 0)  # a pid is left behind only by a run that was killed
        except OSError:
            pass
        finally:
            os.close(self.fd)  # drops the flock
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def holds_a_run(out_dir: Path) -> bool:
    """Whether out_dir has anything in it besides the lock file."""
    return out_dir.is_dir() and any(p.name != LOCK_NAME for p in out_dir.iterdir())


# ---------------------------------------------------------------- metrics.jsonl


def read_metrics(path: Path, upto: int) -> list[dict]:
    """Records of a previous attempt up to step `upto`; later ones and torn lines are dropped.

    A torn last line (a kill mid-write) is plain ASCII (json.dumps escapes the rest), so
    bytes that are not UTF-8 mean damage: ValueError naming the file and line.
    """
    if not path.exists():
        return []
    if not path.is_file():
        raise ValueError(f"{path}: not a regular file")
    records = []
    for number, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(
                f"{path}: line {number} is not UTF-8 (the log is damaged); move the file away to resume"
            ) from None
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and type(rec.get("step")) is int and rec["step"] <= upto:
            records.append(rec)
    return records


def rewrite_metrics(path: Path, records: Iterable[dict]) -> None:
    """Atomically replace metrics.jsonl by `records` (temp file, fsync, rename, fsync dir)."""
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in records).encode("utf-8"))


def append_record(f: TextIO, rec: dict) -> None:
    """One JSON line appended to an open metrics.jsonl; a write error names the file."""
    try:
        f.write(json.dumps(rec) + "\n")
        f.flush()
    except OSError as err:  # e.g. a full disk mid-run: the checkpoints are untouched
        raise OSError(f"{f.name}: writing a metrics record failed ({err.strerror or err})") from err


# ---------------------------------------------------------------- optimizer settings on resume

_NOT_SETTINGS = ("params", "lr", "initial_lr")
# How the update runs, not what it computes: the trainer picks fused AdamW for plain tensors
# and the per-tensor loop for DTensors, so a resume on another world size may switch them.
_KERNEL_CHOICES = ("fused", "foreach", "capturable", "differentiable")


def optimizer_settings(optimizer: Any) -> list[dict]:
    """Hyperparameters of every param group except the params and the scheduled lr."""
    return [{k: v for k, v in g.items() if k not in _NOT_SETTINGS} for g in optimizer.param_groups]


def reapply_optimizer_settings(optimizer: Any, wanted: list[dict]) -> list[str]:
    """Set each group's settings back to `wanted` (the config's) after a checkpoint loaded.

    Returns one "group i key: saved -> now" line per change. A change of a non-numeric
    setting (e.g. amsgrad, which needs state the checkpoint lacks) is refused.
    """
    if len(wanted) != len(optimizer.param_groups):
        raise ValueError(
            f"optimizer: {len(optimizer.param_groups)} saved param groups, the config builds {len(wanted)}"
        )
    changes = []
    for i, (group, want) in enumerate(zip(optimizer.param_groups, wanted)):
        for key, value in want.items():
            saved = group.get(key)
            if key in _KERNEL_CHOICES:
                group[key] = value  # this process's choice, silently: the arithmetic is the same
                continue
            if isinstance(saved, list):
                saved = tuple(saved)
            if saved == value:
                continue
            numeric = all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in _flat(value, saved)
            )
            if not numeric:
                raise ValueError(
                    f"optimizer: param group {i} setting {key!r} was {saved!r} in the checkpoint and is "
                    f"{value!r} now; it cannot change on resume (use another train.out_dir)"
                )
            group[key] = value
            changes.append(f"group {i} {key}: {saved} -> {value}")
    return changes


def _flat(*values: Any) -> list:
    out: list = []
    for v in values:
        out.extend(v if isinstance(v, (tuple, list)) else [v])
    return out


# ---------------------------------------------------------------- SIGTERM


class StopOnSigterm:
    """While active (main thread only), SIGTERM asks the loop to stop after the current step.

    `requested` is read by the loop between steps; a second SIGTERM raises `Terminated`
    at once. The previous handler is restored on exit.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._active = False

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested:
            raise Terminated(
                "terminated (second SIGTERM): the step in flight was abandoned; the last checkpoint is "
                "kept; continue with train.resume=true"
            )
        self.requested = True

    def __enter__(self) -> StopOnSigterm:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._active = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._active:
            signal.signal(signal.SIGTERM, self._previous)
            self._active = False

    def stop_if_requested(self, step: int, out_dir: Path) -> None:
        """Raise Terminated after step `step` (whose checkpoint the caller has written)."""
        if self.requested:
            raise Terminated(
                f"terminated (SIGTERM) after step {step}; its checkpoint is in {out_dir}; "
                "continue with train.resume=true"
            )
