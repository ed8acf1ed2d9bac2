"""NaN/Inf guards of the training loop: where a non-finite loss or gradient comes from,
and every rank stopping together when one rank sees it."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moge.distributed.agree import failed_ranks, mark
from moge.distributed.mesh import World
from moge.distributed.parallelize import local
from moge.layer import MoGELayer
from moge.model import Block, ModelOutput, MoGETransformer


class NonFiniteLossError(RuntimeError):
    """The loss or the gradients went NaN/Inf; the message names the step and the layer."""


def moe_blocks(model: MoGETransformer) -> list[int]:
    """Block index of every MoE layer, in depth order (the "layer" of metrics and errors)."""
    return [b.index for b in model.blocks if isinstance(b, Block) and isinstance(b.ffn, MoGELayer)]


def _first_nonfinite(out: ModelOutput, model: MoGETransformer) -> str:
    """Where the non-finite loss first shows up, in depth order."""
    for index, routed in zip(moe_blocks(model), out.routing):
        parts = (
            ("router scores", routed.scores),
            ("aux loss", routed.aux_loss),
            ("hidden output", routed.hidden),
        )
        for what, t in parts:
            if not bool(torch.isfinite(t).all()):
                return f"layer {index} (MoE): non-finite {what}"
    if not bool(torch.isfinite(out.logits).all()):
        return "the logits (every MoE layer's router and output are finite)"
    return "the loss (the logits are finite)"


def _nonfinite_loss_error(step: int, out: ModelOutput, model: MoGETransformer) -> NonFiniteLossError:
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(local(p)).all())]
    hint = f"; non-finite parameters: {', '.join(bad[:4])}" if bad else ""
    assert out.loss is not None, "a training step computes the loss (targets given)"
    return NonFiniteLossError(
        f"step {step}: the loss is {out.loss.item()} at {_first_nonfinite(out, model)}{hint}; "
        "try a lower train.lr or train.grad_clip > 0 (nothing is saved after it: the last checkpoint written, if any, is kept)"
    )


def stop_together(world: World, mine: NonFiniteLossError | None, what: str) -> None:
    """Every rank raises: this rank's own error if it has one (reported by the lowest
    such rank), else a NonFiniteLossError naming the rank that saw it (a collective)."""
    if world.size == 1:
        raise (
            mine
            if mine is not None
            else NonFiniteLossError(
                f"{what} (nothing is saved after it: the last checkpoint written, if any, is kept)"
            )
        )
    kinds = failed_ranks(world, mine)
    first = next((r for r, k in enumerate(kinds) if k), 0)  # none: the sum overflowed; rank 0 says so
    if mine is not None:
        raise mark(mine, world.rank == first)
    where = f"on rank {first}" if kinds[first] else "in the sum over the ranks"
    raise mark(
        NonFiniteLossError(
            f"{what} {where} (nothing is saved after it: the last checkpoint written, if any, is kept)"
        ),
        world.rank == first,
    )


def global_losses(step: int, out: ModelOutput, model: MoGETransformer, world: World) -> Tensor:
    """(loss, lm_loss, aux_loss) summed over the ranks; a non-finite one stops every rank.

    Runs before backward, whose exchanges need every rank.
    """
    assert out.loss is not None and out.lm_loss is not None, (
        "a training step computes the loss (targets given)"
    )
    local_3 = torch.stack([out.loss.detach(), out.lm_loss.detach(), out.aux_loss.detach()]).double()
    total_3 = world.all_reduce(local_3.clone())
    if bool(torch.isfinite(total_3).all()):
        return total_3
    mine = None if bool(torch.isfinite(local_3).all()) else _nonfinite_loss_error(step, out, model)
    stop_together(world, mine, f"step {step}: the loss is not finite")
    raise AssertionError("unreachable")


def nonfinite_grads(step: int, model: nn.Module, world: World) -> None:
    """Raise on every rank: the gradient norm is not finite; names this rank's culprits."""
    bad = [
        n
        for n, p in model.named_parameters()
        if p.grad is not None and not bool(torch.isfinite(local(p.grad)).all())
    ]
    mine = None
    if bad:
        where = f" on rank {world.rank}" if world.size > 1 else ""
        mine = NonFiniteLossError(
            f"step {step}: the gradient norm is not finite; non-finite gradients in {len(bad)} "
            f"parameter(s){where}: {', '.join(bad[:4])} (nothing is saved after it: the last checkpoint written, if any, is kept)"
        )
    stop_together(world, mine, f"step {step}: the gradient norm is not finite")


def check_weights(step: int, model: nn.Module) -> None:
    """Never write a checkpoint that holds NaN/Inf: it would replace a good one.

    Checks this rank's shards only (no collective)."""
    for name, t in model.state_dict().items():
        t = local(t)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise NonFiniteLossError(f"step {step}: {name} holds NaN/Inf; no checkpoint written")
