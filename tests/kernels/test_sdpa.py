import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from moge.kernels import sdpa


@pytest.fixture(autouse=True)
def _plain_path_at_test_sizes(monkeypatch):
    # These tensors hold fewer scores than MIN_SCORES: let the bf16 path run on them.
    monkeypatch.setattr(sdpa, "MIN_SCORES", 0)


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


@pytest.mark.parametrize("bound", ["MAX_SCORES", "MIN_SCORES"])
def test_large_and_tiny_scores_go_to_torchs_kernel(monkeypatch, bound):
    monkeypatch.setattr(sdpa, bound, 10 if bound == "MAX_SCORES" else 1000)
    q = torch.randn(1, 2, 4, 8, generator=torch.Generator().manual_seed(0)).bfloat16()  # 32 scores
    out = sdpa.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert torch.equal(out, F.scaled_dot_product_attention(q, q, q, is_causal=True))
    monkeypatch.setattr(sdpa, bound, 10**9 if bound == "MAX_SCORES" else 0)
    assert not torch.equal(sdpa.scaled_dot_product_attention(q, q, q, is_causal=True), out)  # the plain path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masking", ["causal", "mask", "none"])
def test_grouped_kv_heads_equal_repeated_heads(dtype, masking):
    # Query head h reads KV head h // (H/N): the same as repeating every KV head H/N
    # times, forward and backward, on both paths (torch's kernel in float32, ours in bf16).
    gen = torch.Generator().manual_seed(1)
    B, H, N, L, C = 2, 6, 2, 5, 8
    S = 7 if masking == "mask" else L
    q = torch.randn(B, H, L, C, generator=gen).to(dtype)
    k, v = (torch.randn(B, N, S, C, generator=gen).to(dtype) for _ in range(2))
    g = torch.randn(B, H, L, C, generator=gen)
    mask = torch.arange(S)[None, :] <= torch.arange(S - L, S)[:, None] if masking == "mask" else None
    causal = masking == "causal"

    def grouped(q, k, v):
        return sdpa.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)

    def repeated(q, k, v):
        k, v = (t.repeat_interleave(H // N, dim=1) for t in (k, v))
        return sdpa.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)

    ours, theirs = _grads(grouped, q, k, v, g), _grads(repeated, q, k, v, g)
    if dtype == torch.float32:
        for a, b in zip(ours, theirs):
            assert_close(a, b, rtol=1e-5, atol=1e-6)
        return
    # bf16: the output and dq are the same products; dk and dv add the R query heads'
    # parts inside one float32 accumulator instead of adding R rounded bf16 gradients,
    # so they are at least as close to the float32 result.
    for a, b in zip(ours[:2], theirs[:2]):
        assert_close(a, b, rtol=0, atol=0)
    exact = _grads(repeated, q.float(), k.float(), v.float(), g)
    for a, b, c in zip(ours[2:], theirs[2:], exact[2:]):
        scale = c.abs().max().item()
        assert (a.float() - c).abs().max().item() / scale <= (b.float() - c).abs().max().item() / scale + 1e-3


def test_query_heads_must_be_a_multiple_of_kv_heads():
    q, k = torch.randn(1, 3, 4, 8), torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="n_heads"):
        sdpa.scaled_dot_product_attention(q, k, k)
