"""Weights in and out: Hugging Face / Pangu Pro MoE layouts <-> moge models and run folders.

    model, cfg = from_pretrained(path)                 # a layout folder, a moge run or checkpoint
    save_pretrained(model, path, layout="qwen3_moe")   # == model.save_pretrained(path, layout=...)
    convert(src, dst, to="pangu")                      # streams tensor by tensor (`moge convert`)

Layouts (LAYOUTS): pangu, qwen3_moe, qwen2_moe, mixtral, llama, qwen2, and moge (a run
folder with one checkpoint). The DeepSeek-V3 MoE block loads into one MoGELayer
(moge.interop.deepseek_v3). See README "Moving weights in and out", and docs/interop.md
for the training fields an export writes (balance loss, z-loss), its dtypes and how config.json
values are checked.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from moge.interop import runfolder, sidefiles
from moge.interop.folder import LayoutFolder
from moge.interop.hfconfig import check_dropless
from moge.interop.llama import LlamaLayout, Qwen2Layout
from moge.interop.mapping import (
    DEFAULT_SHARD_BYTES,
    Layout,
    MogeSource,
    StateDictSource,
    check_pieces,
    read_params,
    write_layout,
)
from moge.interop.mixtral import MixtralLayout
from moge.interop.pangu import PanguLayout
from moge.interop.qwen_moe import Qwen2MoeLayout, Qwen3MoeLayout
from moge.layer import MoGEConfig
from moge.model import MoGETransformer
from moge.model.config import ModelConfig
from moge.training.config import DataConfig, RunConfig

__all__ = [
    "LAYOUTS",
    "convert",
    "detect_layout",
    "from_pretrained",
    "is_layout_folder",
    "load_model",
    "save_pretrained",
]

_ALL: list[Layout] = [
    PanguLayout(),
    Qwen3MoeLayout(),
    Qwen2MoeLayout(),
    MixtralLayout(),
    LlamaLayout(),
    Qwen2Layout(),
]
LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in _ALL}
MOGE = "moge"  # a moge run folder (config.yaml + checkpoints/), the other target of convert


def _layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise ValueError(f"layout: unknown {name!r}; one of {', '.join([*LAYOUTS, MOGE])}")
    return LAYOUTS[name]


def is_layout_folder(path: str | Path) -> bool:
    """A folder with a config.json (a transformers-style checkpoint), not a moge run."""
    return (Path(path) / "config.json").is_file()


def detect_layout(hf_config: dict, where: str = "config.json") -> Layout:
    """The layout whose model_type config.json names."""
    model_type = hf_config.get("model_type")
    for layout in _ALL:
        if model_type in layout.model_types:
            return layout
    known = ", ".join(t for layout in _ALL for t in layout.model_types)
    raise ValueError(f"{where}: model_type {model_type!r} is not a supported layout (supported: {known})")


def _run_config(name: str, model_cfg, moe_cfg) -> RunConfig:
    seq = min(DataConfig().seq_len, model_cfg.max_seq_len)
    return RunConfig(name=name, model=model_cfg, moe=moe_cfg, data=DataConfig(seq_len=seq))


def read_layout_config(folder: LayoutFolder, max_seq_len: int | None = None):
    """(layout, RunConfig) of a layout folder, config.json validated."""
    where = str(folder.path / "config.json")
    layout = detect_layout(folder.config, where)
    model_cfg, moe_cfg = layout.read_config(folder.config, where)
    if model_cfg.tie_embeddings and _stores_another_head(folder):
        model_cfg = dataclasses.replace(model_cfg, tie_embeddings=False)
    if max_seq_len is not None:
        model_cfg = dataclasses.replace(model_cfg, max_seq_len=max_seq_len)
    return layout, _run_config(folder.path.resolve().name or "model", model_cfg, moe_cfg)


def _stores_another_head(folder: LayoutFolder) -> bool:
    """Whether a tied config's folder also stores an lm_head.weight unequal to the embedding.

    transformers 5 then keeps that head untied (and warns), so moge reads it untied too; an
    equal copy (as .bin-era checkpoints store one) is the tied model. Reads both tensors.
    """
    head, embed = "lm_head.weight", "model.embed_tokens.weight"
    if head not in folder.where or embed not in folder.where:
        return False
    if folder.shape(head) != folder.shape(embed):
        return True  # untied, so that check_pieces names the head's shape
    return not torch.equal(folder.read(head).float(), folder.read(embed).float())


def _prepare(folder: LayoutFolder, layout: Layout, cfg: RunConfig, shapes: dict) -> list:
    """The layout's pieces, after offering other spellings and checking every key and shape."""
    layout.prepare(folder)
    if cfg.model.tie_embeddings:  # an equal copy of the embedding (read_layout_config unties others)
        folder.where.pop("lm_head.weight", None)
    pieces = layout.pieces(cfg.model, cfg.moe)
    check_pieces(folder, pieces, shapes)
    return pieces


def from_pretrained(
    path: str | Path, dtype: torch.dtype | None = torch.float32, max_seq_len: int | None = None
) -> tuple[MoGETransformer, RunConfig]:
    """(model in eval mode, its RunConfig) from a layout folder or a moge run/checkpoint.

    The layout is detected from config.json's model_type. dtype: the parameters' dtype
    (None: the checkpoint's own). max_seq_len: override max_position_embeddings (the
    length moge's RoPE tables cover). Tensors are read one at a time into the model.
    """
    path = Path(path)
    if not is_layout_folder(path):
        model, cfg, _ = runfolder.load(path)
        return (model.to(dtype) if dtype is not None else model), cfg
    folder = LayoutFolder(path)
    layout, cfg = read_layout_config(folder, max_seq_len)
    model = MoGETransformer(cfg.model, cfg.moe)
    target = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in target.items()}
    pieces = _prepare(folder, layout, cfg, shapes)
    first = None
    for name, t in read_params(folder, pieces, shapes, dtype=None):
        first = first or t.dtype
        target[name].copy_(t)
    model = model.to(dtype or first or torch.float32)
    return model.eval(), cfg


