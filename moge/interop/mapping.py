"""What maps to what: one `Piece` per tensor of a layout, and streaming in both directions.

A piece says which region of which moge state-dict tensor a layout tensor is: select
expert `e` of a stacked [E, ...] tensor, transpose, take rows a:b, reshape. Reading a
layout fills each moge tensor piece by piece; writing one cuts each piece out of the
moge tensors (one expert at a time for the stacked experts). Nothing else is ever held.

Legend: E routed experts, D d_model, F expert hidden, H = 2F.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from moge.interop.folder import INDEX, SINGLE, LayoutFolder
from moge.interop.hfconfig import dtype_json
from moge.interop.tensorfile import SafetensorsReader, SafetensorsWriter
from moge.layer import MoGEConfig
from moge.model.config import ModelConfig

DEFAULT_SHARD_BYTES = 2 * 1024**3
# Keys a loader skips: RoPE tables some checkpoints carry (moge derives them from the config).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")  # the shards write_layout names


@dataclass(frozen=True)
class Piece:
    """Layout tensor `key` = moge tensor `param` [expert] (.T) [rows a:b], reshaped to `shape`.

    fill: the layout tensor is this constant when moge has no `param` (a learned expert
    scale exported from a model without one is all ones: the same model).
    """

    key: str
    param: str
    expert: int | None = None
    transpose: bool = False
    rows: tuple[int, int] | None = None
    shape: tuple[int, ...] | None = None
    fill: float | None = None

    def region(self, t: torch.Tensor, whole: bool = True) -> torch.Tensor:
        """The view of moge tensor t (the whole tensor, or already t[expert] if not whole)."""
        if whole and self.expert is not None:
            t = t[self.expert]
        if self.transpose:
            t = t.T
        if self.rows is not None:
            t = t[self.rows[0] : self.rows[1]]
        return t

    def layout_shape(self, param_shape: Sequence[int]) -> tuple[int, ...]:
        if self.shape is not None:
            return self.shape
        return tuple(self.region(torch.empty(param_shape, device="meta")).shape)


class Layout(Protocol):
    """One checkpoint family: its config.json fields and its key names."""

    name: str  # what `--to` and `layout=` accept
    model_types: tuple[str, ...]  # config.json model_type values it reads

    def read_config(self, hf: dict, where: str) -> tuple[ModelConfig, MoGEConfig]:
        """moge's configs from config.json; ValueError naming the field it cannot take."""
        ...

    def write_config(self, model: ModelConfig, moe: MoGEConfig) -> dict:
        """config.json of the model; ValueError naming what the layout cannot express."""
        ...

    def pieces(self, model: ModelConfig, moe: MoGEConfig) -> list[Piece]:
        """Every tensor of the layout and the moge region it is."""
        ...

    def prepare(self, folder: LayoutFolder) -> None:
        """Offer other spellings of the same tensors under the piece keys (before checking)."""
        ...


class BaseLayout:
    """Defaults of the Layout protocol."""

    def prepare(self, folder: LayoutFolder) -> None:
        pass


# ---------------------------------------------------------------- pieces shared by layouts


def decoder_pieces(m: ModelConfig, biases: str = "") -> list[Piece]:
    """Embedding, final norm, LM head (untied), and every block's attention and two norms.

    biases: projections ("qkv", "qkvo") whose bias the layout always has; a model without
    them exports zeros (the same model), and reads them back as zero biases.
    """
    C = m.resolved_head_dim
    widths = {"q": m.n_heads * C, "k": m.n_kv_heads * C, "v": m.n_kv_heads * C, "o": m.d_model}
    out = [Piece("model.embed_tokens.weight", "embed.weight"), Piece("model.norm.weight", "norm.weight")]
    if not m.tie_embeddings:
        out.append(Piece("lm_head.weight", "lm_head.weight"))
    for i in range(m.n_layers):
        hf, mg = f"model.layers.{i}", f"blocks.{i}"
        out += [
            Piece(f"{hf}.input_layernorm.weight", f"{mg}.attn_norm.weight"),
            Piece(f"{hf}.post_attention_layernorm.weight", f"{mg}.ffn_norm.weight"),
        ]
        for proj in ("q", "k", "v", "o"):
            out.append(Piece(f"{hf}.self_attn.{proj}_proj.weight", f"{mg}.attn.{proj}_proj.weight"))
            if proj in biases or (m.o_bias if proj == "o" else m.qkv_bias):
                key, param = f"{hf}.self_attn.{proj}_proj.bias", f"{mg}.attn.{proj}_proj.bias"
                out.append(Piece(key, param, shape=(widths[proj],), fill=0.0))
        if m.qk_norm:
            for n in ("q", "k"):
                out.append(Piece(f"{hf}.self_attn.{n}_norm.weight", f"{mg}.attn.{n}_norm.weight"))
    return out


