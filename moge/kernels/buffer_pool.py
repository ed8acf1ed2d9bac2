"""Reused CPU memory for the fused path's saved activations.

Legend: none (flat buffers; callers view them as [rows, cols]).

Why: the fused path saves the pre-activations of every call for its backward ([P, 2F]
and [P, F], megabytes at the toy shapes), and P changes with the routing, call after
call. On CPU such allocations are fresh memory maps (glibc's mmap threshold follows the
sizes it has freed, and these grow and shrink), so the first write to every 4 KiB page
faults: at tiny-moge's shape about 2,900-4,200 page faults a training step in bf16 and
3,700-9,400 in float32 (docs/performance.md). A layer whose backward hands the
memory back, for its next forward to write into, faults no more.

The pool holds only memory given back by a finished backward. A forward takes it out
(the pool then holds nothing of it): a call whose backward never runs (a graph dropped,
the first run of activation checkpointing, which discards what it saved) lets its
memory go as a fresh allocation would. A recompute (a forward inside a backward) does
not pool at all (pooling_applies), so checkpointing keeps its memory savings; without
it, the pooled memory is what a step's forward would allocate anyway (the same peak). A buffer given back while
something still holds it (a retained graph, a view kept elsewhere) is not handed out
until that is gone: the storage's reference count says so. On other devices (CUDA's
caching allocator already reuses memory) the pool is not used.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

# Room for the routing's variation: a new buffer holds this much more than asked for,
# so the next calls' slightly larger layouts (more padding rows) still fit.
GROWTH = 1.0625


def _storage_refs(t: Tensor) -> int:
    """References to t's memory: tensors and views sharing it, autograd's saved ones
    (less the temporary one this query makes)."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata) - 1


def pooling_applies(device: torch.device) -> bool:
    """Whether a forward here should take from (and its backward give to) a pool: on the
    CPU, and not inside a backward. A forward inside a backward is activation
    checkpointing's recompute, whose activations would otherwise be freed one layer
    after another during that backward; given back, they would all be held until the
    next step, raising its peak (measured: 45 -> 130 MB at tiny-moge's shape)."""
    return device.type == "cpu" and torch._C._current_graph_task_id() == -1


class BufferPool:
    """Flat buffers given back by finished backwards, at most `max_buffers` of them
    (the largest; a call takes two).

    take(rows, cols, dtype, device) -> an uninitialised [rows, cols] view: of a free
    buffer large enough (which leaves the pool), or of a new one GROWTH times larger;
    None off the CPU (the caller allocates as usual). give(*views) takes back the
    buffers under views that take lent (any other tensor is left alone).
    """

    def __init__(self, max_buffers: int = 4) -> None:
        self.max_buffers = max_buffers
        self._free: list[Tensor] = []
        # What take handed out and is still alive: only these come back. A backward under
        # activation checkpointing reads recomputed activations, not the ones its forward
        # took (those were dropped); given back, they would be held until the next step.
        self._lent: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary()

    def take(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> Tensor | None:
        if device.type != "cpu":
            return None
        n = rows * cols
        fits = [
            b for b in self._free if b.dtype == dtype and b.device == device and b.numel() >= n
        ]  # the smallest that fits: a call's [P, F] buffer must not take its [P, 2F] one
        for b in sorted(fits, key=Tensor.numel):
            if _storage_refs(b) == 1:
                self._free = [f for f in self._free if f is not b]
                return self._lend(b, n, rows, cols)
        return self._lend(torch.empty(int(n * GROWTH) + 1, dtype=dtype, device=device), n, rows, cols)

    def _lend(self, base: Tensor, n: int, rows: int, cols: int) -> Tensor:
        self._lent[id(base)] = base
        return base[:n].view(rows, cols)

    def give(self, *views: Tensor | None) -> None:
        for v in views:
            if v is None or v.device.type != "cpu":
                continue
            base = v if v._base is None else v._base
            if self._lent.get(id(base)) is base:
                del self._lent[id(base)]
                self._free.append(base)
        if len(self._free) > self.max_buffers:  # keep the largest: outgrown ones go
            self._free = sorted(self._free, key=Tensor.numel)[len(self._free) - self.max_buffers :]

    def clear(self) -> None:
        """Lets go of every buffer (a layer going to eval mode, where nothing is saved);
        those lent out now are not taken back."""
        self._free, self._lent = [], weakref.WeakValueDictionary()

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._free)

    # A copied or pickled layer starts with an empty pool, not with copies of its memory.
    def __getstate__(self) -> dict:
        return {"max_buffers": self.max_buffers}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_buffers"])  # type: ignore[misc]


def release_pools(module: nn.Module) -> None:
    """Empty every activation pool in module (its GroupedExperts' activation_pool): frees
    the memory kept between training calls. Benchmarks call it so that a measured call
    allocates its saved activations as a first call does."""
    for m in module.modules():
        pool = getattr(m, "activation_pool", None)
        if isinstance(pool, BufferPool):
            pool.clear()
