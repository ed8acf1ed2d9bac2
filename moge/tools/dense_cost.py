"""Routed experts that cost what a dense FFN of their activated width costs: the
model-level bound of any routed-experts kernel (`bench_train.py --bound`).

Legend: T tokens, D d_model, K experts per token, F expert hidden.

A perfect grouped kernel would run the routed experts' K*F-wide SwiGLU per token at a
dense SwiGLU's speed, with dispatch, gating and combine free. This stand-in does exactly
that work: one dense SwiGLU of width K*F on every token, ignoring the routing. Its output
is not the MoE's, so a model with it trains a different function; it is a timing bound
only. Everything else stays as in the real model: the router, its losses and the gates'
backward, the shared experts, and the routed experts' weights with gradients (zeros of
their size), so AdamW, clipping and zero_grad see the same parameters as they do in moge.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moge.experts import GroupedExperts, SwiGLU
from moge.layer import MoGELayer


class _ZeroGradients(torch.autograd.Function):
    """(x_TD, *tensors) -> x_TD unchanged; backward gives every other input a zero
    gradient of its own shape and dtype, as if the stand-in had used them."""

    @staticmethod
    def forward(ctx, x_TD: Tensor, *tensors: Tensor) -> Tensor:
        ctx.specs = [(t.shape, t.dtype, t.device) for t in tensors]
        return x_TD.view_as(x_TD)

    @staticmethod
    def backward(ctx, g_TD: Tensor):
        zeros = [torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.specs]
        return (g_TD, *zeros)


class DenseCostExperts(nn.Module):
    """In place of a MoGELayer's `experts`: one dense SwiGLU of width K*F on every token.

    experts: the routed experts it replaces (kept as a child, so their weights stay
    parameters and get zero gradients); top_k: K. Called as the experts are,
    (x_TD [T, D], ids_TK [T, K], weights_TK [T, K], dtype) -> [T, D] in `dtype`; the ids
    are ignored, the gates get a zero gradient.
    """

    def __init__(
        self, experts: GroupedExperts, d_model: int, hidden: int, top_k: int, init_std: float
    ) -> None:
        super().__init__()
        self.routed = experts
        self.dense = SwiGLU(d_model, top_k * hidden, init_std=init_std)

    @property
    def w_gate_up_EDH(self) -> Tensor:
        """The replaced experts' weight: MoGELayer checks x's dtype against it."""
        return self.routed.w_gate_up_EDH

    def forward(self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor, dtype: torch.dtype) -> Tensor:
        x_TD = _ZeroGradients.apply(x_TD, weights_TK, *self.routed.parameters())
        return self.dense(x_TD.to(dtype))


def with_dense_cost_experts(model: nn.Module, init_std: float) -> int:
    """Swap every MoGELayer's routed experts in `model` for a DenseCostExperts; returns
    how many were swapped. Build the optimiser afterwards: the stand-ins add parameters."""
    layers = [m for m in model.modules() if isinstance(m, MoGELayer)]
    for layer in layers:
        c = layer.config
        # A timing stand-in where the layer expects GroupedExperts: it is called the same way.
        layer.experts = DenseCostExperts(layer.experts, c.d_model, c.expert_hidden, c.top_k, init_std)  # type: ignore[assignment]
    return len(layers)
