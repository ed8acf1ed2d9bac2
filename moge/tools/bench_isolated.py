"""Benchmark cases in processes of their own, driven round-robin from this one.

Why: a process's oneDNN keeps the kernels it has built for each matrix shape in one
primitive cache (1,024 entries by default), and building one costs ~0.25-0.9 ms. A
model that trains alone keeps its few hundred shapes cached (tiny-moge in bf16: 797
builds in 200 steps, all but 36 in the first 20). Next to the transformers peers in
one process, whose per-expert products bring hundreds of new shapes a step, every
model's kernels are evicted and rebuilt all the time: tiny-moge's bf16 step measured
256 ms there against 208 ms without the peers and 211 ms next to them with a 16x larger
cache (AMD EPYC, AVX512-BF16, one thread), and the peers were slowed as well. A larger
cache is no default to ship: a cached bf16 kernel holds ~0.6 MB here. A process per
case gives each model what it has when it trains alone, while the driver still runs
one step of each in turn, so slow phases of a shared machine hit them all alike (only
one process computes at a time; the others wait on their pipe).

The child is `python -m moge.tools.bench_isolated`; driver and child speak JSON lines
(nothing is pickled, as everywhere in moge). RemoteCase has TrainCase's interface
(step, set_autocast, compile_model, profile_step, summary); the child builds its
case with `builder(spec)`, builder named "module:function" and spec JSON data.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
import traceback
from typing import Any

import torch
from torch import Tensor

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def _pack(t: Tensor) -> dict:
    """A token batch as JSON data."""
    return {"shape": list(t.shape), "values": t.reshape(-1).tolist()}


def _unpack(packed: dict) -> Tensor:
    return torch.tensor(packed["values"], dtype=torch.long).view(packed["shape"])


def _encode_profile(profile: dict) -> dict:
    """profile_steps' result with its (group, phase) keys as lists, for JSON."""
    return {**profile, "ms": [[g, phase, v] for (g, phase), v in profile["ms"].items()]}


def _decode_profile(profile: dict) -> dict:
    return {**profile, "ms": {(g, phase): v for g, phase, v in profile["ms"]}}


def _run(case: Any, method: str, args: list) -> Any:
    """One driver call on the child's case, arguments and result as JSON data."""
    if method == "step":
        return case.step(_unpack(args[0]), _unpack(args[1]), *args[2:])
    if method == "profile_step":
        return _encode_profile(case.profile_step(_unpack(args[0]), _unpack(args[1]), *args[2:]))
    if method == "set_autocast":
        return case.set_autocast(None if args[0] is None else _DTYPES[args[0]])
    if method == "compile_model":
        return case.compile_model(tuple(args[0]))
    if method == "summary":
        return case.summary()
    raise ValueError(f"unknown benchmark worker call {method!r}")


def serve(inp, out) -> None:
    """The child's loop: a first line {builder, spec, threads}, then one call a line,
    each answered by one line {"ok": true, "value": ...} or {"ok": false, "error": ...};
    stops at end of input."""

    def reply(ok: bool, value: Any) -> None:
        out.write(json.dumps({"ok": ok, "value" if ok else "error": value}) + "\n")
        out.flush()

    try:
        first = json.loads(inp.readline())
        torch.set_num_threads(first["threads"])
        module, name = first["builder"].split(":")
        case = getattr(importlib.import_module(module), name)(first["spec"])
        reply(True, case.name)
    except Exception:  # reported to the driver, which raises it
        reply(False, traceback.format_exc())
        return
    for line in inp:
        msg = json.loads(line)
        try:
            reply(True, _run(case, msg["method"], msg["args"]))
        except Exception:
            reply(False, traceback.format_exc())


class RemoteCase:
    """A TrainCase living in a child process (see the module docstring)."""

    def __init__(self, builder: str, spec: dict, threads: int | None = None) -> None:
        self.name = f"{builder}({spec.get('arg', '')})"
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moge.tools.bench_isolated"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        first = {"builder": builder, "spec": spec, "threads": threads or torch.get_num_threads()}
        self._send(first)
        self._started = False

    def _send(self, msg: dict) -> None:
        assert self._proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):  # the child is gone: _result says how
            self._proc.stdin.write(json.dumps(msg) + "\n")
            self._proc.stdin.flush()

    def _result(self) -> Any:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            code = self._proc.wait(10)
            raise RuntimeError(f"benchmark worker for {self.name} died (exit code {code})")
        answer = json.loads(line)
        if not answer["ok"]:
            raise RuntimeError(f"benchmark worker for {self.name} failed:\n{answer['error']}")
        return answer["value"]

    def wait_ready(self) -> None:
        """Block until the child has built its case (they start in parallel)."""
        if not self._started:
            self.name = self._result()
            self._started = True

    def _call(self, method: str, *args: Any) -> Any:
        self.wait_ready()
        self._send({"method": method, "args": list(args)})
        return self._result()

    def set_autocast(self, dtype: torch.dtype | None) -> None:
        name = next((k for k, v in _DTYPES.items() if v == dtype), None)
        assert (name is None) == (dtype is None), f"no JSON name for {dtype}"
        self._call("set_autocast", name)

    def compile_model(self, shape: tuple[int, int]) -> str | None:
        return self._call("compile_model", list(shape))

    def step(self, x_BL: Tensor, y_BL: Tensor, lr: float, grad_clip: float, record: bool) -> None:
        self._call("step", _pack(x_BL), _pack(y_BL), lr, grad_clip, record)

    def profile_step(self, x_BL: Tensor, y_BL: Tensor, lr: float, grad_clip: float) -> dict:
        return _decode_profile(self._call("profile_step", _pack(x_BL), _pack(y_BL), lr, grad_clip))

    def summary(self) -> dict:
        return self._call("summary")

    def close(self) -> None:
        """Stop the child: end of its input, then a kill if it lingers (idempotent)."""
        if self._proc.poll() is None:
            with contextlib.suppress(BrokenPipeError, OSError):  # the child may be gone already
                assert self._proc.stdin is not None
                self._proc.stdin.close()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        for pipe in (self._proc.stdin, self._proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


def _main() -> None:
    # The protocol owns the real stdout; anything else the child prints (libraries,
    # C code) goes to stderr instead of into the JSON stream.
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    serve(sys.stdin, proto)


if __name__ == "__main__":
    _main()
