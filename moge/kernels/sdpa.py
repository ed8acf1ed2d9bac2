"""Grouped-query scaled dot-product attention that picks the faster CPU path for bf16/fp16.

Legend: B batch, H query heads, N key/value heads (H a multiple of N, R = H / N query
heads per KV head), L queries, S keys, C head width, G = B*N.

Keys and values come with their N heads: query head h reads KV head h // R, and no
[B, H, S, C] copy of them is made (F.scaled_dot_product_attention's enable_gqa, or R
query heads stacked on one KV head below), so the backward has no sum over R copies
either: the attention core measured 8.8 against 9.9 ms in float32 and 7.5 against 9.8
ms in bf16 at [16, 4 (2 KV), 128, 32] (forward + backward, one thread), results equal.

torch's fused CPU attention (the flash kernel F.scaled_dot_product_attention picks
there) was measured 2-3.5x slower than three plain ops in bf16 at the toy configs'
shapes (forward + backward, [16, 4, 128, 32] and [16, 4, 256, 64], AMD EPYC with
AVX512-BF16, one thread; docs/performance.md), while it is the fastest in float32.
So on CPU in bf16/fp16 the attention is two bf16 matmuls around a softmax (computed in
float32 inside the kernel), as long as the [B, H, L, S] scores stay small; everything
else goes to torch's kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Largest B*H*L*S for which the plain path materialises the scores (float32: 256 MB).
MAX_SCORES = 2**26
# Below this many scores torch's kernel is faster: one decoding step at batch 1 (S = 40-96
# keys, [1, 4 (2 KV), 1, 32]) took 30-36 us there against 83-120 us for the three bf16 ops
# (their fixed cost), while at batch 16 the three ops won (154-182 against 225-464 us).
MIN_SCORES = 1024


def _keep_mask(
    attn_mask: torch.Tensor | None, is_causal: bool, L: int, S: int, device
) -> torch.Tensor | None:
    """The [L, S] boolean mask (True: may attend) that attn_mask / is_causal describe."""
    if is_causal:
        return torch.ones(L, S, dtype=torch.bool, device=device).tril()
    return attn_mask


def scaled_dot_product_attention(
    q_BHLC: torch.Tensor,
    k_BNSC: torch.Tensor,
    v_BNSC: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """F.scaled_dot_product_attention(q, k, v, attn_mask, is_causal, enable_gqa=True),
    scale C**-0.5.

    q [B, H, L, C], k and v [B, N, S, C] with N dividing H. attn_mask: None, a boolean
    [L, S] (True: may attend) or one per sequence, [B, 1, L, S] (torch's kernel, e.g. left
    padding); is_causal: top-left causal mask (L == S).
    -> [B, H, L, C] in q's dtype.
    """
    B, H, L, C = q_BHLC.shape
    N, S = k_BNSC.shape[1], k_BNSC.shape[2]
    if H % N:
        raise ValueError(f"n_heads: {H} query heads are not a multiple of the {N} key/value heads")
    low = q_BHLC.dtype in (torch.bfloat16, torch.float16)
    per_sequence = attn_mask is not None and attn_mask.dim() > 2  # the plain path takes [L, S]
    if (
        q_BHLC.device.type != "cpu"
        or not low
        or per_sequence
        or not MIN_SCORES <= B * H * L * S <= MAX_SCORES
    ):
        return F.scaled_dot_product_attention(
            q_BHLC, k_BNSC, v_BNSC, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=H != N
        )
    # The R query heads of one KV head are R*L rows against the same S keys: [G, R*L, S]
    # scores, query head n*R + r at rows r*L .. r*L + L - 1 of group n.
    R = H // N
    q_GMC = q_BHLC.reshape(B * N, R * L, C)
    k_GSC, v_GSC = k_BNSC.reshape(B * N, S, C), v_BNSC.reshape(B * N, S, -1)
    keep_LS = _keep_mask(attn_mask, is_causal, L, S, q_BHLC.device)
    # The scale is applied inside the product (alpha), before its float32 accumulator is
    # rounded; softmax of bf16 computes in float32 inside the kernel. The mask enters as
    # an additive 0 / -inf bias of the same product (beta=1): no masked_fill pass over the
    # scores forward, none over their gradient backward (softmax's is 0 there already).
    if keep_LS is None:
        bias, beta = q_GMC.new_empty(B * N, R * L, S), 0.0
    else:
        bias = torch.zeros(L, S, dtype=q_BHLC.dtype, device=q_BHLC.device).masked_fill_(
            ~keep_LS, float("-inf")
        )
        bias, beta = bias.repeat(R, 1), 1.0
    scores_GMS = torch.baddbmm(bias, q_GMC, k_GSC.transpose(1, 2), beta=beta, alpha=C**-0.5)
    return (scores_GMS.softmax(dim=-1) @ v_GSC).view(B, H, L, -1)
