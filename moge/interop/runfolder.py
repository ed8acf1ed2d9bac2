"""moge's own side of a conversion: run folders and checkpoints, read and written by streaming.

A converted run folder holds config.yaml, an empty metrics.jsonl (nothing was trained)
and checkpoints/step_00000000/ with LATEST, in moge.training.checkpoint's sharded layout as one
process writes it: one shard (shard-00001-model-00001-of-00001.safetensors, every
"model.<name>" tensor whole, with the DCP sharding header), rng.safetensors, and the
manifest (state.json listing every file's size and sha256, state.json.sha256). So
`moge eval`, `moge generate` and `moge.training.checkpoint.load_run` verify and read it. It has
no optimizer state: `train.resume` cannot continue it (train from it by other means).

Reading goes the other way, from any world size: each shard's header says which slice
of a tensor it holds, and a tensor is assembled from its slices one at a time.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from moge.interop.tensorfile import SafetensorsReader, SafetensorsWriter
from moge.training import checkpoint as ckpt
from moge.training.config import RunConfig, config_to_dict, save_config
from moge.training.manifest import write_manifest

SHARD = "shard-00001-model-00001-of-00001.safetensors"  # the name DCP gives rank 0's only shard
_PREFIX = "model."  # the model's tensors in a checkpoint (optimizer state: "optim.")
_SHARDING = "DCP_SHARDING_INFO"  # header metadata: each tensor's offsets in the whole tensor


def load(path: str | Path):
    """(model, config, step) of a run folder or a checkpoint folder (moge.training.checkpoint.load_run)."""
    return ckpt.load_run(path)


class CheckpointSource:
    """The model tensors of a verified moge checkpoint (any world size), one at a time.

    A tensor held whole by one shard is read straight from it (one expert of it when
    asked); a tensor split across ranks' shards is assembled from its slices.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        state = ckpt.verify_checkpoint(folder)  # digest, sizes, sha256 of every file
        self.pieces: dict[str, list[tuple[SafetensorsReader, tuple[int, ...]]]] = {}
        for name in sorted(n for n in state["files"] if n.endswith(ckpt.SHARD_SUFFIX) and n != ckpt.RNG_FILE):
            reader = SafetensorsReader(folder / name)
            offsets = self._offsets(reader)
            for key, info in reader.tensors.items():
                if key.startswith(_PREFIX):
                    start = tuple(offsets.get(key, [0] * len(info.shape)))
                    self.pieces.setdefault(key[len(_PREFIX) :], []).append((reader, start))
        self._shapes = {name: self._whole_shape(name) for name in self.pieces}

    @staticmethod
    def _offsets(reader: SafetensorsReader) -> dict[str, list[int]]:
        try:
            info = json.loads(reader.metadata.get(_SHARDING, "{}"))
            return {k: list(v["saved_offsets"]) for k, v in info.items()}
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"{reader.path}: unreadable {_SHARDING} header ({str(err)[:100]})") from err

    def _whole_shape(self, name: str) -> tuple[int, ...]:
        ends = [
            tuple(o + s for o, s in zip(start, reader.tensors[_PREFIX + name].shape))
            for reader, start in self.pieces[name]
        ]
        return tuple(max(e) for e in zip(*ends)) if ends and ends[0] else ()

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self._shapes

    def dtype(self, name: str) -> torch.dtype:
        reader, _ = self.pieces[name][0]
        return reader.tensors[_PREFIX + name].dtype

    def read(self, name: str, expert: int | None = None) -> torch.Tensor:
        key, parts = _PREFIX + name, self.pieces[name]
        if len(parts) == 1 and parts[0][0].tensors[key].shape == self._shapes[name]:
            return parts[0][0].read(key, expert)  # whole in one shard: positioned reads only
        out = torch.empty(self._shapes[name], dtype=self.dtype(name))
        covered = 0
        for reader, start in parts:
            piece = reader.read(key)
            out[tuple(slice(o, o + s) for o, s in zip(start, piece.shape))] = piece
            covered += piece.numel()
        if covered != out.numel():
            raise ValueError(f"{self.folder}: the shards do not cover {name} exactly once")
        return out if expert is None else out[expert].clone()


