"""Per-rank memory of `moge train`'s model: bytes of parameters, gradients and AdamW state
each rank holds after one real step, and the process's peak RSS after building the
model and after the step (gloo, CPU, forked ranks).

    python scripts/measure_rank_memory.py configs/small-moge.yaml --processes 4 --expert-parallel 2

Prints one JSON line per rank. It runs against whichever moge is imported, so the
same command measures another tree: `git archive bd970cc | tar -x -C /tmp/before`,
then `PYTHONPATH=/tmp/before python scripts/measure_rank_memory.py ...` (any tree whose
moge.training.loop has `_build(cfg, world)`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MIB = 1 << 20


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _nbytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def _worker(rank: int, args: argparse.Namespace, rendezvous: str) -> None:
    from moge.distributed.mesh import connect
    from moge.training.config import load_config
    from moge.training.loop import _build

    torch.set_num_threads(1)
    warnings.filterwarnings(
        "ignore", message="FSDP2-wrapped module", category=UserWarning
    )  # as the loop does
    overrides = [f"parallel.expert_parallel={args.expert_parallel}", f"train.batch_size={args.batch_size}",
                 f"data.seq_len={args.seq_len}"]  # fmt: skip
    cfg = load_config(args.config, overrides)
    if args.processes > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(args.processes), LOCAL_RANK=str(rank))
        dist.init_process_group(
            "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=args.processes
        )
    world = connect(cfg.parallel, cfg.moe.num_groups)
    start = _rss_mib()
    model, opt = _build(cfg, world)
    built = _peak_rss_mib()
    x_BL = torch.randint(0, cfg.model.vocab_size, (args.batch_size, args.seq_len))
    model(x_BL, x_BL.roll(-1, 1)).loss.backward()
    opt.step()
    got = {
        "config": cfg.name, "processes": args.processes, "rank": rank, "mesh": f"{world.shape.dp}x{world.shape.ep}",
        "params_mib": sum(_nbytes(p) for p in model.parameters()) / MIB,
        "grads_mib": sum(_nbytes(p.grad) for p in model.parameters() if p.grad is not None) / MIB,
        "adamw_mib": sum(_nbytes(v) for s in opt.state.values() for v in s.values()) / MIB,
        "rss_before_build_mib": start, "peak_rss_after_build_mib": built, "peak_rss_after_step_mib": _peak_rss_mib(),
    }  # fmt: skip
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in got.items()}), flush=True)
    if args.processes > 1:
        dist.barrier()
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="run config (YAML)")
    parser.add_argument("--processes", type=int, default=2, help="ranks to fork (1: no process group)")
    parser.add_argument("--expert-parallel", type=int, default=1, dest="expert_parallel",
                        help="parallel.expert_parallel (1: FSDP2 data parallel only)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=2, dest="batch_size", help="sequences per rank")
    parser.add_argument("--seq-len", type=int, default=64, dest="seq_len", help="tokens per sequence")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:  # one process is forked too: the same baseline
        rendezvous = os.path.join(tmp, "rendezvous")
        mp.start_processes(_worker, args=(args, rendezvous), nprocs=args.processes, start_method="fork")


if __name__ == "__main__":
    main()
