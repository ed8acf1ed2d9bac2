import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from moge.experts import GroupedExperts, SwiGLU, resolve_impl
from reference import reference_experts


def _case(T=29, D=12, Fh=8, E=6, K=3, seed=0, dtype=torch.float32, skip_expert=None):
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


def _grads(fn, x, w, experts):
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    experts.zero_grad()
    y = fn(x, w)
    gy = torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(y.dtype)
    (y * gy).sum().backward()
    return y.detach(), x.grad, w.grad, experts.w_gate_up_EDH.grad.clone(), experts.w_down_EFD.grad.clone()


@pytest.mark.parametrize("impl", ["fused", "grouped_mm", "loop"])
@pytest.mark.parametrize("skip", [None, 2])
def test_fast_paths_match_reference_float32(impl, skip):
    x, ids, w, experts = _case(skip_expert=skip)
    experts.impl = impl
    fast = _grads(lambda x, w: experts(x, ids, w), x, w, experts)
    ref = _grads(
        lambda x, w: reference_experts(x, ids, w, experts.w_gate_up_EDH, experts.w_down_EFD), x, w, experts
    )
    for a, b in zip(fast, ref):
        assert_close(a, b)
    if skip is not None:  # an expert with no tokens gets an exact zero gradient
        assert fast[3][skip].abs().sum() == 0 and fast[4][skip].abs().sum() == 0


@pytest.mark.parametrize("impl", ["fused", "grouped_mm"])
def test_fast_paths_match_reference_bfloat16(impl):
    """bf16 rounding differs between any two orderings of the same maths, so (as in
    FlashAttention's tests) the fast path's error against a float32 run of the
    reference must stay within twice the bf16 reference's own error."""
    x, ids, w, experts = _case(T=64, D=32, Fh=16, E=8, K=2, dtype=torch.bfloat16, seed=1)
    experts.impl = impl
    fast = _grads(lambda x, w: experts(x, ids, w), x, w, experts)
    ref = _grads(
        lambda x, w: reference_experts(x, ids, w, experts.w_gate_up_EDH, experts.w_down_EFD), x, w, experts
    )
    experts.float()
    exact = _grads(
        lambda x, w: reference_experts(x, ids, w, experts.w_gate_up_EDH, experts.w_down_EFD),
        x.float(), w, experts,
    )  # fmt: skip
    assert fast[0].dtype == torch.bfloat16
    for name, a, b, c in zip(("y", "dx", "dw", "dw1", "dw2"), fast, ref, exact):
        err_fast = (a.float() - c).abs().max().item()
        err_ref = (b.float() - c).abs().max().item()
        assert err_fast <= 2 * err_ref + 1e-3, (name, err_fast, err_ref)
        assert_close(a.float(), c, atol=0.03 * c.abs().max().item(), rtol=0.03)


def test_fused_backward_respects_frozen_weights():
    x, ids, w, experts = _case()
    experts.w_gate_up_EDH.requires_grad_(False)
    x = x.requires_grad_()
    experts(x, ids, w).sum().backward()
    assert experts.w_gate_up_EDH.grad is None and experts.w_down_EFD.grad is not None
    assert x.grad is not None


def test_compute_dtype_argument_casts():
    x, ids, w, experts = _case()
    y = experts(x, ids, w, dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16
    assert_close(y.float(), experts(x, ids, w), atol=5e-2, rtol=5e-2)


def test_zero_tokens():
    _, _, _, experts = _case()
    x = torch.zeros(0, 12, requires_grad=True)
    y = experts(x, torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3))
    assert y.shape == (0, 12)
    y.sum().backward()
    assert experts.w_down_EFD.grad.abs().sum() == 0


def test_swiglu_is_down_silu_gate_times_up():
    torch.manual_seed(0)
    m = SwiGLU(6, 5)
    x = torch.randn(3, 6)
    gate_w, up_w = m.w_gate_up.weight[:5], m.w_gate_up.weight[5:]
    expected = (F.silu(x @ gate_w.T) * (x @ up_w.T)) @ m.w_down.weight.T
    assert_close(m(x), expected)


def test_resolve_impl():
    cpu = torch.device("cpu")
    assert resolve_impl("auto", cpu, torch.float32) == "fused"
    assert resolve_impl("auto", torch.device("cuda"), torch.bfloat16) == "grouped_mm"
    assert resolve_impl("loop", cpu, torch.float32) == "loop"
    with pytest.raises(ValueError, match="expert_impl"):
        resolve_impl("magic", cpu, torch.float32)


# --- the fused path's layouts: chunks of experts, one bmm per chunk, padded rows ----------

from moge import experts as experts_mod  # noqa: E402
from moge.experts import _loop_experts, _Plan, default_pad_rows, matmul_dtype, run_experts  # noqa: E402

