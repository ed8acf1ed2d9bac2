"""Activation checkpointing that counts each token once.

`torch.utils.checkpoint` (non-reentrant) runs a block's forward a second time during
backward. A MoGE layer's forward has side effects: it adds its load to the step's
counts (the aux-loss-free bias and the global-batch loss read them) and counts the
call. A naive recompute would count every token twice and, for the global-batch loss,
recompute its gradient from doubled counts (torchtitan met this). `checkpoint_block`
tells every MoGE layer inside which run it is: the first run counts and remembers the
counts it used, the recompute counts nothing and replays them. The counts wait in a
queue of that one checkpointed call (held by its recompute), so a recompute replays its
own call's counts whatever order the backwards run in (two calls under one backward, a
call never backpropagated) and nothing is left behind when a graph is dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moge.layer import MoGELayer


@contextmanager
def _phase(layers: list[MoGELayer], phase: str, queues: list[list[tuple[Tensor, int]]]) -> Iterator[None]:
    """Run `phase` of one checkpointed call: each layer reads and writes that call's queue."""
    saved = [(layer.recompute_phase, layer._replay_counts) for layer in layers]
    for layer, queue in zip(layers, queues, strict=True):
        layer.recompute_phase, layer._replay_counts = phase, queue
    try:
        yield
    finally:
        for layer, (was_phase, was_queue) in zip(layers, saved, strict=True):
            layer.recompute_phase, layer._replay_counts = was_phase, was_queue


def checkpoint_block(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """block(*args, **kwargs) under non-reentrant activation checkpointing.

    Only the block's inputs are kept for backward; its activations are recomputed.
    Meant for training with gradients on; a call whose backward never runs still
    counts its tokens (as without checkpointing), and its queued counts go with its graph.
    """
    layers = [m for m in block.modules() if isinstance(m, MoGELayer)]

    def contexts() -> tuple[Any, Any]:
        # Called once per checkpointed call: its forward fills these queues, its recompute
        # (which may run after other calls' recomputes, or never) empties them.
        queues: list[list[tuple[Tensor, int]]] = [[] for _ in layers]
        return _phase(layers, "forward", queues), _phase(layers, "recompute", queues)

    fn: Callable[..., Any] = block
    return checkpoint(fn, *args, use_reentrant=False, context_fn=contexts, **kwargs)
