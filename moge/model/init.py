"""A counter-based normal init: any piece of a parameter, with the whole one's values.

The value at flat position i of a parameter `name` (row-major over its whole shape)
depends only on (seed, name, i): position i lies in block b = i // n (n = block_numel,
fixed by the whole shape), and block b is std * N(0, 1) drawn by a torch.Generator
seeded from (seed, name, b). A piece of the parameter (a rank's shard under
moge.distributed, or the whole tensor in one process) is filled by drawing only the
blocks it overlaps, one at a time, so its values are exactly those of the whole tensor
at its positions, whatever the world size or mesh, and the extra memory is one block.

The blocks are drawn on the CPU (torch's mt19937 and normal_, which do not depend on the
thread count) and copied to the piece's device.

Legend: G the whole parameter's shape, P the piece's shape, O the piece's offset in G.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn

BLOCK_NUMEL = 1 << 20  # elements per block (4 MiB of float32): the most one fill draws beyond its piece

# (name, parameter) -> (the tensor to fill, the whole parameter's shape, the piece's offset
# there); see MoGETransformer.init_weights.
Locate = Callable[[str, Tensor], tuple[Tensor, Sequence[int] | None, Sequence[int] | None]]


def block_numel(whole_numel: int) -> int:
    """Elements per block of a parameter: BLOCK_NUMEL, or the whole parameter if smaller."""
    return max(1, min(BLOCK_NUMEL, whole_numel))


def block_seed(seed: int, name: str, block: int) -> int:
    """The Generator seed of block `block` of parameter `name` (a stable 64-bit hash)."""
    digest = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def draw_seed() -> int:
    """A seed from torch's default CPU generator (also under a meta default device):
    torch.manual_seed(s) fixes it."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64, device="cpu"))


def _runs(
    whole_G: Sequence[int], piece_P: Sequence[int], offset_O: Sequence[int]
) -> Iterator[tuple[int, int]]:
    """(flat start in the whole tensor, length) of the piece's contiguous runs, in the
    piece's row-major order: the dimensions after the last cut one are whole, so each
    run spans them."""
    if math.prod(piece_P) == 0:
        return
    cut = [d for d in range(len(whole_G)) if piece_P[d] != whole_G[d]]
    if not cut:
        yield 0, math.prod(whole_G)
        return
    k = cut[-1]
    strides = [math.prod(whole_G[d + 1 :]) for d in range(len(whole_G))]
    length = piece_P[k] * strides[k]
    for index in itertools.product(*(range(offset_O[d], offset_O[d] + piece_P[d]) for d in range(k))):
        yield sum(i * s for i, s in zip(index, strides)) + offset_O[k] * strides[k], length


@torch.no_grad()
def fill_normal_(
    piece: Tensor,
    seed: int,
    name: str,
    std: float,
    whole_G: Sequence[int] | None = None,
    offset_O: Sequence[int] | None = None,
) -> Tensor:
    """Fill `piece` with the counter-based N(0, std^2) values of parameter `name` at its
    positions in the whole parameter (module docstring); returns piece.

    piece [P]: the piece, at offset_O [len(G)] of a whole parameter of shape whole_G
    (None: the piece is the whole parameter).
    """
    whole_G = tuple(piece.shape) if whole_G is None else tuple(whole_G)
    offset_O = (0,) * len(whole_G) if offset_O is None else tuple(offset_O)
    assert len(whole_G) == piece.dim() == len(offset_O), "a piece is a box of the whole tensor"
    assert all(o >= 0 and o + p <= g for o, p, g in zip(offset_O, piece.shape, whole_G)), "inside the whole"
    n = block_numel(math.prod(whole_G))
    out = piece if piece.is_contiguous() else torch.empty_like(piece, memory_format=torch.contiguous_format)
    flat = out.view(-1)
    cached: tuple[int, Tensor] | None = None  # consecutive runs often share a block
    pos = 0
    for start, length in _runs(whole_G, tuple(piece.shape), offset_O):
        for b in range(start // n, (start + length - 1) // n + 1):
            if cached is None or cached[0] != b:
                gen = torch.Generator().manual_seed(block_seed(seed, name, b))
                cached = (b, torch.empty(n, dtype=torch.float32).normal_(0.0, std, generator=gen))
            lo, hi = max(start, b * n), min(start + length, (b + 1) * n)
            flat[pos : pos + hi - lo].copy_(cached[1][lo - b * n : hi - b * n])
            pos += hi - lo
    assert pos == piece.numel(), "the runs cover the piece"
    if out is not piece:
        piece.copy_(out)
    return piece


def init_buffers(module: nn.Module, device: torch.device | str | None = None) -> None:
    """Call init_buffers(device) of every sub-module that has one (module included):
    after a meta-device build and to_empty, buffers hold no values until this runs."""
    for m in module.modules():
        method = getattr(m, "init_buffers", None)
        if callable(method):
            method(device)
