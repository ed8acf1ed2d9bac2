"""Probes of what a piece of code allocates, for the memory tests.

LargestAllocation: the largest storage any op returns on a real (non-meta) device, seen
through a TorchDispatchMode (a DTensor's local part counts, not its global shape).
allocator_use: the CPU allocator's peak (and end) over a call, from torch.profiler's memory
events (every allocation and free the c10 CPU allocator reports).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _storage(t: object) -> torch.UntypedStorage | None:
    if isinstance(t, DTensor):
        t = t.to_local()
    return t.untyped_storage() if isinstance(t, torch.Tensor) and not t.is_meta else None


class LargestAllocation(TorchDispatchMode):
    """Records `largest` (bytes) and its op while active; an output sharing an input's
    storage (a view, an in-place op) is no allocation."""

    def __init__(self) -> None:
        super().__init__()
        self.largest, self.op = 0, ""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {s.data_ptr() for s in map(_storage, tree_leaves((args, kwargs))) if s is not None}
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            storage = _storage(t)
            if storage is not None and storage.data_ptr() not in inputs and storage.nbytes() > self.largest:
                piece = t.to_local() if isinstance(t, DTensor) else t
                self.largest, self.op = storage.nbytes(), f"{func} -> {tuple(piece.shape)}"
        return out


def _walk(nodes):
    for node in nodes:
        yield node
        yield from _walk(node.children)


@dataclass(frozen=True)
class AllocatorUse:
    """Bytes the CPU allocator held above the start of a call: at its peak and at its end."""

    peak: int
    end: int


def allocator_use(fn: Callable[[], object]) -> AllocatorUse:
    """What the CPU allocator held above the start while fn() ran (memory allocated before
    and freed during fn counts below the start). fn's return value is still alive at the
    end (it is dropped after)."""
    from torch._C._profiler import _EventType  # the profiler's event tree (private, stable for years)

    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        kept = fn()
    tree = prof.profiler.kineto_results.experimental_event_tree()
    events = sorted((n for n in _walk(tree) if n.tag == _EventType.Allocation), key=lambda n: n.start_time_ns)
    live = peak = 0
    for event in events:
        live += event.extra_fields.alloc_size
        peak = max(peak, live)
    del kept
    return AllocatorUse(peak, live)
