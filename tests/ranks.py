"""Run a function on W gloo ranks (forked processes) and fail the test if they hang."""

from __future__ import annotations

import time

import pytest
import torch.multiprocessing as tmp


def run_ranks(fn, world: int, *args, timeout: float = 120.0, what: str | None = None) -> None:
    """fn(rank, world, *args) on `world` forked processes; a rank's exception fails the
    test (torch re-raises it here); all ranks are killed when they outlive `timeout`."""
    procs = tmp.start_processes(fn, args=(world, *args), nprocs=world, join=False, start_method="fork")
    deadline = time.monotonic() + timeout
    while not procs.join(timeout=1):
        if time.monotonic() > deadline:
            for p in procs.processes:
                p.kill()
            pytest.fail(what or f"{world} ranks did not finish in {timeout:.0f} s (a collective hung?)")