def swiglu_pieces(hf: str, mg: str, hidden: int, names=("gate_proj", "up_proj", "down_proj")) -> list[Piece]:
    """A dense SwiGLU (moge: w_gate_up [2F, D] gate rows first, w_down [D, F])."""
    gate, up, down = names
    return [
        Piece(f"{hf}.{gate}.weight", f"{mg}.w_gate_up.weight", rows=(0, hidden)),
        Piece(f"{hf}.{up}.weight", f"{mg}.w_gate_up.weight", rows=(hidden, 2 * hidden)),
        Piece(f"{hf}.{down}.weight", f"{mg}.w_down.weight"),
    ]


def expert_pieces(
    hf: str, mg: str, num_experts: int, hidden: int, names=("gate_proj", "up_proj", "down_proj")
) -> list[Piece]:
    """E routed SwiGLUs `{hf}.{e}.{gate,up,down}.weight` <-> moge's stacked [E, D, 2F] and [E, F, D]."""
    gate, up, down = names
    out = []
    for e in range(num_experts):
        w1, w2 = f"{mg}.w_gate_up_EDH", f"{mg}.w_down_EFD"
        out += [
            Piece(f"{hf}.{e}.{gate}.weight", w1, expert=e, transpose=True, rows=(0, hidden)),
            Piece(f"{hf}.{e}.{up}.weight", w1, expert=e, transpose=True, rows=(hidden, 2 * hidden)),
            Piece(f"{hf}.{e}.{down}.weight", w2, expert=e, transpose=True),
        ]
    return out


def check_pieces(folder: LayoutFolder, pieces: list[Piece], shapes: dict[str, tuple[int, ...]]) -> None:
    """Every piece present with its shape, and no tensor left over: else one ValueError naming the key."""
    for p in pieces:
        if p.fill is not None and p.param not in shapes:
            continue
        expected = p.layout_shape(shapes[p.param])
        if p.key not in folder.where:
            raise ValueError(
                f"{folder.path}: the tensor {p.key} is missing (expected shape {list(expected)})"
            )
        found = folder.shape(p.key)
        if found != expected:
            raise ValueError(
                f"{folder.path}: {p.key}: expected shape {list(expected)} for this config.json, found {list(found)}"
            )
    known = {p.key for p in pieces}
    extra = [k for k in folder.where if k not in known and not k.endswith(IGNORED_SUFFIXES)]
    if extra:
        shown = ", ".join(extra[:6]) + (f" ... ({len(extra)} in all)" if len(extra) > 6 else "")
        raise ValueError(f"{folder.path}: tensors this config.json does not explain: {shown}")


