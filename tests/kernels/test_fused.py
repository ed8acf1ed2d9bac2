import pytest
import torch
from allocations import allocator_use
from expert_cases import BLOCKED, LAYOUTS, assert_within_bf16_error, case, grads, grouped_ids, set_layout
from reference import reference_experts
from torch.testing import assert_close

from moge.experts import GroupedExperts, run_experts, sort_slots
from moge.kernels import fused, precision
from moge.kernels.fused_plan import columns_per_chunk
from moge.kernels.precision import PAD_ROWS_NATIVE_LOW_PRECISION, default_pad_rows, matmul_dtype


@pytest.mark.parametrize("pad,chunk,waste,chunk_bytes", [(*lay, None) for lay in LAYOUTS] + BLOCKED)
@pytest.mark.parametrize("skip", [None, 2])
def test_fused_layouts_match_reference_float32(pad, chunk, waste, chunk_bytes, skip):
    x, ids, w, experts = case(skip_expert=skip)
    set_layout(experts, pad, chunk, waste, chunk_bytes)
    if chunk_bytes is not None:
        assert experts._fused_plan(ids, 12, x.device, x.dtype)[1].blocks > 2
    fast = grads(lambda x, w: experts(x, ids, w), x, w, experts)
    ref = grads(
        lambda x, w: reference_experts(x, ids, w, experts.w_gate_up_EDH, experts.w_down_EFD), x, w, experts
    )
    for a, b in zip(fast, ref):
        assert_close(a, b)
    if skip is not None:
        assert fast[3][skip].abs().sum() == 0 and fast[4][skip].abs().sum() == 0


@pytest.mark.parametrize("pad,chunk,waste", LAYOUTS)
@pytest.mark.parametrize("skip", [None, 2])
def test_autocast_float32_weights_give_the_bf16_weights_results_exactly(monkeypatch, pad, chunk, waste, skip):
    """bf16 products of float32 weights (autocast training, the path `moge train` takes on
    a native-bf16 CPU): every output and gradient is bit for bit the bf16-weight run's,
    cast to float32 (the weights are cast once, each weight-gradient product rounded once
    to bf16), and an expert without slots gets an exact 0."""
    monkeypatch.setattr(precision, "_cpu_has_native", lambda dtype: True)
    x, ids, w, experts = case(T=40, D=16, Fh=8, skip_expert=skip)
    set_layout(experts, pad, chunk, waste)
    x = x.bfloat16()

    def autocast_run(x, w):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return experts(x, ids, w, torch.bfloat16)

    run32 = grads(autocast_run, x, w, experts)
    assert experts.w_gate_up_EDH.grad.dtype == torch.float32
    experts.bfloat16()
    run16 = grads(lambda x, w: experts(x, ids, w), x, w, experts)
    for name, a, b in zip(("y", "dx", "dw", "dw1", "dw2"), run32, run16):
        assert_close(a, b.to(a.dtype), rtol=0, atol=0, msg=name)
    if skip is not None:
        assert run32[3][skip].abs().sum() == 0 and run32[4][skip].abs().sum() == 0


@pytest.mark.parametrize(
    "pad,chunk,waste,chunk_bytes",
    [(1, 2, 0.0, None), (1, 8, 100.0, None), (16, 4, 100.0, None), (16, 2, 0.0, 2048)],
)
def test_fused_layouts_bfloat16_within_bf16_error(pad, chunk, waste, chunk_bytes):
    """Same criterion as test_fast_paths_match_reference_bfloat16, for every layout."""
    x, ids, w, experts = case(T=64, D=32, Fh=16, E=8, K=2, dtype=torch.bfloat16, seed=1)
    set_layout(experts, pad, chunk, waste, chunk_bytes)
    assert_within_bf16_error(x, ids, w, experts)


