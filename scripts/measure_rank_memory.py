"""Per-rank bytes of parameters, gradients and AdamW state after one real step, plus peak RSS.

    python scripts/measure_rank_memory.py CONFIG WORLD EP PORT OUT_PREFIX

Writes OUT_PREFIX.rank<r>.json for every rank. Runs against whichever moge is on
PYTHONPATH: this tree (FSDP2 + expert parallelism) or, for the before/after table of
docs/distributed.md, the tree before it (replicated + expert parallelism), e.g.
`git worktree add /tmp/old 18dba5f && cd /tmp/old && PYTHONPATH=. python
$REPO/scripts/measure_rank_memory.py configs/small-moge.yaml 4 2 29701 /tmp/small4`.
"""

import json
import os
import resource
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moge.model import MoGETransformer
from moge.training.config import load_config


def nbytes(t):
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def worker(rank, world, cfgpath, ep, port, out):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    cfg = load_config(cfgpath, [f"parallel.expert_parallel={ep}", "train.batch_size=2", "data.seq_len=64"])
    try:
        from moge.distributed.mesh import connect
        from moge.training.loop import _build

        dist.init_process_group("gloo", rank=rank, world_size=world)
        w = connect(cfg.parallel, cfg.moe.num_groups)
        model, opt = _build(cfg, w)
        kind = "after"
    except ImportError:
        from moge.distributed.expert_parallel import (
            average_replicated_grads,
            init_distributed,
            parallelize_model,
        )
        from moge.training import build_optimizer

        ctx = init_distributed("gloo", expert_parallel=ep)
        torch.manual_seed(cfg.train.seed)
        model = MoGETransformer(cfg.model, cfg.moe)
        parallelize_model(model, ctx)
        opt = build_optimizer(model, cfg.train)
        kind = "before"
    x = torch.randint(0, cfg.model.vocab_size, (2, 64), generator=torch.Generator().manual_seed(rank))
    model(x, x.roll(-1, 1)).loss.backward()
    if kind == "before":
        average_replicated_grads(model)
    opt.step()
    got = {
        "kind": kind,
        "params": sum(nbytes(p) for p in model.parameters()),
        "grads": sum(nbytes(p.grad) for p in model.parameters() if p.grad is not None),
        "optimizer": sum(nbytes(v) for s in opt.state.values() for v in s.values()),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump(got, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    cfgpath, world, ep, port, out = (
        sys.argv[1],
        int(sys.argv[2]),
        int(sys.argv[3]),
        int(sys.argv[4]),
        sys.argv[5],
    )
    mp.start_processes(worker, args=(world, cfgpath, ep, port, out), nprocs=world, start_method="fork")