# (pad_rows, experts_per_chunk, max_pad_waste): per-expert mm; chunks of 3 experts run
# one mm each; chunks forced to one bmm (any waste accepted); the same padded to 8 rows.
LAYOUTS = [(1, 1, 0.0), (1, 3, 0.0), (1, 6, 100.0), (8, 3, 0.0), (8, 6, 100.0), (8, 2, 100.0)]
# The same cut into token blocks of a few tokens (tiny chunk_bytes), and a short last chunk.
BLOCKED = [(1, 3, 0.0, 768), (1, 6, 100.0, 768), (8, 3, 100.0, 768), (1, 4, 0.0, 768), (8, 4, 100.0, 512)]


def _layout(experts, pad, chunk, waste, chunk_bytes=None):
    experts.pad_rows, experts.experts_per_chunk, experts.max_pad_waste = pad, chunk, waste
    if chunk_bytes is not None:
        experts.chunk_bytes = chunk_bytes
    return experts


@pytest.mark.parametrize("pad,chunk,waste,chunk_bytes", [(*lay, None) for lay in LAYOUTS] + BLOCKED)
@pytest.mark.parametrize("skip", [None, 2])
def test_fused_layouts_match_reference_float32(pad, chunk, waste, chunk_bytes, skip):
    x, ids, w, experts = _case(skip_expert=skip)
    _layout(experts, pad, chunk, waste, chunk_bytes)
    if chunk_bytes is not None:
        assert experts._fused_plan(ids, 12, x.device, x.dtype)[1].blocks > 2
    fast = _grads(lambda x, w: experts(x, ids, w), x, w, experts)
    ref = _grads(
        lambda x, w: reference_experts(x, ids, w, experts.w_gate_up_EDH, experts.w_down_EFD), x, w, experts
    )
    for a, b in zip(fast, ref):
        assert_close(a, b)
    if skip is not None:
        assert fast[3][skip].abs().sum() == 0 and fast[4][skip].abs().sum() == 0


def test_plan_uses_one_bmm_per_balanced_chunk_and_pads_rows():
    counts = [5, 7, 2, 6, 3, 3]
    uniform = _Plan(counts, 6, 1, 3, 100.0, torch.device("cpu"))
    assert [c.cap for c in uniform.chunks] == [7, 6]  # the largest count of each chunk
    assert uniform.num_rows == 3 * 7 + 3 * 6 and uniform.pad_P.numel() == uniform.num_rows - sum(counts)
    # Every real row holds its own sorted slot, each slot exactly once; padding rows
    # repeat a slot of their own expert (expert 2: rows 14..20, slots 12..13).
    real = uniform.slot_P[uniform.real_P]
    assert torch.equal(real.sort().values, torch.arange(sum(counts)))
    assert set(uniform.slot_P[14:21].tolist()) == {12, 13}
    ragged = _Plan(counts, 6, 4, 3, 0.0, torch.device("cpu"))
    assert [c.cap for c in ragged.chunks] == [None, None]
    assert ragged.num_rows == 8 + 8 + 4 + 8 + 4 + 4
    exact = _Plan(counts, 6, 1, 2, 0.0, torch.device("cpu"))
    assert exact.slot_P is None and exact.num_rows == sum(counts)  # no copies, no padding
    # A balanced chunk goes to bmm under the default waste bound; a lopsided one, or one
    # with an expert that got no slot, does not.
    assert _Plan([10, 11, 1, 30], 4, 1, 2, 0.25, torch.device("cpu")).chunks[0].cap == 11
    assert _Plan([10, 11, 1, 30], 4, 1, 2, 0.25, torch.device("cpu")).chunks[1].cap is None
    assert _Plan([10, 0, 9, 9], 4, 1, 2, 100.0, torch.device("cpu")).chunks[0].cap is None


@pytest.mark.parametrize("pad,chunk,waste", LAYOUTS)
def test_run_experts_fused_layouts_match_loop(monkeypatch, pad, chunk, waste):
    monkeypatch.setattr(experts_mod, "MAX_PAD_WASTE", waste)
    gen = torch.Generator().manual_seed(3)
    counts = torch.tensor([4, 0, 9, 5, 1, 7])
    S, D, Fh = int(counts.sum()), 10, 6
    x = torch.randn(S, D, generator=gen)
    w1 = torch.randn(6, D, 2 * Fh, generator=gen) * 0.3
    w2 = torch.randn(6, Fh, D, generator=gen) * 0.3
    gy = torch.randn(S, D, generator=gen)

    def grads(fn):
        xs, a, b = (t.clone().requires_grad_() for t in (x, w1, w2))
        y = fn(xs, a, b)
        (y * gy).sum().backward()
        return y.detach(), xs.grad, a.grad, b.grad

    fused = grads(lambda x, a, b: run_experts(x, a, b, counts, "fused", pad, chunk))
    loop = grads(lambda x, a, b: _loop_experts(x, a, b, counts.tolist()))
    for p, q in zip(fused, loop):
        assert_close(p, q)
    assert fused[2][1].abs().sum() == 0  # expert 1 got no slot


