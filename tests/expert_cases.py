"""Tiny expert cases shared by tests/test_experts.py and tests/test_fused*.py."""

import torch
from reference import reference_experts

from moge.experts import GroupedExperts

# (pad_rows, experts_per_chunk, max_pad_waste): per-expert mm; chunks of 3 experts run
# one mm each; chunks forced to one bmm (any waste accepted); the same padded to 8 rows.
LAYOUTS = [(1, 1, 0.0), (1, 3, 0.0), (1, 6, 100.0), (8, 3, 0.0), (8, 6, 100.0), (8, 2, 100.0)]
# The same cut into token blocks of a few tokens (tiny chunk_bytes), and a short last chunk.
BLOCKED = [(1, 3, 0.0, 768), (1, 6, 100.0, 768), (8, 3, 100.0, 768), (1, 4, 0.0, 768), (8, 4, 100.0, 512)]


def case(T=29, D=12, Fh=8, E=6, K=3, seed=0, dtype=torch.float32, skip_expert=None):
    """(x [T, D], ids [T, K] distinct per token, gates [T, K], GroupedExperts) with fixed seeds."""
    torch.manual_seed(seed)  # for the weight init
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=gen).to(dtype)
    if skip_expert is None:
        ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]).reshape(T, K)
    else:  # draw from the other E-1 experts, so `skip_expert` gets no token
        ids = torch.stack([torch.randperm(E - 1, generator=gen)[:K] for _ in range(T)]).reshape(T, K)
        ids = ids + (ids >= skip_expert).long()
    w = torch.rand(T, K, generator=gen)
    experts = GroupedExperts(E, D, Fh)
    experts.reset_parameters(0.3)
    experts.to(dtype)
    return x, ids, w, experts


def grads(fn, x, w, experts):
    """(y, dx, dgates, dw_gate_up, dw_down) of fn(x, gates) under a fixed output gradient."""
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    experts.zero_grad()
    y = fn(x, w)
    gy = torch.linspace(-1, 1, y.numel(), device=y.device).reshape(y.shape).to(y.dtype)
    (y * gy).sum().backward()
    return y.detach(), x.grad, w.grad, experts.w_gate_up_EDH.grad.clone(), experts.w_down_EFD.grad.clone()


def grouped_ids(T, E, M, K, gen):
    """ids [T, K] as MoGE's router makes them: K/M distinct experts of group g in
    columns g*K/M..(g+1)*K/M."""
    G, per = E // M, K // M
    cols = [torch.stack([torch.randperm(G, generator=gen)[:per] for _ in range(T)]) + g * G for g in range(M)]
    return torch.cat(cols, dim=1)


def set_layout(experts, pad, chunk, waste, chunk_bytes=None):
    """Sets the fused path's knobs (see GroupedExperts) and returns the module."""
    experts.pad_rows, experts.experts_per_chunk, experts.max_pad_waste = pad, chunk, waste
    if chunk_bytes is not None:
        experts.chunk_bytes = chunk_bytes
    return experts


def assert_within_bf16_error(x, ids, w, experts):
    """bf16 rounding differs between any two orderings of the same maths, so (as in
    FlashAttention's tests) the fast path's error against a float32 run of the reference
    must stay within twice the bf16 reference's own error, for the output and every
    gradient. `experts` (bf16) is turned to float32 on the way."""
    fast = grads(lambda x, w: experts(x, ids, w), x, w, experts)
    ref = grads(
        lambda x, w: reference_experts(x, ids, w, experts.w_gate_up_EDH, experts.w_down_EFD), x, w, experts
    )
    experts.float()
    exact = grads(
        lambda x, w: reference_experts(x, ids, w, experts.w_gate_up_EDH, experts.w_down_EFD),
        x.float(),
        w,
        experts,
    )
    for name, a, b, c in zip(("y", "dx", "dw", "dw1", "dw2"), fast, ref, exact):
        assert a.dtype == b.dtype == torch.bfloat16 or name == "dw", (name, a.dtype, b.dtype)
        err_fast = (a.float() - c).abs().max().item()
        err_ref = (b.float() - c).abs().max().item()
        assert err_fast <= 2 * err_ref + 1e-3, (name, err_fast, err_ref)
    return fast, exact
