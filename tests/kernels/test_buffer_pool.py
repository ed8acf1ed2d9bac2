"""The fused path's reused activation memory (moge.kernels.buffer_pool): handed out
only when free, never changing a result, never pinning what a forward without a
backward allocated."""

import copy
import pickle

import pytest
import torch
from expert_cases import case
from torch.testing import assert_close
from torch.utils.checkpoint import checkpoint

from moge.experts import GroupedExperts, run_experts
from moge.kernels.buffer_pool import BufferPool
from moge.kernels.few_tokens import MAX_FEW_SLOTS

T = MAX_FEW_SLOTS // 3 + 7  # tokens of 3 slots each: past the few-token path (no graph, few slots)


def _calls(n=3):
    """GroupedExperts and n routings of T tokens (layouts of different row counts)."""
    out = [case(T=T, D=12, Fh=8, E=6, K=3, seed=s) for s in range(n)]
    return out[0][3], [(x, ids, w) for x, ids, w, _ in out]


def _fwd_bwd(experts, x, ids, w):
    """(y, dx, dgates, dw1, dw2) of one training call under a fixed output gradient."""
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    experts.zero_grad()
    y = experts(x, ids, w)
    (y * _gy(y)).sum().backward()
    return y.detach(), x.grad, w.grad, experts.w_gate_up_EDH.grad.clone(), experts.w_down_EFD.grad.clone()


def _gy(y):
    return torch.linspace(-1, 1, y.numel()).reshape(y.shape)


def _unpooled(experts):
    fresh = copy.deepcopy(experts)
    fresh.activation_pool = BufferPool(0)  # keeps nothing
    return fresh


def test_pool_reuses_memory_and_changes_no_result():
    experts, calls = _calls()
    fresh = _unpooled(experts)
    ptrs = []
    for x, ids, w in calls + calls:
        got = _fwd_bwd(experts, x, ids, w)
        for a, b in zip(got, _fwd_bwd(fresh, x, ids, w)):
            assert_close(a, b, rtol=0, atol=0)
        ptrs.append({b.data_ptr() for b in experts.activation_pool._free})
        assert fresh.activation_pool.nbytes == 0
    assert len(ptrs[0]) == 2  # h and silu(gate), given back by the backward
    assert ptrs[-1] & ptrs[0]  # the same memory, taken and given back call after call


def test_buffer_of_a_live_graph_is_not_reused():
    """A retained graph's activations, given back by its first backward, stay its own
    through later calls' forwards and backwards: its second backward is unchanged."""
    experts, calls = _calls(2)
    fresh = _unpooled(experts)
    (x1, ids1, w1), (x2, ids2, w2) = calls
    x1g = x1.clone().requires_grad_()
    y1 = experts(x1g, ids1, w1)
    (y1 * _gy(y1)).sum().backward(retain_graph=True)
    assert experts.activation_pool.nbytes > 0  # given back, though the graph holds it
    first = x1g.grad.clone()
    for _ in range(2):  # writes would land in y1's saved activations if they were handed out
        _fwd_bwd(experts, x2, ids2, w2)
    x1g.grad = None
    (y1 * _gy(y1)).sum().backward()
    assert_close(x1g.grad, first, rtol=0, atol=0)
    x1r = x1.clone().requires_grad_()
    y1r = fresh(x1r, ids1, w1)
    (y1r * _gy(y1r)).sum().backward()
    assert_close(first, x1r.grad, rtol=0, atol=0)


