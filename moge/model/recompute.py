"""Activation checkpointing that counts each token once.

`torch.utils.checkpoint` (non-reentrant) runs a block's forward a second time during
backward. A MoGE layer's forward has side effects: it adds its load to the step's
counts (the aux-loss-free bias and the global-batch loss read them) and counts the
call. A naive recompute would count every token twice and, for the global-batch loss,
recompute its gradient from doubled counts (torchtitan met this). `checkpoint_block`
tells every MoGE layer inside which run it is: the first run counts and remembers the
counts it used, the recompute counts nothing and replays them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint

from moge.layer import MoGELayer


@contextmanager
def _phase(layers: list[MoGELayer], phase: str) -> Iterator[None]:
    for layer in layers:
        layer.recompute_phase = phase
    try:
        yield
    finally:
        for layer in layers:
            layer.recompute_phase = None


def checkpoint_block(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """block(*args, **kwargs) under non-reentrant activation checkpointing.

    Only the block's inputs are kept for backward; its activations are recomputed.
    Call it only where a backward will follow (training with gradients on): a
    recompute that never runs leaves its counts queued until the layer's end_step().
    """
    layers = [m for m in block.modules() if isinstance(m, MoGELayer)]

    def contexts() -> tuple[Any, Any]:
        return _phase(layers, "forward"), _phase(layers, "recompute")

    fn: Callable[..., Any] = block
    return checkpoint(fn, *args, use_reentrant=False, context_fn=contexts, **kwargs)
