"""The fused expert path: gather, SwiGLU products and combine, chunk by chunk, with a
hand-written backward.

Legend: T tokens, K experts per token, S = T*K token-slots, D d_model, F expert
hidden, H = 2F (gate and up, fused), E experts, P rows of the plan's layout, R rows of
one chunk (a slice of P).

FusedMoE (GroupedExperts "fused") takes tokens and gates and returns the combined
output without building any [S, D] tensor; FusedSwiGLUExperts (run_experts "fused",
used by expert parallelism) runs experts on slots already sorted by expert. Both
write every gradient directly: autograd through per-expert slicing would
materialise a full-size zero gradient per expert. See docs/performance.md.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F_
from torch import Tensor

from moge.kernels.fused_plan import Chunk, Plan
from moge.kernels.precision import matmul_dtype


class _Scratch:
    """Per-call work buffers of one chunk's rows, reused chunk after chunk.

    Created on first use, uninitialised: every user writes the rows it reads.
    Sized by the largest chunk, so they stay a fraction of the [S, *] tensors and are
    not returned to the OS between chunks (fresh large temporaries page-fault).
    """

    def __init__(self, rows: int, dtype: torch.dtype, device: torch.device) -> None:
        self.n_rows, self.dtype, self.device = rows, dtype, device
        self._bufs: dict[str, Tensor] = {}

    def get(self, name: str, cols: int, rows: int, dtype: torch.dtype | None = None) -> Tensor:
        """The first `rows` rows of the [max rows, cols] buffer called `name` (in the
        products' dtype unless `dtype` is given)."""
        buf = self._bufs.get(name)
        if buf is None:
            buf = torch.empty(self.n_rows, cols, dtype=dtype or self.dtype, device=self.device)
            self._bufs[name] = buf
        return buf[:rows]


def _gather(
    buf: Tensor, src: Tensor, index_P: Tensor | None, chunk: Chunk, scratch: _Scratch, zero_pads: bool = False
) -> Tensor:
    """The chunk's rows of src in buf's dtype: src[index_P[row]] (index None: src is
    already laid out by row), padding rows zeroed if zero_pads. A view of src when no
    copy is needed. Another dtype (bf16 rows for float32 products) goes through a
    scratch buffer of src's dtype, not a fresh temporary.
    """
    if index_P is None:
        part = src[chunk.rows]
        if part.dtype == buf.dtype:
            return part
        buf.copy_(part)
    elif src.dtype == buf.dtype:
        torch.index_select(src, 0, index_P[chunk.rows], out=buf)
    else:
        rows = scratch.get(f"gather {src.dtype}", src.shape[1], buf.shape[0], src.dtype)
        buf.copy_(torch.index_select(src, 0, index_P[chunk.rows], out=rows))
    if zero_pads and chunk.pad_local is not None and chunk.pad_local.numel():
        buf.index_fill_(0, chunk.pad_local, 0)
    return buf


class _Weights:
    """One call's per-expert views of a stacked weight [E, A, B] in the product dtype:
    w[e] and w[e].T for every e, made by a few ops per chunk instead of a few per
    expert and product (at the toy shapes those view ops cost as much as the products).

    Stored in another dtype than the products (bf16 on a CPU without bf16 matrix
    instructions): each chunk's experts are rounded to the compute dtype and cast once.
    """

    def __init__(self, w: Tensor, dtype: torch.dtype, mm: torch.dtype) -> None:
        self.w, self.dtype, self.mm = w, dtype, mm
        self.same = w.dtype == dtype == mm
        self._views: dict[bool, tuple[Tensor, ...]] = {}
        self._cast: dict[tuple[int, int], Tensor] = {}

    def stack(self, chunk: Chunk) -> Tensor:
        """The chunk's experts [e1 - e0, A, B] in the product dtype."""
        part = self.w[chunk.e0 : chunk.e1]
        if self.same:
            return part
        key = (chunk.e0, chunk.e1)
        if key not in self._cast:
            self._cast = {key: part.to(self.dtype).to(self.mm)}  # one chunk at a time: small
        return self._cast[key]

    def experts(self, chunk: Chunk, transpose: bool) -> tuple[Tensor, ...]:
        """w[e] (or w[e].T) for e in e0..e1, as a tuple indexed by e - e0."""
        if self.same:  # views of the whole stack, made once per call
            if transpose not in self._views:
                self._views[transpose] = (self.w.transpose(1, 2) if transpose else self.w).unbind(0)
            return self._views[transpose][chunk.e0 : chunk.e1]
        part = self.stack(chunk)
        return (part.transpose(1, 2) if transpose else part).unbind(0)


def _products(a: Tensor, w: _Weights, out: Tensor, chunk: Chunk, transpose: bool = False) -> Tensor:
    """out[rows of e] = a[rows of e] @ w[e] (or w[e].T) for every expert of the chunk."""
    if chunk.cap is not None:
        n, cap = chunk.e1 - chunk.e0, chunk.cap
        w_stack = w.stack(chunk)
        w_stack = w_stack.transpose(1, 2) if transpose else w_stack
        torch.bmm(a.view(n, cap, a.shape[1]), w_stack, out=out.view(n, cap, out.shape[1]))
        return out
    w_e = w.experts(chunk, transpose)
    a_e, out_e = a.split(chunk.widths), out.split(chunk.widths)
    for e, _, _ in chunk.experts:
        i = e - chunk.e0
        torch.mm(a_e[i], w_e[i], out=out_e[i])
    return out


def _weight_grads(a: Tensor, b: Tensor, dw: Tensor, chunk: Chunk, add: bool) -> None:
    """dw[e] = a[rows of e].T @ b[rows of e] for every expert of the chunk, or += when
    `add` (an expert's token blocks add up in a zeroed accumulator; see _grad_buffer)."""
    same = dw.dtype == a.dtype
    if chunk.cap is not None:
        n, cap = chunk.e1 - chunk.e0, chunk.cap
        a3, b3 = a.view(n, cap, a.shape[1]).transpose(1, 2), b.view(n, cap, b.shape[1])
        target = dw[chunk.e0 : chunk.e1]
        if add and same:
            target.baddbmm_(a3, b3)
        elif same:
            torch.bmm(a3, b3, out=target)
        elif add:
            target.add_(torch.bmm(a3, b3))
        else:
            target.copy_(torch.bmm(a3, b3))
        return
    a_e, b_e, dw_e = a.split(chunk.widths), b.split(chunk.widths), dw[chunk.e0 : chunk.e1].unbind(0)
    for e, _, _ in chunk.experts:
        i = e - chunk.e0
        if add and same:
            dw_e[i].addmm_(a_e[i].T, b_e[i])
        elif same:
            torch.mm(a_e[i].T, b_e[i], out=dw_e[i])
        elif add:
            dw_e[i].add_(a_e[i].T @ b_e[i])
        else:
            dw_e[i].copy_(a_e[i].T @ b_e[i])


# --- the elementwise work of a chunk: eager in-place ops, or one compiled kernel each --------


def _act_eager(h_RH: Tensor, gate_R1: Tensor | None, s_RF: Tensor | None, buf: _Scratch) -> Tensor:
    """a = silu(gate) * up (* g): [R, 2F] -> [R, F] in a scratch buffer; silu(gate)
    also goes to s_RF (saved for backward, any float dtype) unless it is None."""
    R, F = h_RH.shape[0], h_RH.shape[1] // 2
    a = buf.get("a", F, R)
    if s_RF is not None and s_RF.dtype == a.dtype:
        torch.mul(torch.ops.aten.silu.out(h_RH[:, :F], out=s_RF), h_RH[:, F:], out=a)
    else:
        torch.ops.aten.silu.out(h_RH[:, :F], out=a)
        if s_RF is not None:
            s_RF.copy_(a)
        a.mul_(h_RH[:, F:])
    if gate_R1 is not None:
        # Scaling the [R, F] activations is cheaper than the [R, D] output when F < D.
        a.mul_(gate_R1)
    return a


def _act_grads_eager(
    h_RH: Tensor, s_RF: Tensor | None, ga_RF: Tensor, gate_R1: Tensor | None, buf: _Scratch,
    dgate_R: Tensor | None = None,
) -> tuple:  # fmt: skip
    """From the pre-activations h and silu(gate) s (saved; any float dtype; s None:
    recomputed) and ga = d loss / d(a * g) per unit gate: (a * g [R, F], dh [R, 2F],
    d loss / d g [R] (into dgate_R if given) or None), in scratch buffers of ga's dtype
    (ga is overwritten)."""
    R, F = h_RH.shape[0], h_RH.shape[1] // 2
    gate, up = h_RH[:, :F], h_RH[:, F:]  # mixed-dtype ops below read bf16 h directly
    dh, a = buf.get("h", 2 * F, R), buf.get("a", F, R)
    if s_RF is not None and s_RF.dtype == dh.dtype:
        s = s_RF
    elif s_RF is not None:
        s = dh[:, F:].copy_(s_RF)  # dh's up half holds silu(gate) first
    elif gate.dtype == dh.dtype:
        s = torch.ops.aten.silu.out(gate, out=dh[:, F:])
    else:  # silu.out wants one dtype
        s = F_.silu(dh[:, F:].copy_(gate), inplace=True)
    torch.mul(s, up, out=a)
    dgate = None
    if gate_R1 is not None:
        dgate = torch.linalg.vecdot(a, ga_RF, out=dgate_R)  # d loss / d g per row (out None: a new one)
        a.mul_(gate_R1)
        ga_RF.mul_(gate_R1)
    torch.mul(s, ga_RF, out=dh[:, F:])  # d loss / d up
    torch.ops.aten.silu_backward.grad_input(ga_RF.mul_(up), gate, grad_input=dh[:, :F])
    return a, dh, dgate


def _act_pure(h_RH: Tensor, gate_R1: Tensor | None) -> Tensor:
    """_act_eager without buffers, for torch.compile (one fused kernel)."""
    F = h_RH.shape[1] // 2
    a = F_.silu(h_RH[:, :F]) * h_RH[:, F:]
    return a if gate_R1 is None else a * gate_R1


def _act_grads_pure(h_RH: Tensor, ga_RF: Tensor, gate_R1: Tensor | None) -> tuple:
    """_act_grads_eager without buffers, for torch.compile; h may be in the storage dtype."""
    F = h_RH.shape[1] // 2
    gate, up = h_RH[:, :F].to(ga_RF.dtype), h_RH[:, F:].to(ga_RF.dtype)
    sig = torch.sigmoid(gate)
    s = gate * sig
    a = s * up
    dgate = None if gate_R1 is None else (a * ga_RF).sum(dim=1)
    if gate_R1 is not None:
        a, ga_RF = a * gate_R1, ga_RF * gate_R1
    dgate_in = ga_RF * up * sig * (1 + gate * (1 - sig))
    return a, torch.cat((dgate_in, ga_RF * s), dim=1), dgate


@functools.cache
def _compiled() -> tuple:
    """(act, act_grads) compiled once per process, dynamic in the row count."""
    return torch.compile(_act_pure, dynamic=True), torch.compile(_act_grads_pure, dynamic=True)


# --- one chunk's SwiGLUs, shared by both fused Functions ------------------------------------


def _chunk_forward(x_RD, h_RH, s_RF, chunk, w1, w2, gate_R1, buf, y_out, compiled) -> Tensor:
    """Every expert of the chunk: (silu(gate) * up) * g @ w2, [gate | up] = x @ w1.

    x_RD [R, D] the chunk's rows (padding rows: zero, or repeats with gate 0), h_RH
    [R, 2F] and s_RF [R, F] (None when compiled) receive the pre-activations and
    silu(gate) (saved for backward, storage dtype), w1 / w2 the _Weights, gate_R1 [R, 1]
    or None, y_out [R, D] receives the result (may be x_RD's buffer: x is read first).
    """
    R, mm, F = x_RD.shape[0], x_RD.dtype, h_RH.shape[1] // 2
    hc = h_RH if h_RH.dtype == mm else buf.get("h", 2 * F, R)
    _products(x_RD, w1, hc, chunk)
    if hc is not h_RH:
        h_RH.copy_(hc)
    a = _compiled()[0](hc, gate_R1) if compiled else _act_eager(hc, gate_R1, s_RF, buf)
    return _products(a, w2, y_out, chunk)


def _chunk_backward(
    dy_RD, h_RH, s_RF, load_x, chunk, w1, w2, gate_R1, buf, dw1, dw2, dx_out, compiled, dgate_out=None
) -> tuple:
    """Gradients of _chunk_forward. dy_RD [R, D] (padding rows as x's), h_RH [R, 2F] and
    s_RF [R, F] (or None) saved (any float dtype), load_x() -> the chunk's inputs [R, D]
    (called only for dw1, after the last read of dy); dw1 [E, D, 2F] and dw2 [E, F, D]
    receive the chunk's experts' slices (or are None); dx_out [R, D] receives dx (may
    be dy's or x's buffer; None: dx is not needed); dgate_out [R] receives d loss / d
    gate (with gates). -> (dx [R, D] or None, dgate [R] or None).
    """
    R, F = dy_RD.shape[0], h_RH.shape[1] // 2
    ga = _products(dy_RD, w2, buf.get("g", F, R), chunk, transpose=True)
    if compiled:
        a, dh, dgate = _compiled()[1](h_RH, ga, gate_R1)
        if dgate_out is not None and dgate is not None:
            dgate = dgate_out.copy_(dgate)
    else:
        a, dh, dgate = _act_grads_eager(h_RH, s_RF, ga, gate_R1, buf, dgate_out)
    add = chunk.block > 0  # an expert's first token block writes its slice, later ones add
    if dw2 is not None:
        _weight_grads(a, dy_RD, dw2, chunk, add)
    if dw1 is not None:
        _weight_grads(load_x(), dh, dw1, chunk, add)
    dx = None if dx_out is None else _products(dh, w1, dx_out, chunk, transpose=True)
    return dx, dgate


def _grad_buffer(w: Tensor, mm: torch.dtype, needed: bool, plan: Plan) -> Tensor | None:
    """The weight gradient's buffer. One token block: in w's dtype, each expert's slice
    written once (zeroed first only if some expert got no slot: its gradient is an
    exact 0). Several: a zeroed accumulator in float32 (float64 for float64 products),
    so bf16 weights never sum their blocks in bf16, even where the products
    themselves run in bf16 (native-bf16 CPUs): each block's product is rounded once,
    the sum of blocks is not."""
    if not needed:
        return None
    if plan.blocks == 1:
        return torch.zeros_like(w) if plan.empty_experts else torch.empty_like(w)
    acc = torch.float64 if mm == torch.float64 else torch.float32
    return torch.zeros(w.shape, dtype=acc, device=w.device)


def _as_param(g: Tensor | None, w: Tensor) -> Tensor | None:
    return None if g is None else g.to(w.dtype)


# --- fused experts on sorted slots (run_experts "fused": also used by parallel.py) ------


class FusedSwiGLUExperts(torch.autograd.Function):
    """Runs each expert's SwiGLU on its contiguous block of sorted slots.

    The hand-written backward writes each expert's gradient slice in place; autograd
    through per-expert slicing instead materialises a full-size zero gradient for
    every expert, which costs as much as the matmuls at large E.
    """

    @staticmethod
    def forward(ctx, x_SD: Tensor, w1: Tensor, w2: Tensor, plan: Plan) -> Tensor:
        assert plan.num_slots == x_SD.shape[0], "counts must cover every slot"
        plan.index_chunks()
        D, F = x_SD.shape[1], w2.shape[1]
        dtype, mm = x_SD.dtype, matmul_dtype(x_SD.device, x_SD.dtype)
        y_SD = x_SD.new_empty(x_SD.shape[0], w2.shape[2])
        h_PH, s_PF = _saved_activations(x_SD, plan, F, plan.needs_backward)
        buf = _Scratch(plan.max_rows, mm, x_SD.device)
        w1v, w2v = _Weights(w1, dtype, mm), _Weights(w2, dtype, mm)
        for c in plan.chunks:
            x_RD = _gather(buf.get("x", D, c.n_rows), x_SD, plan.slot_P, c, buf, zero_pads=True)
            h_RH, s_RF = _chunk_saves(h_PH, s_PF, c, buf, F, mm)
            y_RD = _chunk_forward(
                x_RD, h_RH, s_RF, c, w1v, w2v, None, buf, buf.get("y", D, c.n_rows), plan.compiled
            )
            _to_slots(y_SD, y_RD, c, plan)
        ctx.save_for_backward(x_SD, w1, w2, h_PH, s_PF)
        ctx.plan = plan
        return y_SD

    @staticmethod
    def backward(ctx, dy_SD: Tensor):
        x_SD, w1, w2, h_PH, s_PF = ctx.saved_tensors
        plan = ctx.plan
        D = x_SD.shape[1]
        dtype, mm = x_SD.dtype, matmul_dtype(x_SD.device, x_SD.dtype)
        need_x, need_w1, need_w2 = ctx.needs_input_grad[:3]
        dy_SD = dy_SD.contiguous()
        dx_SD = torch.empty_like(x_SD) if need_x else None
        dw1, dw2 = _grad_buffer(w1, mm, need_w1, plan), _grad_buffer(w2, mm, need_w2, plan)
        buf = _Scratch(plan.max_rows, mm, x_SD.device)
        w1v, w2v = _Weights(w1, dtype, mm), _Weights(w2, dtype, mm)
        for c in plan.chunks:
            dy_RD = _gather(buf.get("dy", D, c.n_rows), dy_SD, plan.slot_P, c, buf, zero_pads=True)
            load_x = lambda c=c: _gather(buf.get("x", D, c.n_rows), x_SD, plan.slot_P, c, buf, zero_pads=True)  # noqa: E731
            dx_out = buf.get("y", D, c.n_rows) if need_x else None
            dx_RD, _ = _chunk_backward(
                dy_RD, h_PH[c.rows], _rows(s_PF, c), load_x, c, w1v, w2v, None, buf, dw1, dw2, dx_out,
                plan.compiled,
            )  # fmt: skip
            if dx_SD is not None:  # need_x
                _to_slots(dx_SD, dx_RD, c, plan)
        return dx_SD, _as_param(dw1, w1), _as_param(dw2, w2), None


def _saved_activations(x: Tensor, plan: Plan, F: int, save: bool) -> tuple[Tensor | None, Tensor | None]:
    """(h [P, 2F], silu(gate) [P, F] or None) in x's dtype, filled chunk by chunk and
    saved for backward; (None, None) when there is no backward (`save` False): each
    chunk then works in scratch rows. Saving silu(gate) (half of h's size) spares the
    backward its recomputation, the costliest elementwise pass (an exp per element).
    Not saved where the compiled elementwise kernels recompute it inside their one
    pass, nor where the products run in float32 for bf16 storage: there the saved bf16
    copy costs a cast each way and measured no faster (1.064 against 1.069 the limit)."""
    if not save:
        return None, None
    own_dtype = matmul_dtype(x.device, x.dtype) == x.dtype
    s_PF = x.new_empty(plan.num_rows, F) if own_dtype and not plan.compiled else None
    return x.new_empty(plan.num_rows, 2 * F), s_PF


def _chunk_saves(
    h_PH: Tensor | None, s_PF: Tensor | None, chunk: Chunk, buf: _Scratch, F: int, dtype
) -> tuple:
    """The chunk's rows of the saved (h, s), or (scratch rows of the products' dtype, None) when
    nothing is saved."""
    if h_PH is None:
        return buf.get("h saved", 2 * F, chunk.n_rows, dtype), None
    return h_PH[chunk.rows], _rows(s_PF, chunk)


def _rows(t: Tensor | None, chunk: Chunk) -> Tensor | None:
    return None if t is None else t[chunk.rows]


def _to_slots(dst_SD: Tensor, src_RD: Tensor, chunk: Chunk, plan: Plan) -> None:
    """dst[slot] = the chunk's row holding that slot (padding rows dropped)."""
    if plan.slot_P is None:
        dst_SD[chunk.rows] = src_RD
    else:
        real = chunk.real_local
        assert real is not None, "a plan with slot_P indexes every chunk's real rows"
        slots = plan.slot_P[chunk.rows].index_select(0, real)
        dst_SD.index_copy_(0, slots, src_RD.index_select(0, real).to(dst_SD.dtype))


# --- fused dispatch + experts + combine (GroupedExperts "fused") --------------------------


class _Combine:
    """Sums each chunk's rows into a [T, D] accumulator, by token.

    With `cols` (MoGE's grouped router, one group per chunk) the chunk of group g and
    token block b holds exactly the slots of columns g*cols..(g+1)*cols of ids [T, K]
    for the block's tokens, each token once per column, so the first group's chunk
    of a block writes every row of it by `cols` plain gathers (index_select) by a
    row-of-slot map (Plan.combine_rows, built once per call for forward and
    backward), and no zeroed [T, D] is needed. Every later chunk adds its rows by
    the same gathers into a buffer and an add_, or, with plan.combine_index_add
    (precision.combine_by_index_add: on CPU), by one index_add_ by the token each
    row holds: one pass instead of two, 2.3 against 0.9 ms per group at T=4096
    D=512 in bf16 on an AMX Xeon (docs/performance.md); on CUDA index_add_'s order
    is not deterministic. Chunks without `cols` always add by index_add_. Each
    token gets one add per row of it, in chunk order, either way; padding rows are
    never gathered, and add exact zeros to the token whose slot they repeat.
    """

    def __init__(self, T: int, D: int, plan: Plan, mm: torch.dtype, cols: int | None, device) -> None:
        self.T, self.D, self.plan, self.cols = T, D, plan, cols
        self.block_tokens = plan.block_tokens if plan.blocks > 1 else max(T, 1)
        # Sums in the product dtype: float32 where the products run in float32; bf16 where
        # they run natively in bf16 (as torch's own index_add_ combine and the reference
        # loop do), unless plan.combine_float32. A float32 sum there cost ~10% of the
        # layer (mixed-dtype adds and casts of [T, D]) for ~20% less output error at
        # M=8 (docs/performance.md).
        self.dtype = mm if mm in (torch.float32, torch.float64) or not plan.combine_float32 else torch.float32
        self.device = device
        self.tmp: Tensor | None = None  # one reused [block tokens, D] buffer for the gathers
        if cols:
            self.acc = torch.empty(T, D, dtype=self.dtype, device=device)  # group 0 writes every row first
            self.rows = plan.combine_rows(T, cols)
        else:
            self.acc = torch.zeros(T, D, dtype=self.dtype, device=device)

    def add(self, y_RD: Tensor, i: int, chunk: Chunk) -> None:
        """Adds chunk i's rows y_RD [R, D] (padding rows are never read, or add 0)."""
        if not self.cols or (chunk.e0 > 0 and self.plan.combine_index_add):
            assert self.plan.tok_P is not None, "Plan.bind() first"
            self.acc.index_add_(0, self.plan.tok_P[chunk.rows], y_RD.to(self.dtype))
            return
        t0 = chunk.block * self.block_tokens
        acc = self.acc[t0 : min(self.T, t0 + self.block_tokens)]
        first = chunk.e0 == 0  # the first group's chunk writes its block's rows
        for j, rows in enumerate(self.rows[i]):
            if j == 0 and first and y_RD.dtype == acc.dtype:
                torch.index_select(y_RD, 0, rows, out=acc)
            elif j == 0 and first:
                acc.copy_(y_RD.index_select(0, rows))
            else:
                if self.tmp is None or self.tmp.dtype != y_RD.dtype:
                    self.tmp = torch.empty(self.block_tokens, self.D, dtype=y_RD.dtype, device=self.device)
                acc.add_(torch.index_select(y_RD, 0, rows, out=self.tmp[: acc.shape[0]]))

    def result(self, dtype: torch.dtype) -> Tensor:
        return self.acc.to(dtype)


class FusedMoE(torch.autograd.Function):
    """y_t = sum_k w[t, k] * expert_{ids[t, k]}(x_t) in one Function.

    Chunk by chunk (a group of experts): gather the chunk's token rows, run its
    experts, add the gated outputs into y by token. No [S, D] tensor is built.
    Backward does the same with dy and writes every gradient (x, gates, both weights)
    directly. Saved: x, the pre-activations h [P, 2F] (P >= S rows, in x's dtype),
    the permutation, the row gates [P, 1] (so the backward does not gather them again).
    """

    @staticmethod
    def forward(ctx, x_TD, weights_TK, w1, w2, order_S, plan, cols):
        (T, D), K, F = x_TD.shape, weights_TK.shape[1], w2.shape[1]
        dtype, mm = x_TD.dtype, matmul_dtype(x_TD.device, x_TD.dtype)
        flat_P, tok_P = plan.bind(order_S, K)  # the flat slot t*K+k each row holds, its token
        gate_P1 = _row_gates(weights_TK, flat_P, plan, mm)
        y = _Combine(T, D, plan, mm, cols, x_TD.device)
        h_PH, s_PF = _saved_activations(x_TD, plan, F, plan.needs_backward)
        buf = _Scratch(plan.max_rows, mm, x_TD.device)
        w1v, w2v = _Weights(w1, dtype, mm), _Weights(w2, dtype, mm)
        for i, c in enumerate(plan.chunks):
            x_RD = _gather(buf.get("x", D, c.n_rows), x_TD, tok_P, c, buf)  # always a copy: tok_P indexes
            h_RH, s_RF = _chunk_saves(h_PH, s_PF, c, buf, F, mm)
            y_RD = _chunk_forward(x_RD, h_RH, s_RF, c, w1v, w2v, gate_P1[c.rows], buf, x_RD, plan.compiled)
            y.add(y_RD, i, c)
        gate_saved = gate_P1 if plan.needs_backward else None  # the backward's gates: no second gather
        ctx.save_for_backward(x_TD, weights_TK, w1, w2, order_S, h_PH, s_PF, gate_saved)
        ctx.plan, ctx.cols = plan, cols
        return y.result(dtype)

    @staticmethod
    def backward(ctx, dy_TD):
        x_TD, weights_TK, w1, w2, order_S, h_PH, s_PF, gate_P1 = ctx.saved_tensors
        plan = ctx.plan
        (T, D), K = x_TD.shape, weights_TK.shape[1]
        dtype, mm = x_TD.dtype, matmul_dtype(x_TD.device, x_TD.dtype)
        need_x, need_gate, need_w1, need_w2 = ctx.needs_input_grad[:4]
        dy_TD = dy_TD.contiguous()
        flat_P, tok_P = plan.bind(order_S, K)
        dx = _Combine(T, D, plan, mm, ctx.cols, x_TD.device) if need_x else None
        dgate_P = torch.empty(plan.num_rows, dtype=mm, device=x_TD.device)
        dw1, dw2 = _grad_buffer(w1, mm, need_w1, plan), _grad_buffer(w2, mm, need_w2, plan)
        buf = _Scratch(plan.max_rows, mm, x_TD.device)
        w1v, w2v = _Weights(w1, dtype, mm), _Weights(w2, dtype, mm)
        for i, c in enumerate(plan.chunks):
            # One [R, D] buffer holds dy, then x (after dy's last read), then dx.
            rows_RD = _gather(buf.get("x", D, c.n_rows), dy_TD, tok_P, c, buf)
            load_x = lambda c=c, b=rows_RD: _gather(b, x_TD, tok_P, c, buf)  # noqa: E731
            dx_RD, _ = _chunk_backward(
                rows_RD, h_PH[c.rows], _rows(s_PF, c), load_x, c, w1v, w2v, gate_P1[c.rows], buf, dw1, dw2,
                rows_RD if need_x else None, plan.compiled, dgate_P[c.rows],
            )  # fmt: skip
            if need_x:
                dx.add(dx_RD, i, c)
        dweights_TK = None
        if need_gate:
            if plan.real_P is not None:
                flat_P, dgate_P = flat_P.index_select(0, plan.real_P), dgate_P.index_select(0, plan.real_P)
            dweights_TK = torch.empty_like(dgate_P).index_copy_(0, flat_P, dgate_P)
            dweights_TK = dweights_TK.view(weights_TK.shape).to(weights_TK.dtype)
        return (
            dx.result(dtype) if need_x else None,
            dweights_TK,
            _as_param(dw1, w1),
            _as_param(dw2, w2),
            None,
            None,
            None,
        )


def _row_gates(weights_TK: Tensor, flat_P: Tensor, plan: Plan, mm: torch.dtype) -> Tensor:
    """The gate of the slot each row holds, [P, 1] in the product dtype (padding: 0)."""
    gate_P1 = weights_TK.reshape(-1, 1).index_select(0, flat_P).to(mm)
    if plan.pad_P is not None:
        gate_P1.index_fill_(0, plan.pad_P, 0)
    return gate_P1
