"""The fused path's plan: how one call's token-slots become chunks of rows.

Legend: T tokens, K experts per token, S = T*K token-slots (sorted by piece), E
experts, P rows of the layout (the S slots plus any padding rows).

Pure bookkeeping on the routing (a sort, a bincount, Python lists): no expert maths.
moge/kernels/fused.py runs the plan.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

# A chunk's experts run as one bmm when equalising their row counts adds at most this
# fraction of extra rows (see Plan). 0: only when the counts are already equal. On the
# AVX2 machine of docs/performance.md one mm per expert (no padding) was 4-8% faster
# for the whole layer than a bmm padded by the ~3% a balanced group needs, at both the
# small and the large benchmark shape, in fp32 and bf16 (fp32 products).
MAX_PAD_WASTE = 0.0
# Token blocks keep one chunk's float32 work buffers [rows, max(D, 2F)] near this size.
CHUNK_BYTES = 16 * 2**20


def _padded(n: int, pad: int) -> int:
    return -(-n // pad) * pad


class Chunk:
    """Consecutive experts e0..e1 (over one block of tokens) whose gather, elementwise
    and combine work runs as one op each.

    rows: the chunk's range of rows in the layout; block: its token block; experts:
    (e, local row slice, slot count) for each expert with rows; widths: the row count
    of every expert e0..e1 (0 for one without rows), for `Tensor.split`; cap: rows per
    expert when every expert of the chunk gets the same number (the products are then
    one bmm), else None (one mm each); pad_local / real_local: chunk-local indices of
    the padding rows and of the others (None when the layout has no padding, or
    until Plan.index_chunks()).
    """

    def __init__(
        self, e0: int, e1: int, block: int, rows: slice, experts: list, cap: int | None, widths: list[int]
    ) -> None:
        self.e0, self.e1, self.block, self.rows, self.experts, self.cap = e0, e1, block, rows, experts, cap
        self.widths = widths
        self.pad_local: Tensor | None = None
        self.real_local: Tensor | None = None

    @property
    def n_rows(self) -> int:
        return self.rows.stop - self.rows.start


class Plan:
    """How one call's sorted slots become chunks of rows for the products.

    The slots arrive sorted by piece: (chunk of `per_chunk` experts, token block,
    expert), tokens in order within a piece; counts[p] is piece p's slot count and
    `blocks` the number of token blocks (1: a piece is an expert). MoGELayer's chunk
    is one group, whose slots number exactly T*K/M; token blocks keep a chunk's buffers
    about the same size at any T, so they stay in cache and time stays linear in T.

    In a chunk, if giving every expert the largest expert's row count (rounded up to
    `pad`) adds at most `max_waste` of the chunk's slots plus `call_rows` per mm call
    it saves in rows beyond those of one mm per expert, its products run as one bmm
    each: a few large ops instead of E small ones. `call_rows` is the fixed cost of
    one mm call in rows of work (precision.mm_call_rows: ~0 for float32 kernels, tens
    to hundreds of rows for native bf16 ones at the toy shapes). Otherwise each
    expert's rows are rounded up to `pad` and run as one mm each (see MAX_PAD_WASTE).
    Padding rows are never written back. A padding row repeats one of its expert's own slots and has gate
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
        call_rows: float = 0.0,
    ) -> None:  # fmt: skip
        self.pad, self.per_chunk, self.num_slots = pad, per_chunk, sum(counts)
        self.blocks, self.block_tokens = blocks, block_tokens
        self.empty_experts = blocks == 1 and 0 in counts[:num_experts]  # (only needed for one block)
        self.compiled = compiled  # elementwise work through torch.compile (see _compiled)
        # Whether a backward can follow (autograd on and some input needs a gradient: known
        # only outside the Function, where grad mode is still the caller's). False: nothing
        # is saved, each chunk works in scratch rows.
        self.needs_backward = True
        self.combine_float32 = False  # combine bf16 products' outputs in float32 (see _Combine)
        self.combine_index_add = False  # groups after the first add by token (see _Combine)
        self.chunks: list[Chunk] = []
        pieces: list[tuple[int, int, int, int]] = []  # (row, slot, count, rows) of every expert with rows
        s = p = 0
        for c0 in range(0, len(counts), per_chunk):
            group, block = divmod(c0 // per_chunk, blocks)
            e0 = group * per_chunk
            part = counts[c0 : c0 + min(per_chunk, num_experts - e0)]  # the last chunk may be short
            if sum(part) == 0:
                continue
            cap = _padded(max(part), pad)
            extra = cap * len(part) - sum(_padded(n, pad) for n in part)  # rows a bmm adds
            # Every expert of a bmm chunk needs a slot of its own to repeat in its padding.
            uniform = (
                len(part) > 1
                and min(part) > 0
                and extra <= max_waste * sum(part) + (len(part) - 1) * call_rows
            )
            experts, widths, r = [], [], 0
            for i, n in enumerate(part):
                width = (_padded(n, pad) if not uniform else cap) if n else 0
                if n:
                    experts.append((e0 + i, slice(r, r + width), n))
                    pieces.append((p + r, s, n, width))
                widths.append(width)
                r, s = r + width, s + n
            self.chunks.append(
                Chunk(e0, e0 + len(part), block, slice(p, p + r), experts, cap if uniform else None, widths)
            )
            p += r
        if s != self.num_slots:  # ids >= num_experts: counted, but in no chunk's experts
            raise ValueError(
                f"expert ids: {self.num_slots - s} of {self.num_slots} slots name an expert outside "
                f"0..{num_experts - 1}"
            )
        self.num_rows = p
        self.max_rows = max((c.n_rows for c in self.chunks), default=0)
        self.slot_P: Tensor | None = None
        self.pad_P: Tensor | None = None
        self.real_P: Tensor | None = None
        self.flat_P: Tensor | None = None  # set by bind()
        self.tok_P: Tensor | None = None
        self.order_S: Tensor | None = None  # bind()'s
        self.K = 0
        self._combine_rows: list[tuple[Tensor, ...]] | None = None
        if p != self.num_slots:
            self._index_padding(pieces, device)

    def _index_padding(self, pieces: list, device: torch.device) -> None:
        """slot_P, pad_P and real_P in a fixed number of ops (pieces cover the rows in
        order: (row, slot, count, width)); chunk-local ones wait for index_chunks().

        Each is a running sum of steps of 1 from one entry to the next, but at the few
        entries where a piece or its padding starts (and 0 along slot_P's padding
        rows, which all repeat their expert's first slot): set from short lists, a
        third of the time of gathers over every row (38 against 117 us at P = 8736).
        """
        slot, real, pad = _Steps(), _Steps(), _Steps()
        num_pad = 0
        for row0, slot0, n, width in pieces:
            slot.reach(row0, slot0, slot0 + n - 1)
            real.reach(slot0, row0, row0 + n - 1)  # the rows of the piece's slots
            if width > n:
                slot.reach(row0 + n, slot0, slot0)  # its padding rows repeat slot0
                pad.reach(num_pad, row0 + n, row0 + width - 1)
                num_pad += width - n
        lists = (slot.at, slot.step, real.at, real.step, pad.at, pad.step)
        small = torch.tensor([x for v in lists for x in v], dtype=torch.long).split([len(v) for v in lists])
        slot_at, slot_step, real_at, real_step, pad_at, pad_step = small
        real_P = _running_sum(self.num_slots, real_at, real_step)
        pad_P = _running_sum(num_pad, pad_at, pad_step)
        slot_P = _running_sum(self.num_rows, slot_at, slot_step, zero_Z=pad_P)
        self.slot_P, self.real_P, self.pad_P = slot_P, real_P, pad_P
        if device.type != "cpu":
            self.slot_P, self.real_P, self.pad_P = (t.to(device) for t in (slot_P, real_P, pad_P))

    def index_chunks(self) -> None:
        """Every chunk's pad_local / real_local (run_experts' path needs them)."""
        if self.pad_P is None or self.chunks[0].real_local is not None:
            return
        assert self.real_P is not None
        sizes_real = [sum(n for _, _, n in c.experts) for c in self.chunks]
        sizes_pad = [c.n_rows - k for c, k in zip(self.chunks, sizes_real)]
        for c, real, pad in zip(self.chunks, self.real_P.split(sizes_real), self.pad_P.split(sizes_pad)):
            c.real_local, c.pad_local = real - c.rows.start, pad - c.rows.start

    def bind(self, order_S: Tensor, K: int) -> tuple[Tensor, Tensor]:
        """(flat_P, tok_P): the flat slot t*K+k and the token each row holds, from the
        sort's order_S [S]; computed once per call, for forward and backward."""
        if self.flat_P is None:
            self.flat_P, self.order_S = self.rows_of(order_S), order_S
            # (a shift where K is a power of 2: int64 // is ~5x slower, and flat_P >= 0)
            self.tok_P = self.flat_P >> (K.bit_length() - 1) if K & (K - 1) == 0 else self.flat_P // K
            self.K = K
        assert self.tok_P is not None
        return self.flat_P, self.tok_P

    def combine_rows(self, T: int, cols: int) -> list[tuple[Tensor, ...]]:
        """For every chunk (one group g, one token block), the chunk-local row that holds
        column g*cols + j of each of its block's tokens, j = 0..cols-1; with
        combine_index_add, () for the chunks of the groups after the first, which
        _Combine adds by token instead."""
        if self._combine_rows is None:
            assert self.flat_P is not None, "bind() first"
            assert self.order_S is not None
            # Real row real_P[s] holds sorted slot s, flat slot order_S[s] (with no padding,
            # row s). The flat slots are distinct: scatter_, 2x faster than index_copy_ here.
            order_S, device = self.order_S, self.order_S.device
            rows_S = self.real_P if self.real_P is not None else torch.arange(self.num_rows, device=device)
            rows_TK = torch.empty(T * self.K, dtype=torch.long, device=device)
            rows_TK = rows_TK.scatter_(0, order_S, rows_S).view(T, self.K)
            tokens = self.block_tokens if self.blocks > 1 else max(T, 1)
            self._combine_rows = []
            for c in self.chunks:
                if c.e0 > 0 and self.combine_index_add:
                    self._combine_rows.append(())
                    continue
                g, t0 = c.e0 // self.per_chunk, c.block * tokens
                local = rows_TK[t0 : t0 + tokens, g * cols : (g + 1) * cols] - c.rows.start
                self._combine_rows.append(local.T.contiguous().unbind(0))
        return self._combine_rows

    def rows_of(self, by_slot: Tensor) -> Tensor:
        """A per-slot vector [S, ...] laid out by row [P, ...] (padding rows: slot 0's)."""
        return by_slot if self.slot_P is None else by_slot.index_select(0, self.slot_P)


class _Steps:
    """A running sum (from 0) as the entries at[i] where it does not step by 1 from
    the entry before, and its steps there; last: the value reached so far."""

    def __init__(self) -> None:
        self.at: list[int] = []
        self.step: list[int] = []
        self.last = 0

    def reach(self, i: int, value: int, last: int) -> None:
        """Entry i holds value; the entries after it step on (by 1, or 0 along zero_Z
        of _running_sum) to `last`."""
        if value != self.last + 1:
            self.at.append(i)
            self.step.append(value - self.last)
        self.last = last


def _running_sum(n: int, at_I: Tensor, step_I: Tensor, zero_Z: Tensor | None = None) -> Tensor:
    """[n] int64: the running sum of steps of 1, but 0 at zero_Z and step_I at at_I
    (which wins where both name an entry)."""
    steps = torch.ones(n, dtype=torch.long)
    if zero_Z is not None:
        steps.index_fill_(0, zero_Z, 0)
    return steps.index_put_((at_I,), step_I).cumsum_(0)


def expert_slices(counts: list[int]):
    """(expert, its slice of the sorted slots) for every expert that received slots."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, slice(start, start + n)
        start += n


def token_blocks(T: int, rows_per_token: float, width: int, budget_bytes: int) -> tuple[int, int]:
    """(tokens per block, blocks) so that a chunk's [rows, width] float32 buffers stay
    near budget_bytes, a chunk holding rows_per_token slots per token on average."""
    tokens = max(1, int(budget_bytes / (4 * width * max(rows_per_token, 1e-9))))
    tokens = min(tokens, max(T, 1))
    return tokens, max(1, -(-T // tokens))


def sort_pieces(ids_TK: Tensor, num_experts: int, per_chunk: int, block_tokens: int, blocks: int) -> tuple:
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
    counts = torch.bincount(key_S, minlength=chunks * blocks * per_chunk).tolist()
    return stable_order(key_S, len(counts)), counts


def stable_order(key_S: Tensor, bound: int) -> Tensor:
    """key_S.argsort(stable=True) of keys in 0..bound-1 -> order_S [S] int64.

    On CPU, for bound <= 2**15, numpy's stable sort of a uint8/int16 copy instead: a
    radix sort, linear in S, the same order; 5-12x faster than torch's at S = 8192..65536
    on one thread of an AVX-512 EPYC (13 against 67-140 us at S = 8192).
    """
    if key_S.device.type != "cpu" or bound > 2**15 or key_S.dim() != 1:
        return key_S.argsort(stable=True)
    small = key_S.to(torch.uint8 if bound <= 2**8 else torch.int16)
    return torch.from_numpy(np.argsort(small.numpy(), kind="stable")).to(torch.long)


def default_chunk(num_experts: int) -> int:
    """Experts per chunk when the caller sets none: a quarter of them (MoGELayer sets one group)."""
    return max(1, num_experts // 4)


def columns_per_chunk(ids_TK: Tensor, per_chunk: int, num_experts: int) -> int | None:
    """K' when column k of ids_TK always holds an expert of chunk k // K' (MoGE's
    grouped router with one group per chunk: K' = K / M), else None."""
    K = ids_TK.shape[1]
    chunks = num_experts // per_chunk
    if num_experts % per_chunk or K % chunks:
        return None
    cols = K // chunks
    if ids_TK.shape[0] == 0:  # (no ids: every column holds only its chunk's)
        return cols
    # Column k holds chunk k // cols only iff its least and largest ids do (floor
    # division keeps order): one pass over ids_TK, then 2K numbers on the host.
    lo_K, hi_K = (v.tolist() for v in torch.aminmax(ids_TK, dim=0))
    fits = all(lo // per_chunk == hi // per_chunk == k // cols for k, (lo, hi) in enumerate(zip(lo_K, hi_K)))
    return cols if fits else None
