import pytest
import torch
from expert_cases import grouped_ids

from moge.kernels.fused_plan import Plan, columns_per_chunk, sort_pieces, stable_order, token_blocks


def test_plan_uses_one_bmm_per_balanced_chunk_and_pads_rows():
    counts = [5, 7, 2, 6, 3, 3]
    uniform = Plan(counts, 6, 1, 3, 100.0, torch.device("cpu"))
    assert [c.cap for c in uniform.chunks] == [7, 6]  # the largest count of each chunk
    assert uniform.num_rows == 3 * 7 + 3 * 6 and uniform.pad_P.numel() == uniform.num_rows - sum(counts)
    # Every real row holds its own sorted slot, each slot exactly once; padding rows
    # repeat a slot of their own expert (expert 2: rows 14..20, slots 12..13).
    real = uniform.slot_P[uniform.real_P]
    assert torch.equal(real.sort().values, torch.arange(sum(counts)))
    assert set(uniform.slot_P[14:21].tolist()) == {12, 13}
    ragged = Plan(counts, 6, 4, 3, 0.0, torch.device("cpu"))
    assert [c.cap for c in ragged.chunks] == [None, None]
    assert ragged.num_rows == 8 + 8 + 4 + 8 + 4 + 4
    exact = Plan(counts, 6, 1, 2, 0.0, torch.device("cpu"))
    assert exact.slot_P is None and exact.num_rows == sum(counts)  # no copies, no padding
    # A balanced chunk goes to bmm under the default waste bound; a lopsided one, or one
    # with an expert that got no slot, does not.
    assert Plan([10, 11, 1, 30], 4, 1, 2, 0.25, torch.device("cpu")).chunks[0].cap == 11
    assert Plan([10, 11, 1, 30], 4, 1, 2, 0.25, torch.device("cpu")).chunks[1].cap is None
    assert Plan([10, 0, 9, 9], 4, 1, 2, 100.0, torch.device("cpu")).chunks[0].cap is None


def test_columns_per_chunk_only_for_group_aligned_ids():
    gen = torch.Generator().manual_seed(0)
    ids = grouped_ids(20, 8, 4, 4, gen)
    assert columns_per_chunk(ids, 2, 8) == 1
    assert columns_per_chunk(ids, 4, 8) == 2  # two groups per chunk
    assert columns_per_chunk(ids, 3, 8) is None  # chunks cut across groups
    assert columns_per_chunk(ids[:, [1, 0, 2, 3]], 2, 8) is None  # columns out of group order


def test_sort_pieces_orders_by_chunk_then_block_then_expert():
    # 6 tokens, K=2, 4 experts in chunks of 2, token blocks of 3 tokens.
    ids = torch.tensor([[0, 3], [1, 2], [0, 2], [1, 3], [0, 3], [1, 2]])
    order, counts = sort_pieces(ids, 4, 2, 3, 2)
    flat = ids.reshape(-1)
    chunk, block, expert = flat[order] // 2, order // (2 * 3), flat[order] % 2
    key = (chunk * 2 + block) * 2 + expert
    assert torch.equal(key, key.sort().values)  # sorted by (chunk, block, expert)
    for k in range(len(key)):  # token order kept inside a piece (stable)
        if k and key[k] == key[k - 1]:
            assert order[k] > order[k - 1]
    # counts[p]: slots of piece p = (chunk, block, expert) in that order.
    assert counts == [2, 1, 1, 2, 2, 1, 1, 2]  # e.g. chunk 0, block 0: expert 0 has tokens 0 and 2
    assert sum(counts) == ids.numel()
    # One block: plain stable sort by expert.
    order1, counts1 = sort_pieces(ids, 4, 2, 6, 1)
    assert (
        torch.equal(order1, flat.argsort(stable=True))
        and counts1 == torch.bincount(flat, minlength=4).tolist()
    )


def test_token_blocks_keep_buffers_near_the_budget():
    # 1 row per token, 256 columns of float32: 1 KiB per token.
    assert token_blocks(10_000, 1.0, 256, 64 * 1024) == (64, 157)
    assert token_blocks(10, 1.0, 256, 64 * 1024) == (10, 1)  # never more than T
    assert token_blocks(0, 1.0, 256, 64 * 1024) == (1, 1)