@pytest.mark.parametrize(
    "pad,chunk,waste,chunk_bytes", [(1, 2, 0.0, None), (1, 8, 100.0, None), (16, 4, 100.0, None), (16, 2, 0.0, 2048)]
)
def test_fused_layouts_bfloat16_within_bf16_error(pad, chunk, waste, chunk_bytes):
    """Same criterion as test_fast_paths_match_reference_bfloat16, for every layout."""
    x, ids, w, experts = _case(T=64, D=32, Fh=16, E=8, K=2, dtype=torch.bfloat16, seed=1)
    _layout(experts, pad, chunk, waste, chunk_bytes)
    fast = _grads(lambda x, w: experts(x, ids, w), x, w, experts)
    ref = _grads(
        lambda x, w: reference_experts(x, ids, w, experts.w_gate_up_EDH, experts.w_down_EFD), x, w, experts
    )
    experts.float()
    exact = _grads(
        lambda x, w: reference_experts(x, ids, w, experts.w_gate_up_EDH, experts.w_down_EFD),
        x.float(), w, experts,
    )  # fmt: skip
    for name, a, b, c in zip(("y", "dx", "dw", "dw1", "dw2"), fast, ref, exact):
        assert a.dtype == b.dtype
        err_fast = (a.float() - c).abs().max().item()
        err_ref = (b.float() - c).abs().max().item()
        assert err_fast <= 2 * err_ref + 1e-3, (name, err_fast, err_ref)


def test_bfloat16_products_run_in_native_dtype_when_the_cpu_has_it(monkeypatch):
    """With native bf16 products the fused path must still match (rows padded to 128)."""
    monkeypatch.setattr(experts_mod, "_cpu_has_native", lambda dtype: True)
    cpu = torch.device("cpu")
    assert matmul_dtype(cpu, torch.bfloat16) == torch.bfloat16
    assert default_pad_rows(cpu, torch.bfloat16) == experts_mod.PAD_ROWS_NATIVE_LOW_PRECISION
    x, ids, w, experts = _case(T=64, D=32, Fh=16, E=8, K=2, dtype=torch.bfloat16, seed=1)
    y = experts(x, ids, w)
    ref = reference_experts(x.float(), ids, w, experts.w_gate_up_EDH.float(), experts.w_down_EFD.float())
    assert y.dtype == torch.bfloat16
    assert_close(y.float(), ref, atol=0.03 * ref.abs().max().item(), rtol=0.03)


def test_matmul_dtype_upcasts_only_low_precision_without_native_support(monkeypatch):
    cpu = torch.device("cpu")
    assert matmul_dtype(cpu, torch.float32) == torch.float32
    assert matmul_dtype(torch.device("cuda"), torch.bfloat16) == torch.bfloat16
    monkeypatch.setattr(experts_mod, "_cpu_has_native", lambda dtype: False)
    assert matmul_dtype(cpu, torch.bfloat16) == torch.float32
    assert default_pad_rows(cpu, torch.bfloat16) == 1 and default_pad_rows(cpu, torch.float32) == 1


@pytest.mark.parametrize("native", [False, True])
def test_swiglu_bfloat16_and_autocast_close_to_float32(monkeypatch, native):
    monkeypatch.setattr(experts_mod, "_cpu_has_native", lambda dtype: native)
    torch.manual_seed(0)
    m = SwiGLU(16, 24)
    x = torch.randn(10, 16)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = m(x)
    low = m.to(torch.bfloat16)(x.bfloat16())
    for y in (auto, low):
        assert y.dtype == torch.bfloat16
        assert_close(y.float(), ref, atol=0.02 * ref.abs().max().item(), rtol=0.03)


@pytest.mark.parametrize("pad,chunk,waste,chunk_bytes", [(*LAYOUTS[2], None), (*LAYOUTS[3], None), BLOCKED[2]])
def test_fused_layouts_zero_tokens_and_frozen_weights(pad, chunk, waste, chunk_bytes):
    x, ids, w, experts = _case()
    _layout(experts, pad, chunk, waste, chunk_bytes)
    empty = torch.zeros(0, 12, requires_grad=True)
    y = experts(empty, torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3))
    assert y.shape == (0, 12)
    y.sum().backward()
    assert experts.w_down_EFD.grad.abs().sum() == 0
    experts.zero_grad(set_to_none=True)
    experts.w_down_EFD.requires_grad_(False)
    x = x.requires_grad_()
    experts(x, ids, w).sum().backward()
    assert experts.w_down_EFD.grad is None and experts.w_gate_up_EDH.grad is not None and x.grad is not None


