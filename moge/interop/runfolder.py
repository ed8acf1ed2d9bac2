"""moge's own side of a conversion: run folders and checkpoints, read and written by streaming.

A converted run folder holds config.yaml, an empty metrics.jsonl (nothing was trained)
and checkpoints/step_00000000/{model.safetensors, state.json} with LATEST: what
`moge eval`, `moge generate` and `moge.checkpoint.load_run` read. It has no optimizer
state: `train.resume` cannot continue it (train from it by other means).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from moge import checkpoint as ckpt
from moge.config import RunConfig, config_to_dict, save_config
from moge.interop.tensorfile import SafetensorsWriter


def load(path: str | Path):
    """(model, config, step) of a run folder or a checkpoint folder (moge.checkpoint.load_run)."""
    return ckpt.load_run(path)


def weights_file(path: str | Path) -> tuple[RunConfig, Path]:
    """(config, model.safetensors) of the newest checkpoint of a run, or of a checkpoint folder."""
    folder = ckpt.find_checkpoint(path)
    return ckpt.checkpoint_config(folder), folder / ckpt.FILES[0]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def expected_shapes(cfg: RunConfig) -> dict[str, tuple[int, ...]]:
    """moge's state-dict shapes for cfg (built on the meta device: no memory)."""
    from moge.model import MoGETransformer  # the model imports config only; keep this module light

    with torch.device("meta"):
        meta = MoGETransformer(cfg.model, cfg.moe)
    return {k: tuple(v.shape) for k, v in meta.state_dict().items()}


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


def write(dst: str | Path, cfg: RunConfig, src, dtype: torch.dtype | None = None) -> Path:
    """Write a step-0 run folder from a MogeSource (tensors read one at a time); returns the weights file."""
    root = Path(dst)
    check_shapes(src.shapes(), cfg, "the source")
    expected = expected_shapes(cfg)
    folder = root / ckpt.CHECKPOINTS / ckpt.step_dirname(0)
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / ckpt.FILES[0]
    plan = [(k, dtype or src.dtype(k), expected[k]) for k in expected]
    with SafetensorsWriter(file, plan) as w:
        for name, dt, shape in plan:
            w.write(name, src.read(name).to(dt).reshape(shape))
    state = {
        "step": 0,
        "config": config_to_dict(cfg),
        "files": {ckpt.FILES[0]: {"bytes": file.stat().st_size, "sha256": _sha256(file)}},
        "converted": True,  # weights only: no optimizer or RNG state
    }
    (folder / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
    (root / ckpt.CHECKPOINTS / ckpt.LATEST).write_text(folder.name + "\n", encoding="utf-8")
    save_config(cfg, root / "config.yaml")
    (root / "metrics.jsonl").touch()
    return file