def _padding_by_loop(plan, pieces):
    """slot_P and the real-row mask built row by row (what _index_padding vectorises)."""
    slot_P = torch.zeros(plan.num_rows, dtype=torch.long)
    real_P = torch.zeros(plan.num_rows, dtype=torch.bool)
    for row, slot, n, width in pieces:
        for j in range(width):
            slot_P[row + j] = slot + j if j < n else slot
            real_P[row + j] = j < n
    return slot_P, real_P


def _pieces(plan):
    """(row, first slot, count, width) of every expert with slots, in row order; the
    sorted slots follow the same order (sort_pieces)."""
    pieces, slot = [], 0
    for c in plan.chunks:
        for _, rows, n in c.experts:
            pieces.append((c.rows.start + rows.start, slot, n, rows.stop - rows.start))
            slot += n
    return pieces


@pytest.mark.parametrize("pad,waste", [(1, 0.0), (4, 0.0), (8, 100.0), (3, 0.5)])
def test_padding_indices_match_a_row_by_row_construction(pad, waste):
    gen = torch.Generator().manual_seed(pad)
    counts = torch.randint(0, 9, (12,), generator=gen).tolist()
    counts[4] = 0  # an expert without slots
    plan = Plan(counts, 12, pad, 3, waste, torch.device("cpu"))
    if plan.slot_P is None:
        assert plan.num_rows == sum(counts)
        return
    slot_P, real_P = _padding_by_loop(plan, _pieces(plan))
    assert torch.equal(plan.slot_P, slot_P)
    assert torch.equal(plan.real_P, real_P.nonzero().squeeze(1))
    assert torch.equal(plan.pad_P, (~real_P).nonzero().squeeze(1))
    plan.index_chunks()
    for c in plan.chunks:
        local = real_P[c.rows]
        assert torch.equal(c.real_local, local.nonzero().squeeze(1))
        assert torch.equal(c.pad_local, (~local).nonzero().squeeze(1))


def test_bmm_when_the_mm_calls_it_saves_cost_more_than_its_padding():
    cpu = torch.device("cpu")
    counts = [10, 12, 9, 11]  # one chunk of 4: a bmm pads every expert to 12 rows, 6 more
    assert Plan(counts, 4, 1, 4, 0.0, cpu).chunks[0].cap is None  # no call cost: one mm each
    assert Plan(counts, 4, 1, 4, 0.0, cpu, call_rows=2.0).chunks[0].cap == 12  # 6 <= 3 * 2
    assert Plan(counts, 4, 1, 4, 0.0, cpu, call_rows=1.9).chunks[0].cap is None  # 6 > 3 * 1.9
    # Padded to 4 rows, one mm per expert already runs 12 + 12 + 12 + 12: a bmm adds nothing.
    assert Plan(counts, 4, 4, 4, 0.0, cpu).chunks[0].cap == 12
    # Still never with an expert that has no slot (it has no slot to repeat).
    assert Plan([10, 0, 9, 11], 4, 1, 4, 0.0, cpu, call_rows=1e9).chunks[0].cap is None


