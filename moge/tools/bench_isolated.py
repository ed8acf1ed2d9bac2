"""Benchmark cases in processes of their own, driven round-robin from this one.

Why: a process's oneDNN keeps the kernels it has built for each matrix shape in one
primitive cache (1,024 entries by default), and building one costs ~0.25-0.9 ms. A
model that trains alone keeps its few hundred shapes cached (tiny-moge in bf16: 797
builds in 200 steps, all but 36 in the first 20). Next to the transformers peers in
one process, whose per-expert products bring hundreds of new shapes a step, every
model's kernels are evicted and rebuilt all the time: tiny-moge's bf16 step measured
256 ms there against 208 ms without the peers and 211 ms next to them with a 16x larger
cache (AMD EPYC, AVX512-BF16, one thread), and the peers were slowed as well. A larger
cache is no default to ship: a cached bf16 kernel holds ~0.6 MB here. A process per case gives each model what it has
when it trains alone, while the driver still runs one step of each in turn, so slow
phases of a shared machine hit them all alike (only one process computes at a time;
the others wait on their pipe).

RemoteCase has TrainCase's interface (step, set_autocast, compile_attention,
profile_step, summary); `build(*args)` runs in the child and must be importable
(a module-level function) with picklable arguments. The children start by "spawn",
which imports the caller's main module again: a script that runs the benchmark needs
the `if __name__ == "__main__":` guard (scripts/bench_train.py and the CLI have it).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import traceback
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def _pack(t: Tensor) -> tuple[tuple[int, ...], list[int]]:
    """A token batch as plain Python data (no shared-memory tensors between processes)."""
    return tuple(t.shape), t.reshape(-1).tolist()


def _unpack(packed: tuple[tuple[int, ...], list[int]]) -> Tensor:
    shape, values = packed
    return torch.tensor(values, dtype=torch.long).view(shape)


def _serve(conn, build: Callable[..., Any], args: tuple, threads: int) -> None:
    """The child: build the case, then run the driver's calls until it sends None."""
    torch.set_num_threads(threads)
    try:
        case = build(*args)
        conn.send((True, case.name))
    except Exception:  # reported to the driver, which raises it
        conn.send((False, traceback.format_exc()))
        return
    while (msg := conn.recv()) is not None:
        method, call_args = msg
        try:
            if method in ("step", "profile_step"):
                call_args = (_unpack(call_args[0]), _unpack(call_args[1]), *call_args[2:])
            conn.send((True, getattr(case, method)(*call_args)))
        except Exception:
            conn.send((False, traceback.format_exc()))


class RemoteCase:
    """A TrainCase living in a child process (see the module docstring)."""

    def __init__(self, build: Callable[..., Any], args: tuple, threads: int | None = None) -> None:
        ctx = mp.get_context("spawn")  # a fresh interpreter: nothing of this process's state
        self._conn, child = ctx.Pipe()
        threads = threads or torch.get_num_threads()
        self._proc = ctx.Process(target=_serve, args=(child, build, args, threads), daemon=True)
        self._proc.start()
        child.close()
        self.name = f"{getattr(build, '__name__', 'case')}{args[1:2]}"
        self._started = False

    def _result(self) -> Any:
        try:
            ok, value = self._conn.recv()
        except EOFError:
            self._proc.join(5)
            raise RuntimeError(
                f"benchmark worker for {self.name} died (exit code {self._proc.exitcode})"
            ) from None
        if not ok:
            raise RuntimeError(f"benchmark worker for {self.name} failed:\n{value}")
        return value

    def wait_ready(self) -> None:
        """Block until the child has built its case (started in parallel with the others)."""
        if not self._started:
            self.name = self._result()
            self._started = True

    def _call(self, method: str, *args: Any) -> Any:
        self.wait_ready()
        self._conn.send((method, args))
        return self._result()

    def set_autocast(self, dtype: torch.dtype | None) -> None:
        self._call("set_autocast", dtype)

    def compile_attention(self, shape: tuple[int, int]) -> str | None:
        return self._call("compile_attention", shape)

    def step(self, x_BL: Tensor, y_BL: Tensor, lr: float, grad_clip: float, record: bool) -> None:
        self._call("step", _pack(x_BL), _pack(y_BL), lr, grad_clip, record)

    def profile_step(self, x_BL: Tensor, y_BL: Tensor, lr: float, grad_clip: float) -> dict:
        return self._call("profile_step", _pack(x_BL), _pack(y_BL), lr, grad_clip)

    def summary(self) -> dict:
        return self._call("summary")

    def close(self) -> None:
        """Stop the child (idempotent)."""
        if self._proc.is_alive():
            with contextlib.suppress(BrokenPipeError, OSError):  # the child may be gone already
                self._conn.send(None)
            self._proc.join(10)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join()
        self._conn.close()