def read_params(
    folder: LayoutFolder, pieces: list[Piece], shapes: dict[str, tuple[int, ...]], dtype: torch.dtype | None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (moge name, tensor) in state-dict order, each assembled from its pieces.

    dtype None: the dtype of the layout's tensors. Pieces with `fill` whose moge tensor
    does not exist are skipped (checked by the caller: the value must then be the fill).
    """
    by_param: dict[str, list[Piece]] = {}
    for p in pieces:
        by_param.setdefault(p.param, []).append(p)
    for name, shape in shapes.items():
        parts = by_param.get(name)
        if not parts:
            raise ValueError(f"no tensor of the layout gives moge's {name}")  # a layout bug, not user input
        first = parts[0]
        if len(parts) == 1 and (first.expert, first.transpose, first.rows) == (None, False, None):
            # The whole tensor as stored: no second copy to assemble it into.
            t = folder.read(first.key).reshape(shape)
            yield name, t.to(dtype) if dtype is not None else t
            continue
        t = torch.empty(shape, dtype=dtype or folder.dtype(first.key))
        covered = 0
        for p in parts:
            dst = p.region(t)
            dst.copy_(folder.read(p.key).reshape(dst.shape))
            covered += dst.numel()
        assert covered == t.numel(), f"the pieces of {name} cover it exactly"
        yield name, t


# ---------------------------------------------------------------- writing a layout


class MogeSource(Protocol):
    """moge tensors by state-dict name: their shapes and dtypes, and reads of one expert."""

    def shapes(self) -> dict[str, tuple[int, ...]]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def read(self, name: str, expert: int | None = None) -> torch.Tensor: ...


class StateDictSource:
    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.state.items()}

    def dtype(self, name: str) -> torch.dtype:
        return self.state[name].dtype

    def read(self, name: str, expert: int | None = None) -> torch.Tensor:
        t = self.state[name].detach()
        return t[expert] if expert is not None else t


class FileSource:
    """The tensors of one safetensors file by moge name, read one tensor (or one expert) at a time."""

    def __init__(self, path: str | Path) -> None:
        self.reader = SafetensorsReader(path)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self.reader.tensors.items()}

    def dtype(self, name: str) -> torch.dtype:
        return self.reader.tensors[name].dtype

    def read(self, name: str, expert: int | None = None) -> torch.Tensor:
        return self.reader.read(name, expert)


def _piece_tensor(src: MogeSource, p: Piece, shapes: dict, dtype: torch.dtype) -> torch.Tensor:
    if p.param not in shapes:
        assert p.fill is not None
        return torch.full(p.shape or (), p.fill, dtype=dtype)
    t = p.region(src.read(p.param, p.expert), whole=False)
    return t.reshape(p.layout_shape(shapes[p.param])).to(dtype).contiguous()


def _fill_shape(p: Piece) -> tuple[int, ...]:
    assert p.fill is not None and p.shape is not None, (
        "a piece without a moge tensor is a constant of known shape"
    )
    return p.shape


def _fill_dtype(src: MogeSource, pieces: list[Piece], shapes: dict) -> torch.dtype:
    """The dtype of the constants a layout has and moge lacks (zero biases, ones scales)
    when the export keeps moge's dtypes: the model's, read off its first tensor (the
    embedding). transformers casts a mixed file to one dtype on load, but float32
    constants in a bf16 export double their bytes, and readers that keep each tensor's
    own dtype (a convert without --dtype, safetensors tools) would get a mixed model."""
    first = next((p.param for p in pieces if p.param in shapes), None)
    return src.dtype(first) if first is not None else torch.float32


def plan_shards(sizes: list[int], max_bytes: int) -> list[list[int]]:
    """Greedy: consecutive pieces fill a shard up to max_bytes (a larger piece gets its own)."""
    shards: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(sizes):
        if shards[-1] and used + n > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += n
    return shards


def write_layout(
    path: str | Path,
    pieces: list[Piece],
    src: MogeSource,
    config: dict,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> list[Path]:
    """Write config.json and the shards (index when more than one); returns the files written.

    dtype None: each tensor keeps the moge tensor's dtype; a constant the layout needs and
    the model lacks takes the model's (see _fill_dtype). config.json gets that dtype's
    fields (hfconfig.dtype_json), replacing any `config` holds.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    shapes = src.shapes()
    missing = [p.param for p in pieces if p.param not in shapes and p.fill is None]
    extra = sorted(set(shapes) - {p.param for p in pieces})
    assert not missing and not extra, f"the layout covers the model exactly: {missing} {extra}"
    fill = dtype or _fill_dtype(src, pieces, shapes)
    dtypes = [dtype or (src.dtype(p.param) if p.param in shapes else fill) for p in pieces]
    layout_shapes = [p.layout_shape(shapes[p.param]) if p.param in shapes else _fill_shape(p) for p in pieces]
    sizes = [math.prod(s) * d.itemsize for s, d in zip(layout_shapes, dtypes, strict=True)]
    shards = plan_shards(sizes, max_shard_bytes)
    n = len(shards)
    names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for name, members in zip(names, shards, strict=True):
        plan = [(pieces[i].key, dtypes[i], layout_shapes[i]) for i in members]
        with SafetensorsWriter(out / name, plan) as w:
            for i in members:
                w.write(pieces[i].key, _piece_tensor(src, pieces[i], shapes, dtypes[i]))
                weight_map[pieces[i].key] = name
    if n > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    elif (out / INDEX).exists():
        (out / INDEX).unlink()  # a stale index from an earlier export would name missing shards
    _remove_stale_weights(out, names)
    config = {**config, **dtype_json(fill)}  # `dtype` or else the model's, as the tensors are
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return [out / name for name in names]


def _remove_stale_weights(out: Path, names: list[str]) -> None:
    """Delete an earlier export's weight files in `out` that are not among `names`.

    transformers reads model.safetensors before an index, so a single file left beside
    new shards would be what it loads; old shards (model-XXXXX-of-YYYYY) would only waste
    the disk. Other files are not ours to touch.
    """
    for f in out.iterdir():
        ours = f.name == SINGLE or _SHARD_NAME.fullmatch(f.name) is not None
        if ours and f.name not in names and f.is_file():
            f.unlink()
