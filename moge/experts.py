"""SwiGLU experts: a dense one, and E routed ones stored as stacked weight tensors.

Legend: T tokens, K experts per token, S = T*K token-slots (sorted by expert),
D d_model, F expert hidden, H = 2F (gate and up projections, fused), E experts,
P rows of the fused path's layout (the S slots plus any padding rows), R rows of one
chunk of experts (a slice of P).

The fused path (the default on CPU) cuts the experts into chunks (MoGELayer: one
group each), gathers a chunk's token rows into scratch buffers, runs its products
(one bmm per product when the chunk's experts have similar loads, else one mm per
expert), and adds the gated outputs back by token; backward is written by hand and
writes every gradient directly. See _Plan, _FusedMoE and docs/performance.md.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F_
from einops import rearrange
from torch import Tensor, nn

EXPERT_IMPLS = ("auto", "fused", "grouped_mm", "loop")

# bf16 matmuls on CPUs with native support (AMX, AVX512-BF16) build a kernel per new
# row count; rounding every expert's rows up to a multiple of this keeps a few shapes.
PAD_ROWS_NATIVE_LOW_PRECISION = 128
# A chunk's experts run as one bmm when equalising their row counts adds at most this
# fraction of extra rows (see _Plan).
MAX_PAD_WASTE = 0.25
# Token blocks keep one chunk's float32 work buffers [rows, max(D, 2F)] near this size.
CHUNK_BYTES = 16 * 2**20


# --- which dtype the matrix products run in ------------------------------------------


@functools.lru_cache(maxsize=None)
def _cpu_has_native(dtype: torch.dtype) -> bool:
    mkldnn = torch.ops.mkldnn
    if dtype == torch.bfloat16:
        return bool(mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(mkldnn._is_mkldnn_fp16_supported())
    return True


def matmul_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the expert products run in for tensors stored in `dtype`.

    A CPU without bf16/fp16 matrix instructions falls back to a scalar loop in
    torch (measured 10-90x slower than float32 here, depending on the layout), so
    there the products run in float32 on up-cast operands: the same maths as a bf16
    kernel that accumulates in float32, with storage and outputs still in `dtype`.
    """
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not _cpu_has_native(dtype):
        return torch.float32
    return dtype


def default_pad_rows(device: torch.device, dtype: torch.dtype) -> int:
    """Row multiple for per-expert products: 128 for native low-precision CPU kernels, else 1."""
    low = dtype in (torch.bfloat16, torch.float16)
    if device.type == "cpu" and low and matmul_dtype(device, dtype) == dtype:
        return PAD_ROWS_NATIVE_LOW_PRECISION
    return 1


def _linear(x: Tensor, w: Tensor) -> Tensor:
    """F.linear that honours `matmul_dtype` (and autocast's dtype) for the product."""
    dtype = x.dtype
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
    mm = matmul_dtype(x.device, dtype)
    if mm == dtype:
        return F_.linear(x, w)
    with torch.autocast(device_type=x.device.type, enabled=False):
        # Round to the compute dtype first, so the result is that of a bf16 kernel.
        return F_.linear(x.to(dtype).to(mm), w.to(dtype).to(mm)).to(dtype)


