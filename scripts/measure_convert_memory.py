"""Peak memory of `moge convert` on a synthetic checkpoint much larger than that peak.

Builds a random moge run folder of at least --gb GB on disk, one tensor at a time (this
process never holds the model), then converts it moge -> pangu -> moge, each conversion
in a fresh subprocess that reports its own peak RSS (getrusage ru_maxrss). A third child
that only imports torch and moge gives the baseline. Prints the figures side by side.

    python scripts/measure_convert_memory.py --gb 2.2 --dir /tmp/moge-mem
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moge.interop import runfolder  # noqa: E402
from moge.layer import MoGEConfig  # noqa: E402
from moge.model import MoGETransformer  # noqa: E402
from moge.model.config import ModelConfig  # noqa: E402
from moge.training.config import DataConfig, RunConfig  # noqa: E402

CHILD = """
import sys, time
sys.path.insert(0, {root!r})
import torch
from moge.interop import convert

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS: what the imports left is the baseline
base = status("VmRSS")
t = time.perf_counter()
if {args!r}:
    convert(*{args!r}, max_shard_bytes={shard})
print(base, status("VmHWM"), time.perf_counter() - t)
"""


class RandomSource:
    """moge tensors made up on demand (seeded per name), never all at once."""

    def __init__(self, cfg: RunConfig) -> None:
        with torch.device("meta"):
            meta = MoGETransformer(cfg.model, cfg.moe)
        self._shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items()}

    def shapes(self):
        return self._shapes

    def dtype(self, name):
        return torch.float32

    def read(self, name, expert=None):
        g = torch.Generator().manual_seed(zlib.crc32(f"{name}:{expert}".encode()))
        shape = self._shapes[name] if expert is None else self._shapes[name][1:]
        return torch.randn(shape, generator=g) * 0.02


def synthetic_config(layers: int) -> RunConfig:
    model = ModelConfig(vocab_size=32000, d_model=1024, n_layers=layers, n_heads=16, n_kv_heads=4,
                        qkv_bias=True, o_bias=True, max_seq_len=256)  # fmt: skip
    moe = MoGEConfig(d_model=1024, num_experts=16, num_groups=4, top_k=4, expert_hidden=1024,
                     num_shared_experts=1, learned_expert_scale=True)  # fmt: skip
    return RunConfig(name="synthetic", model=model, moe=moe, data=DataConfig(seq_len=128))


def child(args: list[str], shard: int) -> tuple[int, int, float]:
    """(RSS after the imports, peak RSS during the conversion, seconds) of a fresh process."""
    code = CHILD.format(root=str(ROOT), args=args, shard=shard)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    base, peak, seconds = out.split()
    return int(base), int(peak), float(seconds)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gb", type=float, default=2.2, help="minimum checkpoint size in GB (1e9 bytes)")
    p.add_argument("--dir", default="/tmp/moge-convert-memory", help="scratch folder (removed at the end)")
    p.add_argument("--shard-mb", type=int, default=500, help="shard size of the layout written")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    a = p.parse_args()
    scratch = Path(a.dir)
    shutil.rmtree(scratch, ignore_errors=True)
    per_layer = 16 * 3 * 1024 * 1024 * 4 + 3 * 1024 * 1024 * 4 + 4 * 1024 * 1024 * 4  # experts, shared, attn
    layers = max(1, int((a.gb * 1e9 - 2 * 32000 * 1024 * 4) // per_layer) + 1)
    cfg = synthetic_config(layers)
    src = RandomSource(cfg)
    t = time.perf_counter()
    runfolder.write(scratch / "run", cfg, src)
    size = folder_bytes(scratch / "run")
    largest = max(torch.Size(s).numel() * 4 for s in src.shapes().values())
    print(f"synthetic moge checkpoint: {size / 1e9:.2f} GB ({layers} layers, 16 experts of 1024x1024), "
          f"written in {time.perf_counter() - t:.0f} s; largest tensor {largest / 1e6:.0f} MB")  # fmt: skip
    shard = a.shard_mb * 1_000_000
    runs = [
        (
            f"moge -> pangu ({{n}} shards of <= {a.shard_mb} MB)",
            [str(scratch / "run"), str(scratch / "pangu"), "pangu"],
        ),
        ("pangu -> moge (one checkpoint shard)", [str(scratch / "pangu"), str(scratch / "back"), "moge"]),
    ]
    print(f"{'peak RSS':>9}  {'imports':>8}  {'conversion':>10}  {'/ checkpoint':>12}  {'seconds':>7}  what")
    for what, args in runs:
        base, peak, secs = child(args, shard)
        n = len(list((scratch / "pangu").glob("*.safetensors")))
        extra = peak - base
        print(f"{peak / 1e6:6.0f} MB  {base / 1e6:5.0f} MB  {extra / 1e6:7.0f} MB  {extra / size:12.1%}  {secs:7.1f}  "
              f"{what.format(n=n)}")  # fmt: skip
    print(f"(conversion = peak RSS - RSS after importing torch and moge; largest tensor {largest / 1e6:.0f} MB, "
          f"checkpoint {size / 1e6:.0f} MB; {os.cpu_count()} CPUs)")  # fmt: skip
    if not a.keep:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