@pytest.mark.parametrize("pad,blocks", [(1, 1), (4, 1), (1, 3), (4, 3)])
@pytest.mark.parametrize("index_add", [False, True])
def test_combine_rows_point_at_the_rows_holding_each_tokens_columns(pad, blocks, index_add):
    gen = torch.Generator().manual_seed(pad + blocks)
    T, E, M, K = 23, 8, 4, 8  # two columns per group
    ids = grouped_ids(T, E, M, K, gen)
    per_chunk, cols = E // M, K // M
    block_tokens = -(-T // blocks)
    order, counts = sort_pieces(ids, E, per_chunk, block_tokens, blocks)
    plan = Plan(counts, E, pad, per_chunk, 0.0, torch.device("cpu"), blocks=blocks, block_tokens=block_tokens)
    plan.combine_index_add = index_add
    flat_P, tok_P = plan.bind(order, K)
    assert torch.equal(tok_P, flat_P // K)
    rows = plan.combine_rows(T, cols)
    assert len(rows) == len(plan.chunks)
    gathered = [(c, per_col) for c, per_col in zip(plan.chunks, rows) if c.e0 == 0 or not index_add]
    assert len(gathered) == (blocks if index_add else len(plan.chunks))  # index_add: group 0's only
    assert all(per_col == () for c, per_col in zip(plan.chunks, rows) if c.e0 > 0 and index_add)
    for c, per_col in gathered:
        g, t0 = c.e0 // per_chunk, c.block * block_tokens
        tokens = torch.arange(t0, min(T, t0 + block_tokens))
        assert len(per_col) == cols
        for j, local in enumerate(per_col):
            # The row of chunk c at `local` holds slot t*K + g*cols + j of token t.
            assert torch.equal(flat_P[c.rows][local], tokens * K + g * cols + j)


def _keys(name, bound, gen):
    """Sort keys in 0..bound-1 of one shape of routing."""
    S = 4099
    if name == "random":
        return torch.randint(0, bound, (S,), generator=gen)
    if name == "one key":  # every slot on one expert
        return torch.full((S,), bound - 1)
    if name == "one key, a few others":
        key = torch.full((S,), bound // 2)
        key[torch.randint(0, S, (7,), generator=gen)] = torch.randint(0, bound, (7,), generator=gen)
        return key
    if name == "sorted":
        return torch.randint(0, bound, (S,), generator=gen).sort().values
    if name == "reversed":
        return torch.randint(0, bound, (S,), generator=gen).sort(descending=True).values
    if name == "one slot":
        return torch.tensor([bound - 1])
    assert name == "no slot"
    return torch.zeros(0, dtype=torch.long)


@pytest.mark.parametrize(
    "name", ["random", "one key", "one key, a few others", "sorted", "reversed", "one slot", "no slot"]
)
@pytest.mark.parametrize("bound", [1, 2, 16, 256, 257, 2**15, 2**15 + 1])
def test_stable_order_is_torchs_stable_argsort(name, bound):
    # uint8 keys up to 256, int16 up to 2**15, torch's own sort above (2**15 + 1).
    key = _keys(name, bound, torch.Generator().manual_seed(bound))
    order = stable_order(key, bound)
    assert order.dtype == torch.long and torch.equal(order, key.argsort(stable=True))


def _sort_pieces_by_formula(ids, E, per_chunk, block_tokens, blocks):
    """sort_pieces as first written: torch's stable argsort of the piece key."""
    T, K = ids.shape
    flat = ids.reshape(-1)
    block = torch.arange(T * K) // (K * block_tokens)
    key = ((flat // per_chunk) * blocks + block) * per_chunk + flat % per_chunk if blocks > 1 else flat
    counts = torch.bincount(key, minlength=-(-E // per_chunk) * blocks * per_chunk)
    return key.argsort(stable=True), counts.tolist()


@pytest.mark.parametrize("T,blocks", [(1, 1), (2, 2), (300, 1), (300, 3), (301, 7), (2048, 1), (2048, 4)])
@pytest.mark.parametrize("routing", ["grouped", "one expert", "no expert 5"])
def test_sort_pieces_keeps_the_order_of_a_stable_argsort(T, blocks, routing):
    gen = torch.Generator().manual_seed(T + blocks)
    E, M, K = 16, 4, 4
    ids = grouped_ids(T, E, M, K, gen)
    if routing == "one expert":  # (not MoGE's routing: every slot on expert 6)
        ids = torch.full_like(ids, 6)
    elif routing == "no expert 5":
        ids = torch.where(ids == 5, 4, ids)
    block_tokens = -(-T // blocks)
    for per_chunk in (4, 3, 16):  # group chunks; chunks across groups, one short; one chunk
        order, counts = sort_pieces(ids, E, per_chunk, block_tokens, blocks)
        want_order, want_counts = _sort_pieces_by_formula(ids, E, per_chunk, block_tokens, blocks)
        assert torch.equal(order, want_order) and counts == want_counts


# (counts, pad, per_chunk, max_waste, call_rows): bmm chunks, one mm each, experts with one
# slot, without slots, a chunk with one expert's slots only, one expert per chunk.
PADDED = [
    ([502, 469, 509, 568, 491, 525, 542, 490, 559, 509, 498, 482, 468, 535, 556, 489], 16, 4, 0.0, 69.2),
    ([502, 469, 509, 568, 491, 525, 542, 490, 559, 509, 498, 482, 468, 535, 556, 489], 16, 4, 0.0, 0.0),
    ([1, 1, 2, 1, 0, 1, 1, 1], 4, 2, 100.0, 0.0),
    ([1, 0, 0, 1, 9, 0, 0, 0, 0, 3, 3, 3], 8, 3, 100.0, 0.0),
    ([0, 0, 41, 0, 0, 0, 0, 0], 8, 4, 0.0, 0.0),
    ([7, 1, 9], 4, 1, 0.0, 0.0),
    ([17], 16, 1, 0.0, 0.0),
]


@pytest.mark.parametrize("counts,pad,per_chunk,waste,call_rows", PADDED)
def test_padding_indices_of_adversarial_counts_match_a_row_by_row_construction(
    counts, pad, per_chunk, waste, call_rows
):
    plan = Plan(counts, len(counts), pad, per_chunk, waste, torch.device("cpu"), call_rows=call_rows)
    assert plan.num_rows > sum(counts)  # (every case pads)
    slot_P, real_P = _padding_by_loop(plan, _pieces(plan))
    assert torch.equal(plan.slot_P, slot_P)
    assert torch.equal(plan.real_P, real_P.nonzero().squeeze(1))
    assert torch.equal(plan.pad_P, (~real_P).nonzero().squeeze(1))


def test_padding_indices_of_token_blocks_match_a_row_by_row_construction():
    # 3 token blocks: pieces of one expert in every block, blocks of a chunk in a row.
    gen = torch.Generator().manual_seed(3)
    counts = torch.randint(0, 30, (3 * 12,), generator=gen).tolist()
    counts[5] = counts[20] = 1
    counts[7] = 0
    plan = Plan(counts, 12, 8, 4, 0.0, torch.device("cpu"), blocks=3, block_tokens=10, call_rows=20.0)
    assert len(plan.chunks) == 9 and any(c.cap for c in plan.chunks)
    slot_P, real_P = _padding_by_loop(plan, _pieces(plan))
    assert torch.equal(plan.slot_P, slot_P)
    assert torch.equal(plan.real_P, real_P.nonzero().squeeze(1))
    assert torch.equal(plan.pad_P, (~real_P).nonzero().squeeze(1))


def _columns_by_formula(ids, per_chunk, E):
    """columns_per_chunk as first written: every id compared with its column's chunk."""
    K, chunks = ids.shape[1], E // per_chunk
    if E % per_chunk or K % chunks:
        return None
    cols = K // chunks
    return cols if bool((ids // per_chunk == torch.arange(K) // cols).all()) else None


@pytest.mark.parametrize("T", [0, 1, 2, 37])
def test_columns_per_chunk_agrees_with_an_id_by_id_check(T):
    gen = torch.Generator().manual_seed(T)
    E, M, K = 8, 4, 8
    ids = grouped_ids(T, E, M, K, gen) if T else torch.zeros(0, K, dtype=torch.long)
    cases = [ids, ids[:, [1, 0] + list(range(2, K))]]
    for t, k, e in [(0, 0, 2), (T - 1, K - 1, 5), (T // 2, 3, 0), (0, 5, 7), (T - 1, 2, -1), (0, 6, 8)]:
        if T:  # one id of another chunk (or out of range) in one column, at its first/last row
            moved = ids.clone()
            moved[t, k] = e
            cases.append(moved)
    for case in cases:
        for per_chunk in (1, 2, 4, 3, 8):
            assert columns_per_chunk(case, per_chunk, E) == _columns_by_formula(case, per_chunk, E)


def _combine_rows_by_formula(plan, T, cols):
    """Plan.combine_rows' row-of-slot map [T, K] as first written (index_copy_ of rows)."""
    flat_P, rows_P = plan.flat_P, torch.arange(plan.num_rows)
    if plan.real_P is not None:
        flat_P, rows_P = flat_P.index_select(0, plan.real_P), plan.real_P
    return torch.empty(T * plan.K, dtype=torch.long).index_copy_(0, flat_P, rows_P).view(T, plan.K)


@pytest.mark.parametrize("K", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("pad", [1, 4])
def test_bind_and_combine_rows_match_their_formulas_for_any_k(K, pad):
    gen = torch.Generator().manual_seed(K * pad)
    T, E = 19, 12
    M = 1 if K in (1, 3) else 2
    ids = grouped_ids(T, E, M, K, gen)
    per_chunk, cols = E // M, K // M
    order, counts = sort_pieces(ids, E, per_chunk, T, 1)
    plan = Plan(counts, E, pad, per_chunk, 0.0, torch.device("cpu"))
    assert (plan.slot_P is None) == (pad == 1)
    flat_P, tok_P = plan.bind(order, K)
    assert torch.equal(flat_P, plan.rows_of(order)) and torch.equal(tok_P, flat_P // K)
    rows_TK = _combine_rows_by_formula(plan, T, cols)
    for c, per_col in zip(plan.chunks, plan.combine_rows(T, cols)):
        g = c.e0 // per_chunk
        want = (rows_TK[:, g * cols : (g + 1) * cols] - c.rows.start).T
        assert torch.equal(torch.stack(per_col), want)
