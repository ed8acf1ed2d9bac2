"""The MoGE layer as a drop-in MLP for any model, and helpers that find every MoGE layer.

`MoGELayer` returns a typed `MoGEOutput`, which cannot stand where an MLP stands
(`nn.Sequential`, a Hugging Face-style block that expects a tensor). `MoGEMLP` is the same
layer returning the tensor; it keeps what the call produced for collection:

    loss = task_loss + moge.aux_loss(model)   # every layer's pending aux losses, then cleared
    loss.backward(); optimizer.step()
    moge.end_step(model)                      # bias update + counter reset, every layer
    moge.routing_stats(model)                 # {module name: RoutingStats of its last call}

The helpers walk `model.named_modules()`, so they work on any nn.Module and find both
MoGEMLP and MoGELayer (a typed MoGELayer hands its losses back in its output instead,
so `aux_loss` collects nothing from it).

Legend: T tokens, D d_model, E experts, K experts per token.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moge import balance
from moge.layer import EndStepWarning, MoGEConfig, MoGELayer, MoGEOutput, total_aux_loss


@dataclass
class LastRouting:
    """What a MoGEMLP's last call routed (detached, for statistics)."""

    expert_ids: Tensor  # [T, K] int64
    scores: Tensor  # [T, E] float32 router scores
    load: Tensor  # [E] int64 token-slots per expert
    lb_loss: Tensor  # 0-dim, unweighted balance loss
    z_loss: Tensor  # 0-dim, unweighted router z-loss
    token_mask: Tensor | None = None  # [T] bool, False: padding (left out of the statistics)
    dropped: Tensor | None = None  # [E] slots dropped by the capacity (None: dropless)


class MoGEMLP(MoGELayer):
    """A MoGELayer whose forward returns the output tensor (x's shape), like an MLP.

    In training mode with gradients on, every call appends its output (aux loss,
    scores, z-loss, with their graphs) to `pending_aux_losses`; `moge.aux_loss(model)`
    sums and clears them, and `end_step()` clears what was not collected. `last` holds
    the last call's routing (any mode, detached) for `moge.routing_stats`.
    """

    def __init__(self, config) -> None:
        super().__init__(config)
        self.pending_aux_losses: list[MoGEOutput] = []
        self.last: LastRouting | None = None

    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        token_ids: Tensor | None = None,
        domain_ids: Tensor | None = None,
        *,
        mask: Tensor | None = None,
    ) -> Tensor:
        """x [..., D] (token_ids [...] for router="random"; domain_ids [...] with
        rre_domain_groups; mask [...]: see MoGELayer) -> [..., D]."""
        out = super().forward(x, token_ids, domain_ids, mask=mask)
        # An activation-checkpointing recompute (moge.model.recompute) must not queue the loss twice.
        if self.training and torch.is_grad_enabled() and self.recompute_phase != "recompute":
            self.pending_aux_losses.append(out)
            if len(self.pending_aux_losses) == self.END_STEP_WARN_CALLS:
                warnings.warn(
                    f"MoGEMLP: {len(self.pending_aux_losses)} aux losses were never collected (each holds "
                    "its graph): add moge.aux_loss(model) to your loss and call moge.end_step(model) "
                    "once per optimizer step.",
                    EndStepWarning,
                    stacklevel=3,
                )
        self.last = LastRouting(
            out.expert_ids.detach(), out.scores.detach(), out.load.detach(),
            out.lb_loss.detach(), out.z_loss.detach(), out.token_mask, out.dropped,
        )  # fmt: skip
        return out.hidden

    def __getstate__(self) -> dict:
        # A copy (copy.deepcopy, pickle, torch.optim.swa_utils.AveragedModel) takes the layer,
        # not the pending outputs of calls it did not make: they hold autograd graphs, which
        # cannot be copied, and their losses belong to the original's step.
        return {**super().__getstate__(), "pending_aux_losses": []}

    def collect_pending(self) -> list[MoGEOutput]:
        """The pending outputs (see the class docstring); clears them."""
        pending, self.pending_aux_losses = self.pending_aux_losses, []
        return pending

    def end_step(self) -> None:
        self.pending_aux_losses = []
        super().end_step()