def test_forward_without_backward_pins_nothing_and_eval_clears():
    experts, calls = _calls(1)
    x, ids, w = calls[0]
    with torch.no_grad():
        y_nograd = experts(x, ids, w)
    y_graph = experts(x, ids, w.clone().requires_grad_())  # never backpropagated
    assert experts.activation_pool.nbytes == 0
    assert_close(y_nograd, y_graph.detach(), rtol=0, atol=0)  # no-grad: scratch rows, same maths
    _fwd_bwd(experts, x, ids, w)
    assert experts.activation_pool.nbytes > 0
    experts.eval()
    assert experts.activation_pool.nbytes == 0
    _fwd_bwd(experts, x, ids, w)  # eval with autograd on: not pooled
    assert experts.activation_pool.nbytes == 0


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_calls_pool_nothing(reentrant):
    """Under activation checkpointing the backward reads recomputed activations (and a
    reentrant recompute runs inside the backward): none of them is kept, or every layer's
    would be held until the next step instead of freed during this backward."""
    experts, calls = _calls(1)
    x, ids, w = calls[0]
    fresh = _unpooled(experts)
    xg = x.clone().requires_grad_()
    y = checkpoint(lambda x_: experts(x_, ids, w), xg, use_reentrant=reentrant)
    (y * _gy(y)).sum().backward()
    assert experts.activation_pool.nbytes == 0
    xr = x.clone().requires_grad_()
    yr = fresh(xr, ids, w)
    (yr * _gy(yr)).sum().backward()
    assert_close(xg.grad, xr.grad, rtol=0, atol=0)


def test_sorted_slot_path_without_grad_matches():
    """run_experts "fused" (expert parallelism's) saves nothing under no_grad, same output."""
    torch.manual_seed(0)
    x_SD, counts_E = torch.randn(30, 8), torch.tensor([10, 0, 12, 8])
    w1, w2 = torch.randn(4, 8, 12, requires_grad=True), torch.randn(4, 6, 8, requires_grad=True)
    with torch.no_grad():
        y0 = run_experts(x_SD, w1, w2, counts_E, "fused")
    y1 = run_experts(x_SD, w1, w2, counts_E, "fused")
    assert y1.requires_grad
    assert_close(y0, y1.detach(), rtol=0, atol=0)


def test_copies_start_with_an_empty_pool():
    experts, calls = _calls(1)
    _fwd_bwd(experts, *calls[0])
    assert experts.activation_pool.nbytes > 0
    for other in (copy.deepcopy(experts), pickle.loads(pickle.dumps(experts))):
        assert isinstance(other, GroupedExperts) and other.activation_pool.nbytes == 0


def test_take_best_fit_held_buffers_and_bound():
    pool, cpu = BufferPool(max_buffers=2), torch.device("cpu")
    big, small = pool.take(4, 16, torch.float32, cpu), pool.take(4, 8, torch.float32, cpu)
    assert big is not None and small is not None and big.shape == (4, 16) and small.shape == (4, 8)
    ptr_big, ptr_small = big.data_ptr(), small.data_ptr()
    pool.give(big, small)
    del big, small
    held = pool.take(4, 8, torch.float32, cpu)
    assert held.data_ptr() == ptr_small  # the smallest that fits, not the [4, 16] one
    pool.give(held)  # given back while `held` still holds it: not handed out
    keep = [pool.take(4, 8, torch.float32, cpu)]
    assert keep[0].data_ptr() == ptr_big  # the only free one that fits
    keep.append(pool.take(4, 8, torch.float32, cpu))  # none free: new memory (ptr_small is held)
    assert keep[1].data_ptr() not in (ptr_big, ptr_small)
    del held
    assert pool.take(4, 8, torch.float32, cpu).data_ptr() == ptr_small  # free now
    pool.give(*keep)
    del keep
    assert pool.take(4, 8, torch.float64, cpu).dtype == torch.float64 and len(pool._free) == 2  # not theirs
    pool.clear()
    pool.give(torch.empty(64, 8))  # not lent by this pool: left alone
    assert pool.nbytes == 0
    pool.give(*(pool.take(8, 8 * k, torch.float32, cpu) for k in (1, 2, 3)))
    assert sorted(b.numel() for b in pool._free)[0] >= 8 * 16  # the two largest kept
    assert len(pool._free) == 2
    assert pool.take(4, 4, torch.float32, torch.device("meta")) is None  # CPU only
    pool.clear()
    assert pool.nbytes == 0