class SwiGLU(nn.Module):
    """Dense SwiGLU FFN, no bias: down(silu(gate(x)) * up(x)), gate and up fused.

    Used for the shared experts (added unweighted) and for dense blocks.
    """

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.w_gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w_down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., D] -> [..., D]."""
        gate, up = _linear(x, self.w_gate_up.weight).chunk(2, dim=-1)
        return _linear(F_.silu(gate) * up, self.w_down.weight)


# --- the plan: experts in chunks, rows laid out for the products ---------------------------


def _padded(n: int, pad: int) -> int:
    return -(-n // pad) * pad


class _Chunk:
    """Consecutive experts e0..e1 (over one block of tokens) whose gather, elementwise
    and combine work runs as one op each.

    rows: the chunk's range of rows in the layout; block: its token block; experts:
    (e, local row slice, slot count) for each expert with rows; cap: rows per expert
    when every expert of the chunk gets the same number (the products are then one
    bmm), else None (one mm each); pad_local / real_local: chunk-local indices of the
    padding rows and of the others (None when the layout has no padding).
    """

    def __init__(self, e0: int, e1: int, block: int, rows: slice, experts: list, cap: Optional[int]) -> None:
        self.e0, self.e1, self.block, self.rows, self.experts, self.cap = e0, e1, block, rows, experts, cap
        self.pad_local: Optional[Tensor] = None
        self.real_local: Optional[Tensor] = None

    @property
    def n_rows(self) -> int:
        return self.rows.stop - self.rows.start


class _Plan:
    """How one call's sorted slots become chunks of rows for the products.

    The slots arrive sorted by piece: (chunk of `per_chunk` experts, token block,
    expert), tokens in order within a piece; counts[p] is piece p's slot count and
    `blocks` the number of token blocks (1: a piece is an expert). MoGELayer's chunk
    is one group, whose slots number exactly T*K/M; token blocks keep a chunk's buffers
    about the same size at any T, so they stay in cache and time stays linear in T.

    In a chunk, if giving every expert the largest expert's row count (rounded up to
    `pad`) adds at most `max_waste` of extra rows, its products run as one bmm each: a
    few large ops instead of E small ones, which matters most when other processes
    share the cores (every parallel op can stall on a descheduled thread). Otherwise
    each expert's rows are rounded up to `pad` and run as one mm each. Padding rows are
    never written back. A padding row repeats one of its expert's own slots and has gate
    0, so everything it adds is an exact 0 (as long as that slot's values are finite;
    a non-finite slot makes its expert's results non-finite anyway); where there are no
    gates (run_experts) padding rows are zeroed instead.

    slot_P [P]: the sorted slot each row holds (for padding rows: the repeated one;
    None when rows are the sorted slots themselves); pad_P, real_P: padding rows and
    the others.
    """

    def __init__(
        self, counts: list[int], num_experts: int, pad: int, per_chunk: int, max_waste: float,
        device: torch.device, compiled: bool = False, blocks: int = 1, block_tokens: int = 0,
    ) -> None:  # fmt: skip
        self.pad, self.per_chunk, self.num_slots = pad, per_chunk, sum(counts)
        self.blocks, self.block_tokens = blocks, block_tokens
        self.empty_experts = blocks == 1 and 0 in counts[:num_experts]  # (only needed for one block)
        self.compiled = compiled  # elementwise work through torch.compile (see _compiled)
        self.chunks: list[_Chunk] = []
        pieces: list[tuple[int, int, int, int]] = []  # (row, slot, count, rows) of every expert with rows
        s = p = 0
        for c0 in range(0, len(counts), per_chunk):
            group, block = divmod(c0 // per_chunk, blocks)
            e0 = group * per_chunk
            part = counts[c0 : c0 + min(per_chunk, num_experts - e0)]  # the last chunk may be short
            if sum(part) == 0:
                continue
            cap = _padded(max(part), pad)
            # Every expert of a bmm chunk needs a slot of its own to repeat in its padding.
            uniform = len(part) > 1 and min(part) > 0 and cap * len(part) <= (1 + max_waste) * sum(part)
            experts, r = [], 0
            for i, n in enumerate(part):
                width = _padded(n, pad) if not uniform else cap
                if n:
                    experts.append((e0 + i, slice(r, r + width), n))
                    pieces.append((p + r, s, n, width))
                r, s = r + width, s + n
            self.chunks.append(_Chunk(e0, e0 + len(part), block, slice(p, p + r), experts, cap if uniform else None))
            p += r
        self.num_rows = p
        self.max_rows = max((c.n_rows for c in self.chunks), default=0)
        self.slot_P: Optional[Tensor] = None
        self.pad_P: Optional[Tensor] = None
        if p != self.num_slots:
            self._index_padding(pieces, device)

    def _index_padding(self, pieces: list, device: torch.device) -> None:
        real_P = torch.zeros(self.num_rows, dtype=torch.bool)
        slot_P = torch.zeros(self.num_rows, dtype=torch.long)
        for row, slot, n, width in pieces:
            real_P[row : row + n] = True
            slot_P[row : row + n] = torch.arange(slot, slot + n)
            slot_P[row + n : row + width] = slot  # padding repeats one of the expert's own slots
        self.slot_P, self.pad_P = slot_P.to(device), (~real_P).nonzero().squeeze(1).to(device)
        self.real_P = real_P.nonzero().squeeze(1).to(device)
        for c in self.chunks:
            local = real_P[c.rows]
            c.pad_local = (~local).nonzero().squeeze(1).to(device)
            c.real_local = local.nonzero().squeeze(1).to(device)

    def rows_of(self, by_slot: Tensor) -> Tensor:
        """A per-slot vector [S, ...] laid out by row [P, ...] (padding rows: slot 0's)."""
        return by_slot if self.slot_P is None else by_slot.index_select(0, self.slot_P)


def _token_blocks(T: int, rows_per_token: float, width: int, budget_bytes: int) -> tuple[int, int]:
    """(tokens per block, blocks) so that a chunk's [rows, width] float32 buffers stay
    near budget_bytes, a chunk holding rows_per_token slots per token on average."""
    tokens = max(1, int(budget_bytes / (4 * width * max(rows_per_token, 1e-9))))
    tokens = min(tokens, max(T, 1))
    return tokens, max(1, -(-T // tokens))


def _sort_pieces(ids_TK: Tensor, num_experts: int, per_chunk: int, block_tokens: int, blocks: int) -> tuple:
    """Slots sorted by (chunk of experts, token block, expert), stable (token order
    within a piece). -> (order_S [S] flat slot indices, counts per piece: list)."""
    T, K = ids_TK.shape
    flat_S = ids_TK.reshape(-1)
    if blocks == 1:
        key_S = flat_S
    else:
        block_S = torch.arange(T * K, device=ids_TK.device) // (K * block_tokens)
        key_S = ((flat_S // per_chunk) * blocks + block_S) * per_chunk + flat_S % per_chunk
    chunks = -(-num_experts // per_chunk)
    counts = torch.bincount(key_S, minlength=chunks * blocks * per_chunk)
    return key_S.argsort(stable=True), counts.tolist()


class _Scratch:
    """Per-call work buffers of one chunk's rows, reused chunk after chunk.

    Created on first use, uninitialised: every user writes the rows it reads.
    Sized by the largest chunk, so they stay a fraction of the [S, *] tensors and are
    not returned to the OS between chunks (fresh large temporaries page-fault).
    """

    def __init__(self, rows: int, dtype: torch.dtype, device: torch.device) -> None:
        self.n_rows, self.dtype, self.device = rows, dtype, device
        self._bufs: dict[str, Tensor] = {}

    def get(self, name: str, cols: int, rows: int) -> Tensor:
        """The first `rows` rows of the [max rows, cols] buffer called `name`."""
        buf = self._bufs.get(name)
        if buf is None:
            buf = self._bufs[name] = torch.empty(self.n_rows, cols, dtype=self.dtype, device=self.device)
        return buf[:rows]


def _gather(buf: Tensor, src: Tensor, index_P: Optional[Tensor], chunk: _Chunk, zero_pads: bool = False) -> Tensor:
    """The chunk's rows of src in buf's dtype: src[index_P[row]] (index None: src is
    already laid out by row), padding rows zeroed if zero_pads. A view of src when no
    copy is needed.
    """
    if index_P is None:
        part = src[chunk.rows]
        if part.dtype == buf.dtype:
            return part
        buf.copy_(part)
    elif src.dtype == buf.dtype:
        torch.index_select(src, 0, index_P[chunk.rows], out=buf)
    else:
        buf.copy_(src.index_select(0, index_P[chunk.rows]))
    if zero_pads and chunk.pad_local is not None and chunk.pad_local.numel():
        buf.index_fill_(0, chunk.pad_local, 0)
    return buf


def _weights(w: Tensor, chunk: _Chunk, e: Optional[int], dtype: torch.dtype, mm: torch.dtype) -> Tensor:
    """Expert e's weight (e None: the chunk's experts stacked), rounded to the compute
    dtype, in the product dtype."""
    part = w[chunk.e0 : chunk.e1] if e is None else w[e]
    return part.to(dtype).to(mm)


def _products(a: Tensor, w: Tensor, out: Tensor, chunk: _Chunk, dtype, mm, transpose: bool = False) -> Tensor:
    """out[rows of e] = a[rows of e] @ w[e] (or w[e].T) for every expert of the chunk."""
    if chunk.cap is not None:
        n, cap = chunk.e1 - chunk.e0, chunk.cap
        w_stack = _weights(w, chunk, None, dtype, mm)
        w_stack = w_stack.transpose(1, 2) if transpose else w_stack
        torch.bmm(a.view(n, cap, a.shape[1]), w_stack, out=out.view(n, cap, out.shape[1]))
        return out
    for e, rows, _ in chunk.experts:
        w_e = _weights(w, chunk, e, dtype, mm)
        torch.mm(a[rows], w_e.T if transpose else w_e, out=out[rows])
    return out


def _weight_grads(a: Tensor, b: Tensor, dw: Tensor, chunk: _Chunk, add: bool) -> None:
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
    for e, rows, _ in chunk.experts:
        a_e, b_e = a[rows].T, b[rows]
        if add and same:
            dw[e].addmm_(a_e, b_e)
        elif same:
            torch.mm(a_e, b_e, out=dw[e])
        elif add:
            dw[e].add_(a_e @ b_e)
        else:
            dw[e].copy_(a_e @ b_e)


# --- the elementwise work of a chunk: eager in-place ops, or one compiled kernel each --------


def _act_eager(h_RH: Tensor, gate_R1: Optional[Tensor], buf: _Scratch) -> Tensor:
    """a = silu(gate) * up (* g): [R, 2F] -> [R, F] in a scratch buffer."""
    R, F = h_RH.shape[0], h_RH.shape[1] // 2
    a = torch.ops.aten.silu.out(h_RH[:, :F], out=buf.get("a", F, R))
    a.mul_(h_RH[:, F:])
    if gate_R1 is not None:
        # Scaling the [R, F] activations is cheaper than the [R, D] output when F < D.
        a.mul_(gate_R1)
    return a


def _act_grads_eager(h_RH: Tensor, ga_RF: Tensor, gate_R1: Optional[Tensor], buf: _Scratch) -> tuple:
    """From the pre-activations h (any float dtype) and ga = d loss / d(a * g) per unit
    gate: (a * g [R, F], dh [R, 2F], d loss / d g [R] or None), in scratch buffers of
    ga's dtype (ga is overwritten)."""
    R, F = h_RH.shape[0], h_RH.shape[1] // 2
    gate, up = h_RH[:, :F], h_RH[:, F:]  # mixed-dtype ops below read bf16 h directly
    dh, a = buf.get("h", 2 * F, R), buf.get("a", F, R)
    # dh's up half holds silu(gate) first.
    if gate.dtype == dh.dtype:
        s = torch.ops.aten.silu.out(gate, out=dh[:, F:])
    else:  # silu.out wants one dtype
        s = F_.silu(dh[:, F:].copy_(gate), inplace=True)
    torch.mul(s, up, out=a)
    dgate = None
    if gate_R1 is not None:
        dgate = torch.linalg.vecdot(a, ga_RF)
        a.mul_(gate_R1)
        ga_RF.mul_(gate_R1)
    s.mul_(ga_RF)  # d loss / d up
    torch.ops.aten.silu_backward.grad_input(ga_RF.mul_(up), gate, grad_input=dh[:, :F])
    return a, dh, dgate


def _act_pure(h_RH: Tensor, gate_R1: Optional[Tensor]) -> Tensor:
    """_act_eager without buffers, for torch.compile (one fused kernel)."""
    F = h_RH.shape[1] // 2
    a = F_.silu(h_RH[:, :F]) * h_RH[:, F:]
    return a if gate_R1 is None else a * gate_R1


def _act_grads_pure(h_RH: Tensor, ga_RF: Tensor, gate_R1: Optional[Tensor]) -> tuple:
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


@functools.lru_cache(maxsize=None)
def _compiled() -> tuple:
    """(act, act_grads) compiled once per process, dynamic in the row count."""
    return torch.compile(_act_pure, dynamic=True), torch.compile(_act_grads_pure, dynamic=True)


# --- one chunk's SwiGLUs, shared by both fused Functions ------------------------------------


def _chunk_forward(x_RD, h_RH, chunk, w1, w2, gate_R1, buf, dtype, y_out, compiled) -> Tensor:
    """Every expert of the chunk: (silu(gate) * up) * g @ w2, [gate | up] = x @ w1.

    x_RD [R, D] the chunk's rows (padding rows: zero, or repeats with gate 0), h_RH [R, 2F] receives the
    pre-activations (saved for backward, storage dtype), gate_R1 [R, 1] or None,
    y_out [R, D] receives the result (may be x_RD's buffer: x is read first).
    """
    R, mm, F = x_RD.shape[0], x_RD.dtype, w2.shape[1]
    hc = h_RH if h_RH.dtype == mm else buf.get("h", 2 * F, R)
    _products(x_RD, w1, hc, chunk, dtype, mm)
    if hc is not h_RH:
        h_RH.copy_(hc)
    a = _compiled()[0](hc, gate_R1) if compiled else _act_eager(hc, gate_R1, buf)
    return _products(a, w2, y_out, chunk, dtype, mm)


def _chunk_backward(dy_RD, h_RH, load_x, chunk, w1, w2, gate_R1, buf, dtype, dw1, dw2, dx_out, compiled) -> tuple:
    """Gradients of _chunk_forward. dy_RD [R, D] (padding rows as x's), h_RH [R, 2F] saved
    (any float dtype), load_x() -> the chunk's inputs [R, D] (called only for dw1, after
    the last read of dy); dw1 [E, D, 2F] and dw2 [E, F, D] receive the chunk's experts'
    slices (or are None); dx_out [R, D] receives dx (may be dy's or x's buffer; None:
    dx is not needed). -> (dx [R, D] or None, dgate [R] or None).
    """
    R, mm, F = dy_RD.shape[0], dy_RD.dtype, w2.shape[1]
    ga = _products(dy_RD, w2, buf.get("g", F, R), chunk, dtype, mm, transpose=True)
    if compiled:
        a, dh, dgate = _compiled()[1](h_RH, ga, gate_R1)
    else:
        a, dh, dgate = _act_grads_eager(h_RH, ga, gate_R1, buf)
    add = chunk.block > 0  # an expert's first token block writes its slice, later ones add
    if dw2 is not None:
        _weight_grads(a, dy_RD, dw2, chunk, add)
    if dw1 is not None:
        _weight_grads(load_x(), dh, dw1, chunk, add)
    dx = None if dx_out is None else _products(dh, w1, dx_out, chunk, dtype, mm, transpose=True)
    return dx, dgate


def _grad_buffer(w: Tensor, mm: torch.dtype, needed: bool, plan: _Plan) -> Optional[Tensor]:
    """The weight gradient's buffer. One token block: in w's dtype, each expert's slice
    written once (zeroed first only if some expert got no slot: its gradient is an
    exact 0). Several: a zeroed accumulator in the product dtype, so bf16 weights do
    not sum their blocks in bf16."""
    if not needed:
        return None
    if plan.blocks == 1:
        return torch.zeros_like(w) if plan.empty_experts else torch.empty_like(w)
    return torch.zeros(w.shape, dtype=mm, device=w.device)


def _as_param(g: Optional[Tensor], w: Tensor) -> Optional[Tensor]:
    return None if g is None else g.to(w.dtype)


def _accumulator(like: Tensor, mm: torch.dtype) -> Tensor:
    """A zeroed sum in float32 (float64 stays float64): a token's K slots add up here."""
    return torch.zeros(like.shape, dtype=torch.float64 if mm == torch.float64 else torch.float32, device=like.device)


# --- fused experts on sorted slots (run_experts "fused": also used by parallel.py) ------


class _FusedSwiGLUExperts(torch.autograd.Function):
    """Runs each expert's SwiGLU on its contiguous block of sorted slots.

    The hand-written backward writes each expert's gradient slice in place; autograd
    through per-expert slicing instead materialises a full-size zero gradient for
    every expert, which costs as much as the matmuls at large E.
    """

    @staticmethod
    def forward(ctx, x_SD: Tensor, w1: Tensor, w2: Tensor, plan: _Plan) -> Tensor:
        assert plan.num_slots == x_SD.shape[0], "counts must cover every slot"
        D, F = x_SD.shape[1], w2.shape[1]
        dtype, mm = x_SD.dtype, matmul_dtype(x_SD.device, x_SD.dtype)
        y_SD = x_SD.new_empty(x_SD.shape[0], w2.shape[2])
        h_PH = x_SD.new_empty(plan.num_rows, 2 * F)
        buf = _Scratch(plan.max_rows, mm, x_SD.device)
        for c in plan.chunks:
            x_RD = _gather(buf.get("x", D, c.n_rows), x_SD, plan.slot_P, c, zero_pads=True)
            y_RD = _chunk_forward(x_RD, h_PH[c.rows], c, w1, w2, None, buf, dtype, buf.get("y", D, c.n_rows), plan.compiled)
            _to_slots(y_SD, y_RD, c, plan)
        ctx.save_for_backward(x_SD, w1, w2, h_PH)
        ctx.plan = plan
        return y_SD

    @staticmethod
    def backward(ctx, dy_SD: Tensor):
        x_SD, w1, w2, h_PH = ctx.saved_tensors
        plan = ctx.plan
        D = x_SD.shape[1]
        dtype, mm = x_SD.dtype, matmul_dtype(x_SD.device, x_SD.dtype)
        need_x, need_w1, need_w2 = ctx.needs_input_grad[:3]
        dy_SD = dy_SD.contiguous()
        dx_SD = torch.empty_like(x_SD) if need_x else None
        dw1, dw2 = _grad_buffer(w1, mm, need_w1, plan), _grad_buffer(w2, mm, need_w2, plan)
        buf = _Scratch(plan.max_rows, mm, x_SD.device)
        for c in plan.chunks:
            dy_RD = _gather(buf.get("dy", D, c.n_rows), dy_SD, plan.slot_P, c, zero_pads=True)
            load_x = lambda c=c: _gather(buf.get("x", D, c.n_rows), x_SD, plan.slot_P, c, zero_pads=True)  # noqa: E731
            dx_out = buf.get("y", D, c.n_rows) if need_x else None
            dx_RD, _ = _chunk_backward(
                dy_RD, h_PH[c.rows], load_x, c, w1, w2, None, buf, dtype, dw1, dw2, dx_out, plan.compiled
            )
            if need_x:
                _to_slots(dx_SD, dx_RD, c, plan)
        return dx_SD, _as_param(dw1, w1), _as_param(dw2, w2), None


def _to_slots(dst_SD: Tensor, src_RD: Tensor, chunk: _Chunk, plan: _Plan) -> None:
    """dst[slot] = the chunk's row holding that slot (padding rows dropped)."""
    if plan.slot_P is None:
        dst_SD[chunk.rows] = src_RD
    else:
        slots = plan.slot_P[chunk.rows].index_select(0, chunk.real_local)
        dst_SD.index_copy_(0, slots, src_RD.index_select(0, chunk.real_local).to(dst_SD.dtype))


# --- fused dispatch + experts + combine (GroupedExperts "fused") --------------------------


class _Combine:
    """Sums each chunk's rows into a [T, D] float32 accumulator, by token.

    With `cols` (MoGE's grouped router, one group per chunk) the chunk of group g and
    token block b holds exactly the slots of columns g*cols..(g+1)*cols of ids [T, K]
    for the block's tokens, each token once per column, so adding its rows is `cols`
    plain gathers (index_select) by a row-of-slot map. Else index_add_, whose scatter
    kernel is much more exposed to other processes on the cores (measured 1 ms or 80
    ms for the same call, depending on the load).
    """

    def __init__(self, T: int, D: int, K: int, flat_P: Tensor, plan: _Plan, mm: torch.dtype, cols: Optional[int]) -> None:
        self.T, self.D, self.K, self.plan, self.cols = T, D, K, plan, cols
        self.block_tokens = plan.block_tokens if plan.blocks > 1 else max(T, 1)
        self.dtype = torch.float64 if mm == torch.float64 else torch.float32
        self.device = flat_P.device
        self.tmp: Optional[Tensor] = None  # one reused [block tokens, D] buffer for the gathers
        if cols:
            self.acc = torch.empty(T, D, dtype=self.dtype, device=self.device)  # group 0 writes every row first
            rows_P = torch.arange(plan.num_rows, device=self.device)
            if plan.pad_P is not None:
                flat_P, rows_P = flat_P.index_select(0, plan.real_P), plan.real_P
            self.rows_TK = torch.empty(T * K, dtype=torch.long, device=self.device).index_copy_(0, flat_P, rows_P).view(T, K)
        else:
            self.acc = torch.zeros(T, D, dtype=self.dtype, device=self.device)
            self.tok_P = flat_P // K

    def add(self, y_RD: Tensor, chunk: _Chunk) -> None:
        if not self.cols:
            self.acc.index_add_(0, self.tok_P[chunk.rows], y_RD.to(self.dtype))  # padding rows add 0
            return
        g = chunk.e0 // self.plan.per_chunk
        t0 = chunk.block * self.block_tokens
        t1 = min(self.T, t0 + self.block_tokens)
        acc = self.acc[t0:t1]
        for k in range(g * self.cols, (g + 1) * self.cols):
            rows = self.rows_TK[t0:t1, k] - chunk.rows.start
            if k == 0 and y_RD.dtype == acc.dtype:
                torch.index_select(y_RD, 0, rows, out=acc)
            elif k == 0:
                acc.copy_(y_RD.index_select(0, rows))
            else:
                if self.tmp is None or self.tmp.dtype != y_RD.dtype:
                    self.tmp = torch.empty(self.block_tokens, self.D, dtype=y_RD.dtype, device=self.device)
                acc.add_(torch.index_select(y_RD, 0, rows, out=self.tmp[: t1 - t0]))

    def result(self, dtype: torch.dtype) -> Tensor:
        return self.acc.to(dtype)


class _FusedMoE(torch.autograd.Function):
    """y_t = sum_k w[t, k] * expert_{ids[t, k]}(x_t) in one Function.

    Chunk by chunk (a group of experts): gather the chunk's token rows, run its
    experts, add the gated outputs into y by token. No [S, D] tensor is built.
    Backward does the same with dy and writes every gradient (x, gates, both weights)
    directly. Saved: x, the pre-activations h [P, 2F] (P >= S rows, in x's dtype),
    the permutation.
    """

    @staticmethod
    def forward(ctx, x_TD, weights_TK, w1, w2, order_S, plan, cols):
        (T, D), K, F = x_TD.shape, weights_TK.shape[1], w2.shape[1]
        dtype, mm = x_TD.dtype, matmul_dtype(x_TD.device, x_TD.dtype)
        flat_P = plan.rows_of(order_S)  # the flat slot t*K+k each row holds
        tok_P = flat_P // K
        gate_P1 = _row_gates(weights_TK, flat_P, plan, mm)
        y = _Combine(T, D, K, flat_P, plan, mm, cols)
        h_PH = x_TD.new_empty(plan.num_rows, 2 * F)
        buf = _Scratch(plan.max_rows, mm, x_TD.device)
        for c in plan.chunks:
            x_RD = _gather(buf.get("x", D, c.n_rows), x_TD, tok_P, c)  # always a copy: tok_P indexes
            y.add(_chunk_forward(x_RD, h_PH[c.rows], c, w1, w2, gate_P1[c.rows], buf, dtype, x_RD, plan.compiled), c)
        ctx.save_for_backward(x_TD, weights_TK, w1, w2, order_S, h_PH)
        ctx.plan, ctx.cols = plan, cols
        return y.result(dtype)

    @staticmethod
    def backward(ctx, dy_TD):
        x_TD, weights_TK, w1, w2, order_S, h_PH = ctx.saved_tensors
        plan = ctx.plan
        (T, D), K = x_TD.shape, weights_TK.shape[1]
        dtype, mm = x_TD.dtype, matmul_dtype(x_TD.device, x_TD.dtype)
        need_x, need_gate, need_w1, need_w2 = ctx.needs_input_grad[:4]
        dy_TD = dy_TD.contiguous()
        flat_P = plan.rows_of(order_S)
        tok_P = flat_P // K
        gate_P1 = _row_gates(weights_TK, flat_P, plan, mm)
        dx = _Combine(T, D, K, flat_P, plan, mm, ctx.cols) if need_x else None
        dgate_P = torch.empty(plan.num_rows, dtype=mm, device=x_TD.device)
        dw1, dw2 = _grad_buffer(w1, mm, need_w1, plan), _grad_buffer(w2, mm, need_w2, plan)
        buf = _Scratch(plan.max_rows, mm, x_TD.device)
        for c in plan.chunks:
            # One [R, D] buffer holds dy, then x (after dy's last read), then dx.
            rows_RD = _gather(buf.get("x", D, c.n_rows), dy_TD, tok_P, c)
            load_x = lambda c=c, b=rows_RD: _gather(b, x_TD, tok_P, c)  # noqa: E731
            dx_RD, dgate_P[c.rows] = _chunk_backward(
                rows_RD, h_PH[c.rows], load_x, c, w1, w2, gate_P1[c.rows], buf, dtype, dw1, dw2,
                rows_RD if need_x else None, plan.compiled,
            )  # fmt: skip
            if need_x:
                dx.add(dx_RD, c)
        dweights_TK = None
        if need_gate:
            if plan.pad_P is not None:
                flat_P, dgate_P = flat_P.index_select(0, plan.real_P), dgate_P.index_select(0, plan.real_P)
            dweights_TK = torch.empty_like(dgate_P).index_copy_(0, flat_P, dgate_P)
            dweights_TK = dweights_TK.view(weights_TK.shape).to(weights_TK.dtype)
        return dx.result(dtype) if need_x else None, dweights_TK, _as_param(dw1, w1), _as_param(dw2, w2), None, None, None


def _row_gates(weights_TK: Tensor, flat_P: Tensor, plan: _Plan, mm: torch.dtype) -> Tensor:
    """The gate of the slot each row holds, [P, 1] in the product dtype (padding: 0)."""
    gate_P1 = weights_TK.reshape(-1, 1).index_select(0, flat_P).to(mm)
    if plan.pad_P is not None:
        gate_P1.index_fill_(0, plan.pad_P, 0)
    return gate_P1


# --- other paths ---------------------------------------------------------------------


def _slices(counts: list[int]):
    """(expert, row slice) for every expert that received token-slots."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, slice(start, start + n)
        start += n


def _loop_experts(x_SD: Tensor, w1: Tensor, w2: Tensor, counts: list[int]) -> Tensor:
    """The plain per-expert loop through autograd: correct, simple, slow backward."""
    F = w2.shape[1]
    outs = []
    for e, rows in _slices(counts):
        gate, up = (x_SD[rows] @ w1[e]).split(F, dim=-1)
        outs.append((F_.silu(gate) * up) @ w2[e])
    return torch.cat(outs) if outs else x_SD.new_zeros(0, w2.shape[2])


def _grouped_mm_experts(x_SD: Tensor, w1: Tensor, w2: Tensor, counts_E: Tensor) -> Tensor:
    """Two calls of torch._grouped_mm (one kernel each on CUDA; a loop inside torch on CPU)."""
    offs = counts_E.cumsum(0).to(torch.int32)
    F = w2.shape[1]
    h_SH = torch._grouped_mm(x_SD, w1, offs=offs)
    act = F_.silu(h_SH[:, :F]) * h_SH[:, F:]
    return torch._grouped_mm(act, w2, offs=offs)


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """"auto": grouped_mm on CUDA in bf16 (a real grouped kernel), else the fused path."""
    if impl not in EXPERT_IMPLS:
        raise ValueError(f"expert_impl: expected one of {', '.join(EXPERT_IMPLS)}; got {impl!r}")
    if impl != "auto":
        return impl
    if device.type == "cuda" and dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm"):
        return "grouped_mm"
    return "fused"


def run_experts(
    x_SD: Tensor, w1: Tensor, w2: Tensor, counts_E: Tensor, impl: str,
    pad_rows: Optional[int] = None, experts_per_chunk: Optional[int] = None,
) -> Tensor:  # fmt: skip
    """Each expert's SwiGLU on its block of sorted slots. x_SD [S, D] -> [S, D].

    Fused only: pad_rows is the row multiple of the per-expert products (None:
    `default_pad_rows` for x's device and dtype); experts_per_chunk how many
    consecutive experts share one pass of the elementwise work (None: E // 4).
    """
    impl = resolve_impl(impl, x_SD.device, x_SD.dtype)
    if impl == "grouped_mm":
        return _grouped_mm_experts(x_SD, w1, w2, counts_E)
    counts = counts_E.tolist()
    if impl == "loop":
        return _loop_experts(x_SD, w1, w2, counts)
    pad = pad_rows or default_pad_rows(x_SD.device, x_SD.dtype)
    plan = _Plan(counts, len(counts), pad, experts_per_chunk or _default_chunk(len(counts)), MAX_PAD_WASTE, x_SD.device)
    return _FusedSwiGLUExperts.apply(x_SD, w1, w2, plan)


def _default_chunk(num_experts: int) -> int:
    return max(1, num_experts // 4)


def sort_slots(ids_TK: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """Token-slots grouped by expert. ids_TK [T, K] -> (order_S, counts_E).

    order_S [S] int64: the flat slot index t*K+k of the s-th sorted slot (stable, so
    within an expert slots keep token order); counts_E [E] int64 slots per expert.
    """
    flat_S = ids_TK.reshape(-1)
    return flat_S.argsort(stable=True), torch.bincount(flat_S, minlength=num_experts)


def _columns_per_chunk(ids_TK: Tensor, per_chunk: int, num_experts: int) -> Optional[int]:
    """K' when column k of ids_TK always holds an expert of chunk k // K' (MoGE's
    grouped router with one group per chunk: K' = K / M), else None."""
    K = ids_TK.shape[1]
    chunks = num_experts // per_chunk
    if num_experts % per_chunk or K % chunks:
        return None
    cols = K // chunks
    expected_K = torch.arange(K, device=ids_TK.device) // cols
    return cols if bool((ids_TK // per_chunk == expected_K).all()) else None


# --- the module ----------------------------------------------------------------------


class GroupedExperts(nn.Module):
    """E SwiGLU experts as stacked tensors, with sort-based dispatch and combine.

    w_gate_up_EDH [E, D, 2F] (gate columns first, then up), w_down_EFD [E, F, D].
    Fused path knobs (plain attributes, not saved):
    - pad_rows: row multiple of the per-expert products (None: `default_pad_rows` for
      the input's device and dtype);
    - experts_per_chunk: how many consecutive experts share one pass of the gather,
      elementwise and combine work (None: E // 4; MoGELayer sets one group's experts);
    - max_pad_waste: a chunk runs as one bmm per product when equalising its experts'
      row counts adds at most this fraction of rows (0: always one mm per expert);
    - chunk_bytes: token blocks keep a chunk's float32 work buffers near this size;
    - compile_elementwise: run the SwiGLU's elementwise work through torch.compile
      (one fused kernel each way; the first call compiles for tens of seconds).
    """

    def __init__(self, num_experts: int, d_model: int, hidden: int, impl: str = "auto") -> None:
        super().__init__()
        resolve_impl(impl, torch.device("cpu"), torch.float32)  # validates the name
        self.num_experts, self.d_model, self.hidden, self.impl = num_experts, d_model, hidden, impl
        self.pad_rows: Optional[int] = None
        self.experts_per_chunk: Optional[int] = None
        self.max_pad_waste = MAX_PAD_WASTE
        self.chunk_bytes = CHUNK_BYTES
        self.compile_elementwise = False
        self.w_gate_up_EDH = nn.Parameter(torch.empty(num_experts, d_model, 2 * hidden))
        self.w_down_EFD = nn.Parameter(torch.empty(num_experts, hidden, d_model))

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.w_gate_up_EDH, std=std)
        nn.init.normal_(self.w_down_EFD, std=std)

    @property
    def params_per_expert(self) -> int:
        return 3 * self.d_model * self.hidden

    def _fused_plan(self, ids_TK: Tensor, D: int, device: torch.device, dtype: torch.dtype) -> tuple:
        """(order_S, plan, cols) of the fused path for this call's routing."""
        E = self.num_experts
        per_chunk = self.experts_per_chunk or _default_chunk(E)
        T, K = ids_TK.shape
        width = max(D, 2 * self.hidden)
        block_tokens, blocks = _token_blocks(T, K * per_chunk / E, width, self.chunk_bytes)
        order_S, counts = _sort_pieces(ids_TK, E, per_chunk, block_tokens, blocks)
        pad = self.pad_rows or default_pad_rows(device, dtype)
        plan = _Plan(counts, E, pad, per_chunk, self.max_pad_waste, device, self.compile_elementwise, blocks, block_tokens)
        return order_S, plan, _columns_per_chunk(ids_TK, per_chunk, E)

    def _sorted_path(self, x_TD: Tensor, order_S: Tensor, counts_E: Tensor, weights_TK: Tensor, impl: str) -> Tensor:
        """Gather sorted slots, run_experts, gather back to token order, weighted sum."""
        K = weights_TK.shape[1]
        dtype = x_TD.dtype
        x_SD = x_TD.index_select(0, order_S // K)
        w1, w2 = self.w_gate_up_EDH.to(dtype), self.w_down_EFD.to(dtype)
        y_SD = run_experts(x_SD, w1, w2, counts_E, impl, self.pad_rows, self.experts_per_chunk)
        # Back to token order: sorted slot s is flat slot order_S[s], so invert the permutation.
        inverse_S = torch.empty_like(order_S)
        inverse_S[order_S] = torch.arange(order_S.numel(), device=order_S.device)
        y_TKD = rearrange(y_SD.index_select(0, inverse_S), "(t k) d -> t k d", k=K)
        return torch.einsum("tk,tkd->td", weights_TK.to(dtype), y_TKD)

    def forward(self, x_TD: Tensor, ids_TK: Tensor, weights_TK: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """y_t = sum_k weights[t, k] * expert_{ids[t, k]}(x_t).

        x_TD [T, D], ids_TK [T, K] int64, weights_TK [T, K] -> y_TD [T, D] in `dtype`
        (the compute dtype; default x's). Slots are sorted by expert id (stable) and
        each expert runs on its block; "fused" does dispatch, experts and combine in
        one autograd Function with a hand-written backward.
        """
        dtype = dtype or x_TD.dtype
        x_TD = x_TD.to(dtype)
        impl = resolve_impl(self.impl, x_TD.device, dtype)
        if impl != "fused":
            order_S, counts_E = sort_slots(ids_TK, self.num_experts)
            return self._sorted_path(x_TD, order_S, counts_E, weights_TK, impl)
        order_S, plan, cols = self._fused_plan(ids_TK, x_TD.shape[1], x_TD.device, dtype)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return _FusedMoE.apply(x_TD, weights_TK, self.w_gate_up_EDH, self.w_down_EFD, order_S, plan, cols)
