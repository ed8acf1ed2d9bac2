"""Tokens/s of the expert-parallel MoGE layer (forward + backward) with 1, 2, 4 gloo processes.

    python scripts/bench_parallel.py [--tokens 512] [--iters 10] [--worlds 1 2 4] [--threads 1]

Every process routes its own `--tokens` tokens, so the global batch grows with the
process count; tokens/s counts all of them. Each process runs `--threads` threads
(default 1: on a busy 2-core machine two threads in one process were 5x slower
than one).

Read the numbers honestly: all processes share this machine's cores, so on 2 cores
more processes cannot be faster than 2 single-threaded ones, and every extra
process adds exchanges and context switches; gloo on CPU is not a fast transport
either. The point here is correctness and the exchange volumes: per-rank slots and
bytes (equal on every rank under the grouped router), and the cost of the count
exchange that the other routers need ("grouped, counted" forces it on the grouped
router, which otherwise sends each slot's local expert index alongside instead).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.multiprocessing as mp

from moge.distributed.expert_parallel import ExpertParallelMoGE
from moge.layer import MoGEConfig, MoGELayer

CONFIG = dict(d_model=128, num_experts=16, num_groups=4, top_k=4, expert_hidden=128, num_shared_experts=1)
VARIANTS = (("grouped", "grouped", None), ("grouped, counted", "grouped", False), ("global", "global", None))


def _time_layer(layer, x, iters: int, sync) -> float:
    for i in range(iters + 2):  # 2 warm-up calls
        if i == 2:
            sync()
            start = time.perf_counter()
        layer.zero_grad()
        layer(x).hidden.square().mean().backward()  # the layer's exchanges; FSDP2's reductions are not timed
    sync()
    return time.perf_counter() - start


def _worker(rank: int, world: int, args, rendezvous: str, queue) -> None:
    torch.set_num_threads(args.threads)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world
    )
    try:
        for label, router, static in VARIANTS:
            torch.manual_seed(0)
            full = MoGELayer(MoGEConfig(**CONFIG, router=router))
            layer = ExpertParallelMoGE.from_layer(full, static_splits=static)
            x = torch.randn(args.tokens, CONFIG["d_model"], generator=torch.Generator().manual_seed(rank))
            seconds = _time_layer(layer, x, args.iters, torch.distributed.barrier)
            s = layer.last_exchange
            if rank == 0:
                queue.put((label, world, world * args.tokens * args.iters / seconds, s))
    finally:
        torch.distributed.destroy_process_group()


def _single(args) -> float:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layer = MoGELayer(MoGEConfig(**CONFIG))
    seconds = _time_layer(layer, torch.randn(args.tokens, CONFIG["d_model"]), args.iters, lambda: None)
    return args.tokens * args.iters / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=512, help="tokens per process")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args()
    print(f"{os.cpu_count()} cores, {args.threads} thread(s) per process; {args.tokens} tokens per process")
    print(f"layer {CONFIG}")
    print(f"{'plain MoGELayer':18s} W=1  {_single(args):10.0f} tokens/s")
    ctx = mp.get_context("spawn")
    for world in args.worlds:
        queue = ctx.SimpleQueue()
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_worker, args=(world, args, f"{tmp}/rendezvous", queue), nprocs=world)
        while not queue.empty():
            label, w, rate, s = queue.get()
            print(
                f"{label:18s} W={w}  {rate:10.0f} tokens/s   rank 0 sends {list(s.send_slots)} slots, "
                f"receives {list(s.recv_slots)}; {s.token_bytes / 1e3:.0f} kB tokens + "
                f"{s.meta_bytes} B {'expert indices' if s.static else 'counts (exchanged first)'}"
            )


if __name__ == "__main__":
    main()