def test_bfloat16_products_run_in_native_dtype_when_the_cpu_has_it(monkeypatch):
    """With native bf16 products the fused path must still match (rows padded to 128)."""
    monkeypatch.setattr(precision, "_cpu_has_native", lambda dtype: True)
    cpu = torch.device("cpu")
    assert matmul_dtype(cpu, torch.bfloat16) == torch.bfloat16
    assert default_pad_rows(cpu, torch.bfloat16) == PAD_ROWS_NATIVE_LOW_PRECISION
    # A power of two near 1/64 of an expert's rows, within 16..128.
    rows = {64: 16, 1024: 16, 2048: 32, 4096: 64, 8192: 128, 10**6: 128}
    assert {n: default_pad_rows(cpu, torch.bfloat16, n) for n in rows} == rows
    assert default_pad_rows(cpu, torch.float32, 1024) == 1
    x, ids, w, experts = case(T=64, D=32, Fh=16, E=8, K=2, dtype=torch.bfloat16, seed=1)
    y = experts(x, ids, w)
    ref = reference_experts(x.float(), ids, w, experts.w_gate_up_EDH.float(), experts.w_down_EFD.float())
    assert y.dtype == torch.bfloat16
    assert_close(y.float(), ref, atol=0.03 * ref.abs().max().item(), rtol=0.03)


@pytest.mark.parametrize(
    "pad,chunk,waste,chunk_bytes", [(*LAYOUTS[2], None), (*LAYOUTS[3], None), BLOCKED[2]]
)
def test_fused_layouts_zero_tokens_and_frozen_weights(pad, chunk, waste, chunk_bytes):
    x, ids, w, experts = case()
    set_layout(experts, pad, chunk, waste, chunk_bytes)
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