def open_checkpoint(path: str | Path) -> tuple[RunConfig, CheckpointSource, Path]:
    """(config, its model tensors, the checkpoint folder) of the newest checkpoint of a run,
    or of a checkpoint folder; every file is verified first."""
    folder = ckpt.find_checkpoint(path)
    return ckpt.checkpoint_config(folder), CheckpointSource(folder), folder


def _meta_state(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """moge's state dict for cfg, built on the meta device (no memory)."""
    from moge.model import MoGETransformer  # the model imports config only; keep this module light

    with torch.device("meta"):
        meta = MoGETransformer(cfg.model, cfg.moe)
    return meta.state_dict()


def expected_shapes(cfg: RunConfig) -> dict[str, tuple[int, ...]]:
    """moge's state-dict shapes for cfg (built on the meta device: no memory)."""
    return {k: tuple(v.shape) for k, v in _meta_state(cfg).items()}


def check_shapes(shapes: dict[str, tuple[int, ...]], cfg: RunConfig, where: str) -> None:
    """ValueError naming the first tensor missing, unexpected or of another shape than cfg gives."""
    expected = expected_shapes(cfg)
    for name, shape in expected.items():
        if name not in shapes:
            raise ValueError(f"{where}: {name} is missing (expected shape {list(shape)})")
        if tuple(shapes[name]) != shape:
            raise ValueError(f"{where}: {name}: expected shape {list(shape)}, found {list(shapes[name])}")
    extra = sorted(set(shapes) - set(expected))
    if extra:
        raise ValueError(f"{where}: tensors the config does not explain: {', '.join(extra[:6])}")


def _write_shard(file: Path, cfg: RunConfig, src, dtype: torch.dtype | None) -> None:
    """One shard holding every model tensor whole, streamed from src in the model's order.

    dtype None: the dtype of the model load_run builds (float32 parameters), whatever the
    source holds; load_checkpoint never casts, so a bf16 source kept as bf16 could not be read.
    """
    expected = _meta_state(cfg)
    plan = [(_PREFIX + k, dtype or t.dtype, tuple(t.shape)) for k, t in expected.items()]
    sharding = {name: {"saved_offsets": [0] * len(shape)} for name, _, shape in plan}
    with SafetensorsWriter(file, plan, metadata={_SHARDING: json.dumps(sharding)}) as w:
        for name, dt, shape in plan:
            w.write(name, src.read(name[len(_PREFIX) :]).to(dt).reshape(shape))


def write(dst: str | Path, cfg: RunConfig, src, dtype: torch.dtype | None = None) -> Path:
    """Write a step-0 run folder from a MogeSource (tensors read one at a time); returns the shard.

    The checkpoint is written into a temporary folder and renamed into place with LATEST
    (moge.training.checkpoint's crash-safe publication), so an interrupted conversion leaves no
    checkpoint that looks complete.
    """
    root = Path(dst)
    check_shapes(src.shapes(), cfg, "the source")
    ckpts = root / ckpt.CHECKPOINTS
    final = ckpts / ckpt.step_dirname(0)
    ckpts.mkdir(parents=True, exist_ok=True)
    tmp = ckpt._unique(ckpts, final.name)
    tmp.mkdir()
    try:
        _write_shard(tmp / SHARD, cfg, src, dtype)
        rng = {
            "torch_cpu": torch.get_rng_state(),
            "data_gen": torch.Generator().manual_seed(cfg.data.seed).get_state(),
        }
        ckpt._save_tensors(rng, tmp / ckpt.RNG_FILE)
        state = {
            "step": 0,
            "config": config_to_dict(cfg),
            "world": {"size": 1, "dp": 1, "ep": 1},
            "rng": {"file": ckpt.RNG_FILE, "tensors": sorted(rng)},
        }  # no "optimizer": weights only
        write_manifest(tmp, state)  # every file's size and sha256, and the digest of state.json
        ckpt._publish(ckpts, tmp, final, keep_last=1)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    save_config(cfg, root / "config.yaml")
    (root / "metrics.jsonl").touch()
    return final / SHARD
