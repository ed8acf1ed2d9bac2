"""Scaled dot-product attention that picks the faster CPU path for bf16/fp16.

Legend: B batch, H heads, L queries, S keys, C head width.

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


def scaled_dot_product_attention(
    q_BHLC: torch.Tensor,
    k_BHSC: torch.Tensor,
    v_BHSC: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """F.scaled_dot_product_attention(q, k, v, attn_mask, is_causal) with scale C**-0.5.

    attn_mask: None or a boolean [L, S] (True: may attend); is_causal: top-left causal
    mask (L == S). -> [B, H, L, C] in q's dtype.
    """
    B, H, L, C = q_BHLC.shape
    S = k_BHSC.shape[2]
    low = q_BHLC.dtype in (torch.bfloat16, torch.float16)
    if q_BHLC.device.type != "cpu" or not low or B * H * L * S > MAX_SCORES:
        return F.scaled_dot_product_attention(
            q_BHLC, k_BHSC, v_BHSC, attn_mask=attn_mask, is_causal=is_causal
        )
    # The scale is applied inside the product (alpha), before its float32 accumulator is
    # rounded; softmax of bf16 computes in float32 inside the kernel. No [B, H, L, S]
    # casts: they cost as much as the products at these sizes.
    q_GLC, k_GSC = q_BHLC.reshape(B * H, L, C), k_BHSC.reshape(B * H, S, C)
    scores_GLS = torch.baddbmm(
        q_GLC.new_empty(B * H, L, S), q_GLC, k_GSC.transpose(1, 2), beta=0.0, alpha=C**-0.5
    )
    if is_causal:
        attn_mask = torch.ones(L, S, dtype=torch.bool, device=q_BHLC.device).tril()
    if attn_mask is not None:
        scores_GLS = scores_GLS.masked_fill(~attn_mask, float("-inf"))
    return (scores_GLS.softmax(dim=-1) @ v_BHSC.reshape(B * H, S, -1)).view(B, H, L, -1)