@pytest.mark.parametrize(
    "pad,waste,chunk_bytes", [(1, 0.0, None), (1, 100.0, None), (8, 0.0, 600), (8, 100.0, 600)]
)
@pytest.mark.parametrize("K", [2, 4])
@pytest.mark.parametrize("index_add", [False, True])
def test_group_aligned_combine_matches_reference(pad, waste, chunk_bytes, K, index_add):
    """Chunks equal to MoGE groups: the first group gathers, later ones add by gathers
    or by token (index_add); K/M = 1 and 2."""
    gen = torch.Generator().manual_seed(5)
    T, D, Fh, E, M = 37, 12, 8, 8, 2
    x = torch.randn(T, D, generator=gen)
    ids = grouped_ids(T, E, M, K, gen)
    w = torch.rand(T, K, generator=gen)
    torch.manual_seed(0)
    experts = set_layout(GroupedExperts(E, D, Fh), pad, E // M, waste, chunk_bytes)
    experts.reset_parameters(0.3)
    experts.combine_index_add = index_add
    assert experts._fused_plan(ids, D, x.device, x.dtype)[1].combine_index_add is index_add
    assert columns_per_chunk(ids, E // M, E) == K // M
    if chunk_bytes is not None:  # several token blocks per group
        assert experts._fused_plan(ids, D, x.device, x.dtype)[1].blocks > 2
    fast = grads(lambda x, w: experts(x, ids, w), x, w, experts)
    ref = grads(
        lambda x, w: reference_experts(x, ids, w, experts.w_gate_up_EDH, experts.w_down_EFD), x, w, experts
    )
    for a, b in zip(fast, ref):
        assert_close(a, b)


@pytest.mark.parametrize("pad,chunk_bytes", [(8, None), (8, 600)])
@pytest.mark.parametrize("index_add", [False, True])
def test_group_aligned_combine_keeps_a_non_finite_token_to_itself(pad, chunk_bytes, index_add):
    """A padding row of a later group repeats a slot of the NaN token: adding by token
    (index_add_), padding rows included, it adds to that token only; by gathers it is
    never read."""
    gen = torch.Generator().manual_seed(6)
    T, D, Fh, E, M, K = 37, 12, 8, 8, 2, 2
    x = torch.randn(T, D, generator=gen)
    ids = grouped_ids(T, E, M, K, gen)
    w = torch.rand(T, K, generator=gen)
    torch.manual_seed(0)
    experts = set_layout(GroupedExperts(E, D, Fh), pad, E // M, 0.0, chunk_bytes)
    experts.reset_parameters(0.3)
    experts.combine_index_add = index_add
    order, plan, _ = experts._fused_plan(ids, D, x.device, x.dtype)
    _, tok_P = plan.bind(order, K)
    assert plan.pad_P is not None
    later = [c for c in plan.chunks if c.e0 > 0]  # chunks that add to the first group's rows
    pads = [r for r in plan.pad_P.tolist() if any(c.rows.start <= r < c.rows.stop for c in later)]
    assert pads, "the layout has padding rows in a later group"
    bad = int(tok_P[pads[0]])  # the token whose slot that padding row repeats
    x[bad] = float("nan")
    fast = grads(lambda x, w: experts(x, ids, w), x, w, experts)
    ref = grads(
        lambda x, w: reference_experts(x, ids, w, experts.w_gate_up_EDH, experts.w_down_EFD), x, w, experts
    )
    for a, b in zip(fast, ref):
        assert_close(a, b, equal_nan=True)
    assert fast[0][torch.arange(T) != bad].isfinite().all()


@pytest.mark.slow  # torch.compile takes tens of seconds on two cores
def test_compiled_elementwise_matches_reference():
    x, ids, w, experts = case()
    experts.compile_elementwise = True
    set_layout(experts, 1, 3, 100.0)
    fast = grads(lambda x, w: experts(x, ids, w), x, w, experts)
    ref = grads(
        lambda x, w: reference_experts(x, ids, w, experts.w_gate_up_EDH, experts.w_down_EFD), x, w, experts
    )
    for a, b in zip(fast, ref):
        assert_close(a, b)
    # The eager helpers and the compiled ones compute the same thing.
    h, ga, gate = torch.randn(9, 8), torch.randn(9, 4), torch.rand(9, 1)
    buf = fused._Scratch(9, torch.float32, torch.device("cpu"))
    eager = fused._act_grads_eager(h, None, ga.clone(), gate, buf)
    for a, b in zip(eager, fused._act_grads_pure(h, ga, gate)):
        assert_close(a, b)


@pytest.mark.parametrize(
    "pad,chunk,waste,chunk_bytes", [(8, 6, 100.0, None), (1, 3, 100.0, 768), (8, 2, 0.0, None)]
)
def test_padding_keeps_a_non_finite_token_inside_its_own_experts(pad, chunk, waste, chunk_bytes):
    """Padding rows repeat a slot of their own expert: a NaN token must not reach the
    outputs of other tokens or the gradients of experts it did not choose."""
    x, ids, w, experts = case()
    set_layout(experts, pad, chunk, waste, chunk_bytes)
    x[3] = float("nan")
    fast = grads(lambda x, w: experts(x, ids, w), x, w, experts)
    ref = grads(
        lambda x, w: reference_experts(x, ids, w, experts.w_gate_up_EDH, experts.w_down_EFD), x, w, experts
    )
    for a, b in zip(fast, ref):
        assert_close(a, b, equal_nan=True)
    assert fast[0][torch.arange(29) != 3].isfinite().all()


@pytest.mark.parametrize("native,pad", [(True, None), (True, 1), (False, None)])
@pytest.mark.parametrize("chunk,waste", [(2, 0.0), (4, 100.0)])
def test_many_token_blocks_bfloat16_within_bf16_error(monkeypatch, native, pad, chunk, waste):
    """64 token blocks add up in the weight-gradient buffer: it must sum in float32
    whether the bf16 products run natively (flag forced on; rows padded by default, or
    not) or in float32 (off)."""
    monkeypatch.setattr(precision, "_cpu_has_native", lambda dtype: native)
    x, ids, w, experts = case(T=512, D=32, Fh=16, E=8, K=2, dtype=torch.bfloat16, seed=4)
    # ~8 tokens per block: budget = tokens * 4 bytes * width * slots per token per chunk.
    set_layout(experts, pad, chunk, waste, chunk_bytes=int(8 * 4 * 32 * 2 * chunk / 8))
    plan = experts._fused_plan(ids, 32, x.device, x.dtype)[1]
    assert plan.blocks >= 64, plan.blocks
    assert_within_bf16_error(x, ids, w, experts)


@pytest.mark.parametrize("combine_float32", [False, True])
@pytest.mark.parametrize("native", [True, False])
def test_group_combine_bfloat16_within_bf16_error(monkeypatch, native, combine_float32):
    """The gather-combine sums groups in bf16 where products are native bf16 (or in
    float32 when asked, or when the products run in float32): within bf16's error."""
    monkeypatch.setattr(precision, "_cpu_has_native", lambda dtype: native)
    gen = torch.Generator().manual_seed(6)
    T, D, Fh, E, M, K = 64, 32, 16, 16, 8, 8
    x = torch.randn(T, D, generator=gen).bfloat16()
    ids = grouped_ids(T, E, M, K, gen)
    w = torch.rand(T, K, generator=gen)
    torch.manual_seed(0)
    experts = set_layout(GroupedExperts(E, D, Fh), 1, E // M, 0.0)
    experts.reset_parameters(0.3)
    experts.combine_float32 = combine_float32
    experts.to(torch.bfloat16)
    assert columns_per_chunk(ids, E // M, E) == K // M
    assert_within_bf16_error(x, ids, w, experts)


@pytest.mark.parametrize("by_cost", [True, False])
def test_native_bf16_groups_run_as_one_bmm_where_calls_cost_more_than_padding(monkeypatch, by_cost):
    """With native bf16 products (flag forced on) an mm call's fixed cost outweighs a
    few padding rows at these tiny sizes, so MoGE's group chunks run as one bmm each
    (by_cost off: one mm per expert); both within bf16's error of the reference, with
    silu(gate) saved for backward."""
    monkeypatch.setattr(precision, "_cpu_has_native", lambda dtype: True)
    gen = torch.Generator().manual_seed(8)
    T, D, Fh, E, M, K = 48, 32, 16, 8, 2, 4
    x = torch.randn(T, D, generator=gen).bfloat16()
    ids = grouped_ids(T, E, M, K, gen)
    w = torch.rand(T, K, generator=gen)
    torch.manual_seed(0)
    experts = GroupedExperts(E, D, Fh)
    experts.reset_parameters(0.3)
    # Unpadded rows (pad 1), so that the experts' row counts differ and a bmm pads.
    experts.experts_per_chunk, experts.bmm_by_cost, experts.pad_rows = E // M, by_cost, 1
    experts.to(torch.bfloat16)
    plan = experts._fused_plan(ids, D, x.device, x.dtype)[1]
    assert all((c.cap is not None) == by_cost for c in plan.chunks)
    assert_within_bf16_error(x, ids, w, experts)


@pytest.mark.parametrize("bad_id,chunk,chunk_bytes", [(6, 1, None), (7, 4, 768), (6, 4, None)])
def test_an_expert_id_out_of_range_is_a_value_error(bad_id, chunk, chunk_bytes):
    """An id >= E fell outside every chunk's experts: its slot was dropped, and with token
    blocks the slots after it were read as other experts' (other tokens' outputs changed,
    by up to 1.0 here, though its gate was 0). Now a ValueError naming the ids."""
    x, ids, w, experts = case(E=6, K=3)
    set_layout(experts, 1, chunk, 0.0, chunk_bytes)
    ids[0, 0] = bad_id
    with pytest.raises(ValueError, match=r"expert ids: 1 of 87 slots name an expert outside 0\.\.5"):
        experts(x, ids, w)


@pytest.mark.parametrize("path", ["tokens", "sorted slots"])
def test_a_call_without_autograd_saves_no_activations(path):
    """Under no_grad the fused Functions save nothing for a backward that cannot come:
    each chunk's pre-activations go to scratch rows, not to [P, 2F] and [P, F] tensors
    (what a training call keeps). Same output, bit for bit; the call's peak memory is
    below the size of those two tensors (it was above them)."""
    T, D, Fh, E, K = 512, 8, 64, 6, 3  # past the few-token path; h dominates the memory
    x, ids, w, experts = case(T=T, D=D, Fh=Fh, E=E, K=K, seed=2)
    if path == "tokens":
        call = lambda: experts(x, ids, w)  # noqa: E731
    else:
        order_S, counts_E = sort_slots(ids, E)
        x_SD = x[order_S // K]
        w1, w2 = experts.w_gate_up_EDH, experts.w_down_EFD
        call = lambda: run_experts(x_SD, w1, w2, counts_E, "fused")  # noqa: E731
    with torch.no_grad():
        peak = allocator_use(call).peak
        y_nograd = call()
    y = call()
    assert y.requires_grad
    assert_close(y_nograd, y.detach(), rtol=0, atol=0)
    saved = T * K * 3 * Fh * 4  # at least S rows of h [*, 2F] and silu(gate) [*, F], float32
    assert peak < 0.5 * saved, (peak, saved)
