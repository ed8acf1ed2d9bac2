"""How often bf16 router logits change the expert selection (docs/moe-traps.md).

    python scripts/measure_router_precision.py [--tokens 4096] [--d-model 1024]

Random router weights (std 0.02, the init) and unit-variance hidden states (what an
RMSNorm hands the router) at the Pangu Pro MoE routing shape (64 experts, 8 groups,
top-8). The float32 reference computes logits in float32 from the bf16-rounded inputs
and weights; the bf16 path computes them in bf16 (moe.router_dtype: input, as the
released code). Softmax is float32 in both. Prints, per router, the share of tokens
whose selected set differs and the share of slots that differ.
"""

import argparse

import torch

from moge.routing import RouterSettings, compute_scores, route


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per trial (default 4096)")
    parser.add_argument("--d-model", type=int, default=1024, help="router input width (default 1024)")
    parser.add_argument("--trials", type=int, default=4, help="independent seeds (default 4)")
    parser.add_argument("--weight-std", type=float, default=0.02, help="router weight std (default 0.02)")
    args = parser.parse_args()
    E, M, K = 64, 8, 8
    print(
        f"tokens {args.tokens} x {args.trials} trials, d_model {args.d_model}, E={E} M={M} K={K}, "
        f"router weight std {args.weight_std}"
    )
    for router in ("grouped", "global"):
        settings = RouterSettings(router=router, top_k=K, num_groups=M)
        tok_diff = slot_diff = 0
        for seed in range(args.trials):
            gen = torch.Generator().manual_seed(seed)
            x = torch.randn(args.tokens, args.d_model, generator=gen).bfloat16()
            w = (torch.randn(E, args.d_model, generator=gen) * args.weight_std).bfloat16()
            ref_ids = route(compute_scores(x.float() @ w.float().T, "softmax"), settings)[1]
            bf_ids = route(compute_scores(x @ w.T, "softmax"), settings)[1]
            ref_sorted, bf_sorted = ref_ids.sort(dim=1).values, bf_ids.sort(dim=1).values
            tok_diff += int((ref_sorted != bf_sorted).any(dim=1).sum())
            # Slots that differ: experts in one set and not the other, per token.
            ref_hot = torch.zeros(args.tokens, E, dtype=torch.bool).scatter_(1, ref_ids, True)
            bf_hot = torch.zeros(args.tokens, E, dtype=torch.bool).scatter_(1, bf_ids, True)
            slot_diff += int((ref_hot & ~bf_hot).sum())
        n = args.tokens * args.trials
        print(
            f"{router:8s} tokens with a changed selection {tok_diff / n:.2%} ({tok_diff}/{n}); "
            f"slots changed {slot_diff / (n * K):.2%}"
        )


if __name__ == "__main__":
    main()
