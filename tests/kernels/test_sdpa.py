import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from moge.kernels import sdpa


def _grads(fn, q, k, v, g):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(g.to(out.dtype))
    return [out.detach(), q.grad, k.grad, v.grad]


@pytest.mark.parametrize("masking", ["causal", "mask", "none"])
def test_bf16_path_within_torch_kernels_own_bf16_error(masking):
    gen = torch.Generator().manual_seed(0)
    B, H, L, S, C = 2, 3, 5, 7 if masking == "mask" else 5, 8
    q, k, v = (torch.randn(B, H, n, C, generator=gen) for n in (L, S, S))
    g = torch.randn(B, H, L, C, generator=gen)
    mask = torch.arange(S)[None, :] <= torch.arange(S - L, S)[:, None] if masking == "mask" else None
    causal = masking == "causal"

    def ours(q, k, v):
        return sdpa.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)

    def torchs(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)

    exact = _grads(torchs, q, k, v, g)
    assert_close(_grads(ours, q, k, v, g), exact)  # float32: torch's own kernel
    fast = _grads(ours, q.bfloat16(), k.bfloat16(), v.bfloat16(), g)
    ref = _grads(torchs, q.bfloat16(), k.bfloat16(), v.bfloat16(), g)
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), fast, ref, exact):
        assert a.dtype == torch.bfloat16
        scale = c.abs().max().item()
        err_fast = (a.float() - c).abs().max().item() / scale
        err_ref = (b.float() - c).abs().max().item() / scale
        assert err_fast <= 2 * err_ref + 1e-3, (name, err_fast, err_ref)


def test_large_scores_go_to_torchs_kernel(monkeypatch):
    monkeypatch.setattr(sdpa, "MAX_SCORES", 10)
    q = torch.randn(1, 2, 4, 8).bfloat16()
    out = sdpa.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert torch.equal(out, F.scaled_dot_product_attention(q, q, q, is_causal=True))
