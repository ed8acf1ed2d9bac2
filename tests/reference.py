"""Plain reference implementations that the library's fast paths must match."""

import torch
import torch.nn.functional as F


def reference_experts(x_TD, ids_TK, weights_TK, w1_EDH, w2_EFD):
    """The plain per-expert loop the fast paths must match: no sorting, no fusion."""
    Fh = w2_EFD.shape[1]
    y = torch.zeros_like(x_TD)
    for e in range(w1_EDH.shape[0]):
        tok, slot = (ids_TK == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        h = x_TD[tok] @ w1_EDH[e]
        out = (F.silu(h[:, :Fh]) * h[:, Fh:]) @ w2_EFD[e]
        y = y.index_add(0, tok, out * weights_TK[tok, slot].unsqueeze(-1).to(out.dtype))
    return y
