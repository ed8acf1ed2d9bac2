"""The model and MoE settings of the init tests (tests/model/test_init.py, and the
parallelized build in tests/distributed/test_parallel.py).

Model and layer stds differ (0.05 and 0.3), so a weight drawn with the layer's std shows;
w_down_EFD's (out_std) is 0.05 / sqrt(2 * 2) = 0.025. d_model 128: the smallest random
weight (shared_expert_gate, [1, 128]; one rank's row of it when parallelized) has a sample
std within ~10% of the true one.
"""

INIT_MODEL = dict(
    vocab_size=128, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16, qkv_bias=True,
    o_bias=True, qk_norm=True, first_dense_layers=1, init_std=0.05,
)  # fmt: skip
INIT_MOE = dict(
    d_model=128, num_experts=8, num_groups=4, top_k=4, expert_hidden=16, num_shared_experts=1,
    shared_expert_gate=True, learned_expert_scale=True, bias_update_rate=0.1, init_std=0.3,
)  # fmt: skip
