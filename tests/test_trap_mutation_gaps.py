"""Gaps a mutation run of the suite found: each test here fails under the named mutation.

- RoPE: a sign flip or the interleaved convention keeps relative-position invariance,
  identity at 0 and the norm; one known value pins rotate-half.
- Per-rank RNG restore by rng_key: restoring rank 0's state on every rank must show.
- The sampler: an off-by-one that never draws the last window must show.
"""

import json
import math

import torch
from torch.testing import assert_close

from moge.checkpoint import load_checkpoint, save_checkpoint
from moge.config import config_from_dict
from moge.data import TokenDataset
from moge.model import MoGETransformer, RotaryEmbedding
from moge.train import build_optimizer


def test_rope_is_rotate_half_with_known_values():
    """head_dim 4, theta 100: frequencies [1, 0.1]; pairs are (0, 2) and (1, 3)."""
    rope = RotaryEmbedding(head_dim=4, max_seq_len=8, theta=100.0)
    x = torch.eye(4).view(4, 1, 1, 4)  # four one-hot vectors as [B=4, H=1, L=1, C=4]
    c1, s1, c2, s2 = math.cos(1.0), math.sin(1.0), math.cos(0.1), math.sin(0.1)
    expected = torch.tensor(
        [
            [c1, 0.0, s1, 0.0],  # e0 -> cos e0 + sin e2
            [0.0, c2, 0.0, s2],  # e1 -> cos e1 + sin e3 (second frequency)
            [-s1, 0.0, c1, 0.0],  # e2 -> -sin e0 + cos e2
            [0.0, -s2, 0.0, c2],
        ]
    )
    assert_close(rope(x, 1).view(4, 4), expected, rtol=1e-6, atol=1e-7)


def _tiny_cfg():
    return config_from_dict(
        json.loads(
            json.dumps(
                {
                    "name": "rng-test",
                    "model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 16},
                    "moe": {"num_experts": 4, "num_groups": 2, "top_k": 2, "expert_hidden": 8},
                    "data": {"seq_len": 8},
                }
            )
        )
    )


def test_each_rank_restores_its_own_rng_state(tmp_path):
    cfg = _tiny_cfg()
    model = MoGETransformer(cfg.model, cfg.moe)
    opt = build_optimizer(model, cfg.train)
    states = {f"torch_cpu_rank{r}": torch.Generator().manual_seed(100 + r).get_state() for r in range(3)}
    gen = torch.Generator().manual_seed(1)
    save_checkpoint(tmp_path, 5, model, opt, gen, cfg, keep_last=1, extra_rng=states)
    draws = {}
    for r in range(3):
        torch.manual_seed(999)  # a state none of the ranks saved
        load_checkpoint(tmp_path, model, opt, torch.Generator(), rng_key=f"torch_cpu_rank{r}")
        assert torch.equal(torch.get_rng_state(), states[f"torch_cpu_rank{r}"])
        draws[r] = torch.rand(4)
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])


def test_the_last_training_window_can_be_drawn():
    L = 4
    tokens = torch.arange(L + 3, dtype=torch.uint8)  # 3 possible windows: starts 0, 1, 2
    data = TokenDataset(train=tokens, val=tokens, seq_len=L, vocab_size_needed=256, source="test")
    gen = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(40):
        batch = data.get_batch("train", 4, gen)
        assert torch.equal(batch[1][:, :-1], batch[0][:, 1:])  # y is x shifted by one
        starts.update(batch[0][:, 0].tolist())
    assert starts == {0, 1, 2}  # the last window (ending on the last token) included