def moge_layers(model: nn.Module) -> list[tuple[str, MoGELayer]]:
    """Every MoGE layer in `model` (itself included), as (qualified name, layer)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoGELayer)]


def aux_loss(model: nn.Module) -> Tensor:
    """Sum of the aux losses every MoGEMLP in `model` produced since the last collection.

    Add it to your loss before backward. Layers with aux_loss_type="released" are pooled
    into one loss over all their rows, as in the released code (layer.total_aux_loss);
    released layers of different experts, top_k or coefficients pool apart. Returns a
    0-dim float32 tensor (0 when nothing is pending: eval mode, no_grad, or no MoGEMLP).
    Raises ValueError if `model` holds no MoGE layer at all (a likely mistake).
    """
    layers = moge_layers(model)
    if not layers:
        raise ValueError(f"model: no MoGE layer found in {type(model).__name__}")
    parts = []
    # Released-loss layers pool their rows, as in the released code; layers whose settings
    # differ (experts, top_k, coefficients) cannot share one loss, so each kind pools apart.
    released: dict[tuple, tuple[MoGEConfig, list[MoGEOutput]]] = {}
    for _, m in layers:
        if not isinstance(m, MoGEMLP):
            continue
        pending = m.collect_pending()
        c = m.config
        if c.aux_loss_type == "released":
            key = (c.num_experts, c.top_k, c.aux_loss_coef, c.z_loss_coef)
            released.setdefault(key, (c, []))[1].extend(pending)
        else:
            parts += [o.aux_loss for o in pending]
    parts += [total_aux_loss(outs, c) for c, outs in released.values() if outs]
    if not parts:
        return layers[0][1].router.weight.new_zeros((), dtype=torch.float32)
    return torch.stack([p.float() for p in parts]).sum()


@contextmanager
def counting_pass(model: nn.Module) -> Iterator[None]:
    """Count a step's routing before training on it: aux_loss_type="global_batch" exact.

    Under gradient accumulation a micro-batch's forward cannot know the counts of the
    micro-batches after it. Run them all once inside this block (forwards only, under
    no_grad; the same micro-batches, in training mode, on every rank); every MoGE layer
    then holds the whole step's counts, and in the training pass each micro-batch's
    global-batch loss uses them: the step's loss and gradients are one call's on the
    whole batch. Costs one forward per step. The training pass counts nothing (the bias
    update and statistics read the counting pass's counts) and may not run more calls
    than were counted; end_step() warns (CountingPassWarning) if it routed otherwise.

        with moge.counting_pass(model):
            for x in micro_batches:
                model(x)
        for x in micro_batches:
            (loss_of(model(x)) / len(micro_batches)).backward()
        optimizer.step(); moge.end_step(model)
    """
    layers = [layer for _, layer in moge_layers(model)]
    if not layers:
        raise ValueError(f"model: no MoGE layer found in {type(model).__name__}")
    for layer in layers:
        layer.begin_counting_pass()
    with torch.no_grad():
        yield
    for layer in layers:
        layer.end_counting_pass()


def end_step(model: nn.Module) -> int:
    """Call end_step() on every MoGE layer in `model` (once per optimizer step).

    Returns how many layers it reached (0 means none was found).
    """
    layers = moge_layers(model)
    for _, layer in layers:
        layer.end_step()
    return len(layers)


def routing_stats(model: nn.Module) -> dict[str, balance.RoutingStats]:
    """{qualified name: RoutingStats of its last call} for every MoGEMLP that has run."""
    out = {}
    for name, layer in moge_layers(model):
        last = getattr(layer, "last", None)
        if last is not None:
            c = layer.config
            out[name] = balance.routing_stats(
                last.expert_ids,
                c.num_experts,
                c.num_groups,
                last.scores,
                mask=last.token_mask,
                dropped=last.dropped,
            )
    return out
