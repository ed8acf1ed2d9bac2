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
    return torch.tensor(rows, dtype=torch.int64, device=sel_TE.device).reshape(T, top_k)


def reference_layer(layer, x, token_ids=None):
    """The whole layer written the plain way, from the layer's own parameters."""
    c = layer.config
    x_TD = x.reshape(-1, c.d_model)
    logits = x_TD.float() @ layer.router.weight.float().T
    scores = logits.softmax(-1) if c.score_func == "softmax" else logits.sigmoid()
    sel = scores if layer.balance_bias_E is None else scores + layer.balance_bias_E
    if c.router == "random":
        ids = layer.rre_table_VK[token_ids.reshape(-1)]
    else:  # routed token by token, not with moge.routing (a routing bug must show)
        ids = brute_force_route(sel, c.router, c.top_k, c.num_groups, c.topk_groups, c.group_score)
    w = scores.gather(1, ids)
    if c.normalize_weights:
        w = w / w.sum(-1, keepdim=True)
    w = w * c.route_scale
    if layer.expert_scale_E is not None:
        w = w * layer.expert_scale_E[ids]
    y = reference_experts(x_TD, ids, w, layer.experts.w_gate_up_EDH, layer.experts.w_down_EFD)
    if layer.shared is not None:
        s = layer.shared
        g, u = (x_TD @ s.w_gate_up.weight.T).chunk(2, -1)
        y = y + (F.silu(g) * u) @ s.w_down.weight.T
    return y.reshape(x.shape), ids


def all_grads(layer, x, fn):
    """[y, dx, every parameter's grad] of fn(x) under a fixed output gradient."""
    layer.zero_grad()
    x = x.clone().requires_grad_()
    y = fn(x)
    gy = torch.linspace(-1, 1, y.numel(), device=y.device).reshape(y.shape).to(y.dtype)
    (y * gy).sum().backward()
    return [y.detach(), x.grad] + [p.grad.clone() for p in layer.parameters()]


def within_bf16_error(fast, ref, exact, names):
    """Each fast bf16 value's error against the float32 reference stays within twice
    the bf16 reference's own error, plus 0.1% of the values' scale (errors are judged
    relative to the scale of what they compare: layer outputs here are ~1e-2)."""
    for name, a, b, c in zip(names, fast, ref, exact):
        scale = c.abs().max().item()
        assert scale > 0, name
        err_fast = (a.float() - c).abs().max().item() / scale
        err_ref = (b.float() - c).abs().max().item() / scale
        assert err_fast <= 2 * err_ref + 1e-3, (name, err_fast, err_ref)
