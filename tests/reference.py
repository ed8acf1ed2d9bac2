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


def brute_force_route(sel_TE, router, top_k, num_groups, topk_groups=None, group_score="top2_sum"):
    """Expert ids [T, K] chosen token by token with Python sorts, independent of moge.routing.

    Ranking key everywhere: higher value first, then the lower expert (or group) id.
    grouped: top_k/num_groups per group, group 0 first; global: top_k over all;
    group_limited: the topk_groups best groups (by the sum of their two best values, or
    their max), then top_k over those groups' experts. Same order as the library's.
    """
    sel_TE = sel_TE.detach()
    T, E = sel_TE.shape
    G = E // num_groups
    rows = []
    for t in range(T):
        vals = [float(v) for v in sel_TE[t]]

        def best(candidates, k, vals=vals):
            return sorted(candidates, key=lambda e: (-vals[e], e))[:k]

        if router == "grouped":
            row = [e for m in range(num_groups) for e in best(range(m * G, (m + 1) * G), top_k // num_groups)]
        elif router == "global":
            row = best(range(E), top_k)
        elif router == "group_limited":

            def gscore(m, vals=vals):
                top = sorted((vals[e] for e in range(m * G, (m + 1) * G)), reverse=True)
                return top[0] + top[1] if group_score == "top2_sum" else top[0]

            groups = sorted(range(num_groups), key=lambda m: (-gscore(m), m))[:topk_groups]
            row = best([e for m in groups for e in range(m * G, (m + 1) * G)], top_k)
        else:
            raise ValueError(router)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.int64).reshape(T, top_k)
