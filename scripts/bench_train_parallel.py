"""Training tokens/s of `moge train` on 1, 2 and 4 CPU processes (torchrun, gloo).

    python scripts/bench_train_parallel.py [--config tiny-moge] [--steps 10]
        [--worlds 1 2 4] [--threads-total N] [KEY=VALUE ...]

Each world size W is one `torchrun --standalone --nproc_per_node W -m moge train CONFIG
parallel.expert_parallel=W` in a temporary folder (W=1 is the plain single-process
trainer). Every process trains on its own train.batch_size sequences per step, so the
global batch grows with W; tokens/s counts all of them, measured from the end of the
first step to the last (elapsed_s in metrics.jsonl), so start-up and the first step's
warm-up are left out. Each process gets threads-total / W threads (default: all cores).

Read the numbers honestly: all processes share one machine's cores, so on 2 cores more
processes cannot be faster than one process that keeps both cores busy: the arithmetic
per token is the same, and every extra process adds two all_to_alls per MoE layer and
direction, a gradient all-reduce per step and context switches, over gloo, which is not
a fast transport. Where 2 processes do beat 1 here, it is because one process does not
keep 2 threads busy on these small matrices (compare `--worlds 1 --threads-total 1`),
not because of expert parallelism; 4 processes on 2 cores are oversubscribed. The
global batch also grows with W, which amortises per-step overhead. Expert parallelism
pays off when every rank has its own accelerator; on CPU this shows that the distributed
trainer runs end to end, not that it is fast.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def _command(args, world: int, out_dir: Path) -> list[str]:
    threads = max(1, args.threads_total // world)
    overrides = [
        f"parallel.expert_parallel={world}", f"train.steps={args.steps}", f"train.out_dir={out_dir}",
        f"train.threads={threads}", "train.eval_every=0", "train.eval_batches=1", "train.save_every=0",
        f"train.log_every={args.steps}", *args.overrides,
    ]  # fmt: skip
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
    return [*launcher, "-m", "moge", "train", args.config, *overrides]


def _tokens_per_s(out_dir: Path, world: int) -> tuple[float, int]:
    """(steady tokens/s over steps 2..N, tokens per step) from metrics.jsonl."""
    from moge.training.config import load_config

    cfg = load_config(out_dir / "config.yaml")
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    recs = [r for r in map(json.loads, lines) if r["type"] == "train"]
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len * world
    span = recs[-1]["elapsed_s"] - recs[0]["elapsed_s"]
    return tokens_per_step * (len(recs) - 1) / span, tokens_per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--config", default="tiny-moge", help="a YAML path or a preset name (default: tiny-moge)"
    )
    parser.add_argument("--steps", type=int, default=10, help="training steps per world size (>= 2)")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--threads-total", type=int, default=os.cpu_count() or 1, dest="threads_total")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="more config overrides")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps: at least 2 (the first step is warm-up)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # train.threads sets the real count
    print(f"{args.config}, {args.steps} steps, {os.cpu_count()} cores, {args.threads_total} threads in all")
    print(f"{'processes':>9} {'threads/proc':>12} {'tokens/step':>11} {'tokens/s':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.worlds:
            out_dir = Path(tmp) / f"w{world}"
            proc = subprocess.run(_command(args, world, out_dir), env=env, capture_output=True, text=True)
            if proc.returncode:
                print(f"{world:>9} failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
                continue
            tok_s, per_step = _tokens_per_s(out_dir, world)
            threads = max(1, args.threads_total // world)
            print(f"{world:>9} {threads:>12} {per_step:>11,} {tok_s:>10,.0f}")


if __name__ == "__main__":
    main()