def _write_config(lay: Layout, m: ModelConfig, e: MoGEConfig) -> dict:
    """The layout's config.json for the model, or the ValueError of what it cannot express."""
    if any(m.is_moe_layer(i) for i in range(m.n_layers)):
        check_dropless(lay.name, e)
    return lay.write_config(m, e)


def save_pretrained(
    model: MoGETransformer,
    path: str | Path,
    layout: str,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> list[Path]:
    """Write `model` in `layout` (config.json + safetensors shards); returns the weight files.

    Raises ValueError, before writing anything, when the layout cannot express the model.
    """
    if layout == MOGE:
        cfg = _run_config(Path(path).name or "model", model.cfg, model.moe_cfg)
        return [runfolder.write(path, cfg, StateDictSource(model.state_dict()), dtype)]
    lay = _layout(layout)
    config = _write_config(lay, model.cfg, model.moe_cfg)
    return write_layout(
        path, lay.pieces(model.cfg, model.moe_cfg), StateDictSource(model.state_dict()), config, dtype,
        max_shard_bytes,
    )  # fmt: skip


def load_model(path: str | Path) -> tuple[MoGETransformer, RunConfig, int]:
    """(model, config, step) of a run folder/checkpoint or a layout folder (step 0)."""
    if is_layout_folder(path):
        model, cfg = from_pretrained(path)
        return model, cfg, 0
    return runfolder.load(path)


class _LayoutSource:
    """A layout folder seen as moge tensors: each assembled (one at a time) from its pieces."""

    def __init__(self, folder: LayoutFolder, layout: Layout, cfg: RunConfig, dtype) -> None:
        self.folder, self.layout, self.cfg, self.dtype_ = folder, layout, cfg, dtype
        with torch.device("meta"):
            meta = MoGETransformer(cfg.model, cfg.moe)
        self._shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
        self.pieces = _prepare(folder, layout, cfg, self._shapes)
        self._by_param: dict[str, list] = {}
        for p in self.pieces:
            self._by_param.setdefault(p.param, []).append(p)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self._shapes

    def dtype(self, name: str) -> torch.dtype:
        return self.dtype_ or self.folder.dtype(self._by_param[name][0].key)

    def read(self, name: str, expert: int | None = None) -> torch.Tensor:
        parts = self._by_param[name]
        shapes = {name: self._shapes[name]}
        if expert is not None:
            parts = [p for p in parts if p.expert == expert]
            shapes = {name: self._shapes[name][1:]}
            parts = [dataclasses.replace(p, expert=None) for p in parts]
        return next(read_params(self.folder, parts, shapes, self.dtype(name)))[1]


def _open_source(src: Path, dtype) -> tuple[MogeSource, RunConfig]:
    if is_layout_folder(src):
        folder = LayoutFolder(src)
        layout, cfg = read_layout_config(folder)
        return _LayoutSource(folder, layout, cfg, dtype), cfg
    cfg, source, ckpt_folder = runfolder.open_checkpoint(src)
    runfolder.check_shapes(source.shapes(), cfg, str(ckpt_folder))
    return source, cfg


def convert(
    src: str | Path,
    dst: str | Path,
    to: str,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> list[Path]:
    """Stream a checkpoint from one layout to another, one tensor (or one expert) at a time.

    src: a layout folder (config.json), a moge run folder or checkpoint folder. dst: a new
    folder (or an empty one); anything else is refused before a file is read or written.
    to: a name in LAYOUTS, or "moge" for a moge run folder. Returns the weight files written.
    Peak memory: about the largest moge tensor (the stacked experts of one layer, when
    reading a layout) plus one tensor being written. The source's special-token ids,
    generation_config.json, tokenizer files and the released Pangu modelling code go along
    (moge.interop.sidefiles; a moge run keeps them in hf/).
    """
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError(f"{dst}: the destination is the source")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):  # never overwrite a model or a run
        raise ValueError(f"DST: {dst} already exists and is not an empty folder; convert writes a new one")
    if to == MOGE and dtype not in (None, torch.float32):
        raise ValueError(
            f"--dtype: a moge run holds float32 weights ({str(dtype).removeprefix('torch.')} asked; "
            "train.dtype sets what its steps compute in); cast only a layout export"
        )
    source, cfg = _open_source(src, dtype)
    side, ids = sidefiles.read_source(src)
    if to == MOGE:  # keep a run's other sections; the new run lives in dst
        train = dataclasses.replace(cfg.train, out_dir=str(dst), resume=False)
        cfg = dataclasses.replace(cfg, name=dst.name or cfg.name, train=train)
        written = [runfolder.write(dst, cfg, source, dtype)]
        sidefiles.store_in_run(side, ids, dst)
        return written
    lay = _layout(to)
    config = {**_write_config(lay, cfg.model, cfg.moe), **ids}
    written = write_layout(dst, lay.pieces(cfg.model, cfg.moe), source, config, dtype, max_shard_bytes)
    sidefiles.copy_side_files(side, dst)
    return written