def _grouped_ids(T, E, M, K, gen):
    """ids [T, K] as MoGE's router makes them: K/M distinct experts of group g in
    columns g*K/M..(g+1)*K/M."""
    G, per = E // M, K // M
    cols = [torch.stack([torch.randperm(G, generator=gen)[:per] for _ in range(T)]) + g * G for g in range(M)]
    return torch.cat(cols, dim=1)


@pytest.mark.parametrize("pad,waste,chunk_bytes", [(1, 0.0, None), (1, 100.0, None), (8, 0.0, 600), (8, 100.0, 600)])
@pytest.mark.parametrize("K", [2, 4])
def test_group_aligned_combine_matches_reference(pad, waste, chunk_bytes, K):
    """Chunks equal to MoGE groups combine by gathers (no scatter); K/M = 1 and 2."""
    gen = torch.Generator().manual_seed(5)
    T, D, Fh, E, M = 37, 12, 8, 8, 2
    x = torch.randn(T, D, generator=gen)
    ids = _grouped_ids(T, E, M, K, gen)
    w = torch.rand(T, K, generator=gen)
    torch.manual_seed(0)
    experts = _layout(GroupedExperts(E, D, Fh), pad, E // M, waste, chunk_bytes)
    experts.reset_parameters(0.3)
    assert experts_mod._columns_per_chunk(ids, E // M, E) == K // M
    if chunk_bytes is not None:  # several token blocks per group
        assert experts._fused_plan(ids, D, x.device, x.dtype)[1].blocks > 2
    fast = _grads(lambda x, w: experts(x, ids, w), x, w, experts)
    ref = _grads(
        lambda x, w: reference_experts(x, ids, w, experts.w_gate_up_EDH, experts.w_down_EFD), x, w, experts
    )
    for a, b in zip(fast, ref):
        assert_close(a, b)


def test_columns_per_chunk_only_for_group_aligned_ids():
    gen = torch.Generator().manual_seed(0)
    ids = _grouped_ids(20, 8, 4, 4, gen)
    assert experts_mod._columns_per_chunk(ids, 2, 8) == 1
    assert experts_mod._columns_per_chunk(ids, 4, 8) == 2  # two groups per chunk
    assert experts_mod._columns_per_chunk(ids, 3, 8) is None  # chunks cut across groups
    assert experts_mod._columns_per_chunk(ids[:, [1, 0, 2, 3]], 2, 8) is None  # columns out of group order


@pytest.mark.slow  # torch.compile takes tens of seconds on two cores
def test_compiled_elementwise_matches_reference():
    x, ids, w, experts = _case()
    experts.compile_elementwise = True
    _layout(experts, 1, 3, 100.0)
    fast = _grads(lambda x, w: experts(x, ids, w), x, w, experts)
    ref = _grads(
        lambda x, w: reference_experts(x, ids, w, experts.w_gate_up_EDH, experts.w_down_EFD), x, w, experts
    )
    for a, b in zip(fast, ref):
        assert_close(a, b)
    # The eager helpers and the compiled ones compute the same thing.
    h, ga, gate = torch.randn(9, 8), torch.randn(9, 4), torch.rand(9, 1)
    buf = experts_mod._Scratch(9, torch.float32, torch.device("cpu"))
    eager = experts_mod._act_grads_eager(h, ga.clone(), gate, buf)
    for a, b in zip(eager, experts_mod._act_grads_pure(h, ga, gate)):
        assert_close(a, b)


@pytest.mark.parametrize("pad,chunk,waste,chunk_bytes", [(8, 6, 100.0, None), (1, 3, 100.0, 768), (8, 2, 0.0, None)])
def test_padding_keeps_a_non_finite_token_inside_its_own_experts(pad, chunk, waste, chunk_bytes):
    """Padding rows repeat a slot of their own expert: a NaN token must not reach the
    outputs of other tokens or the gradients of experts it did not choose."""
    x, ids, w, experts = _case()
    _layout(experts, pad, chunk, waste, chunk_bytes)
    x[3] = float("nan")
    fast = _grads(lambda x, w: experts(x, ids, w), x, w, experts)
    ref = _grads(
        lambda x, w: reference_experts(x, ids, w, experts.w_gate_up_EDH, experts.w_down_EFD), x, w, experts
    )
    for a, b in zip(fast, ref):
        assert_close(a, b, equal_nan=True)
    assert fast[0][torch.arange(29) != 3].isfinite().all()
