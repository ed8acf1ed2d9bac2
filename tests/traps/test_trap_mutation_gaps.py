"""Gaps a mutation run of the suite found: each test here fails under the named mutation.

- RoPE: a sign flip or the interleaved convention keeps relative-position invariance,
  identity at 0 and the norm; one known value pins rotate-half.
- Per-rank RNG restore by rng_key: restoring rank 0's state on every rank must show.
- The sampler: an off-by-one that never draws the last window must show.
"""

import math

import torch
import torch.distributed as dist
from ranks import run_ranks
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from moge.distributed.mesh import MeshShape, World
from moge.model import MoGETransformer, RotaryEmbedding
from moge.training import build_optimizer
from moge.training.checkpoint import load_checkpoint, save_checkpoint
from moge.training.config import config_from_dict
from moge.training.data import TokenDataset


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
        {
            "name": "rng-test",
            "model": {"d_model": 16, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "max_seq_len": 16},
            "moe": {"num_experts": 4, "num_groups": 2, "top_k": 2, "expert_hidden": 8},
            "data": {"seq_len": 8},
        }
    )


def _rng_rank(rank, world_size, out_dir):
    """One of two gloo ranks: save with its own torch RNG state, scramble, load, report."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world_size
    )
    try:
        world = World(rank, world_size, torch.device("cpu"), MeshShape(dp=world_size, ep=1))
        cfg = _tiny_cfg()
        torch.manual_seed(0)  # the same replicated model on both ranks
        model = MoGETransformer(cfg.model, cfg.moe)
        opt = build_optimizer(model, cfg.train)
        torch.manual_seed(100 + rank)  # each rank's own RNG stream
        saved = torch.get_rng_state()
        save_checkpoint(out_dir / "run", 3, model, opt, torch.Generator().manual_seed(1), cfg, 1, world=world)
        torch.manual_seed(999)  # a state no rank saved
        load_checkpoint(out_dir / "run", model, None, torch.Generator(), world=world)
        save_file({"saved": saved, "restored": torch.get_rng_state()}, f"{out_dir}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def test_each_rank_restores_its_own_rng_state(tmp_path):
    run_ranks(_rng_rank, 2, tmp_path)
    got = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    assert not torch.equal(got[0]["saved"], got[1]["saved"])
    for r in range(2):  # rank 1 must not come back with rank 0's state
        assert torch.equal(got[r]["restored"], got[r]["saved"]), f"rank {r}"


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
