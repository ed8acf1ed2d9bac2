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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from moge.config import ModelConfig
from moge.interop.tensorfile import SafetensorsReader, SafetensorsWriter
from moge.layer import MoGEConfig

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DEFAULT_SHARD_BYTES = 2 * 1024**3
# Keys a loader skips: RoPE tables some checkpoints carry (moge derives them from the config).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


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


def decoder_pieces(m: ModelConfig) -> list[Piece]:
    """Embedding, final norm, LM head (untied), and every block's attention and two norms."""
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
            if m.o_bias if proj == "o" else m.qkv_bias:
                out.append(Piece(f"{hf}.self_attn.{proj}_proj.bias", f"{mg}.attn.{proj}_proj.bias"))
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


def dense_pattern(n_layers: int, moe_layers: set[int], where: str) -> tuple[int, int]:
    """(first_dense_layers, moe_every) giving exactly `moe_layers`, or ValueError."""
    if not moe_layers:
        return n_layers, 1
    first = min(moe_layers)
    rest = sorted(moe_layers)
    every = rest[1] - rest[0] if len(rest) > 1 else max(n_layers - first, 1)
    m = ModelConfig(n_layers=n_layers, first_dense_layers=first, moe_every=every)
    if set(moe_layers_of(m)) != moe_layers:
        raise ValueError(
            f"{where}: MoE layers {sorted(moe_layers)} do not follow moge's pattern "
            "(the first N layers dense, then every k-th layer MoE)"
        )
    return first, every


def moe_layers_of(m: ModelConfig) -> list[int]:
    return [i for i in range(m.n_layers) if m.is_moe_layer(i)]


# ---------------------------------------------------------------- config.json helpers


def need(hf: dict, key: str, where: str):
    if key not in hf or hf[key] is None:
        raise ValueError(f"{where}: config.json lacks the field {key!r}")
    return hf[key]


def rope_theta(hf: dict, where: str) -> float:
    """rope_theta from transformers 5's rope_parameters or the older top-level field."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type", "default") if params else (scaling.get("rope_type") or scaling.get("type"))
    if kind not in (None, "default"):
        raise ValueError(f"{where}: rope_type {kind!r}: moge implements plain RoPE only (rope_type default)")
    theta = params.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        raise ValueError(
            f"{where}: config.json gives no rope_theta (neither rope_parameters.rope_theta nor rope_theta)"
        )
    return float(theta)


def check_silu(hf: dict, where: str) -> None:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{where}: hidden_act {act!r}: moge's FFNs are SwiGLU (silu)")


def check_no_sliding(hf: dict, where: str) -> None:
    if hf.get("use_sliding_window"):
        raise ValueError(f"{where}: use_sliding_window is true; moge has full causal attention only")


def base_model_config(hf: dict, where: str, **fields) -> ModelConfig:
    """The ModelConfig fields every layout names the same way; `fields` adds the rest."""
    check_silu(hf, where)
    check_no_sliding(hf, where)
    heads = int(need(hf, "num_attention_heads", where))
    d = int(need(hf, "hidden_size", where))
    head_dim = hf.get("head_dim")
    kwargs = dict(
        vocab_size=int(need(hf, "vocab_size", where)),
        d_model=d,
        n_layers=int(need(hf, "num_hidden_layers", where)),
        n_heads=heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(head_dim) if head_dim and int(head_dim) != d // heads else None,
        rope_theta=rope_theta(hf, where),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_seq_len=int(hf.get("max_position_embeddings") or 4096),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )
    kwargs.update(fields)
    try:
        return ModelConfig(**kwargs)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err


def base_config_json(m: ModelConfig, arch: str, model_type: str) -> dict:
    return {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads,
        "head_dim": m.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.max_seq_len,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_parameters": {"rope_theta": m.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": m.tie_embeddings,
        "initializer_range": m.init_std,
        "attention_dropout": 0.0,
        "use_cache": True,
    }


def dense_moe_placeholder(d_model: int) -> MoGEConfig:
    """The `moe` section of a model without MoE layers (it builds nothing)."""
    return MoGEConfig(d_model=d_model, num_experts=1, num_groups=1, top_k=1, expert_hidden=1, router="global")


def refuse(layout: str, what: str, why: str = "") -> ValueError:
    return ValueError(f"layout {layout}: cannot express {what}" + (f" ({why})" if why else ""))


def check_plain_routing(layout: str, e: MoGEConfig, *, normalize: bool | None) -> None:
    """The transformers MoE layouts: softmax over all experts, global top-k, nothing else."""
    if e.router != "global":
        raise ValueError(
            f"layout {layout}: the model uses the {e.router} router, and transformers has no MoGE "
            "(or other grouped) router, so the checkpoint would route differently; export it with "
            "--to pangu (the Pangu Pro MoE layout, which has the grouped router)"
            if e.router in ("grouped", "random", "group_limited")
            else f"layout {layout}: router {e.router}"
        )
    if e.score_func != "softmax":
        raise refuse(layout, f"score_func {e.score_func}", "its router is a softmax")
    if e.route_scale != 1.0:
        raise refuse(layout, f"route_scale {e.route_scale}", "no field for it")
    if e.learned_expert_scale:
        raise refuse(layout, "learned_expert_scale", "no tensor for it")
    if e.bias_update_rate > 0:
        raise refuse(layout, "the aux-loss-free balancing bias", "no tensor for it")
    if normalize is not None and e.normalize_weights != normalize:
        raise refuse(
            layout,
            f"normalize_weights={e.normalize_weights}",
            f"its gates are always renormalised={normalize}",
        )


# ---------------------------------------------------------------- a layout folder on disk


@dataclass(frozen=True)
class _Info:
    shape: tuple[int, ...]
    dtype: torch.dtype


class _DictReader:
    """In-memory tensors behind the SafetensorsReader interface LayoutFolder uses."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.data = {k: v.detach() for k, v in tensors.items()}
        self.tensors = {k: _Info(tuple(v.shape), v.dtype) for k, v in self.data.items()}

    def read(self, key: str, index: int | None = None) -> torch.Tensor:
        t = self.data[key]
        return (t[index] if index is not None else t).clone()


class LayoutFolder:
    """config.json + model.safetensors, or shards listed by model.safetensors.index.json.

    Only headers are read here. Transformers 5 in-memory names for stacked experts
    (`mlp.experts.gate_up_proj` [E, 2F, D], `mlp.experts.down_proj` [E, D, F]) are
    offered under the per-expert names `save_pretrained` writes (see `alias_fused`).
    """

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], config: dict, name: str = "<tensors>"
    ) -> LayoutFolder:
        """The same view of tensors held in memory (e.g. a module's state_dict)."""
        folder = cls.__new__(cls)
        folder.path, folder.config = Path(name), config
        reader = _DictReader(tensors)
        folder.where = {k: (reader, k, None, None) for k in tensors}
        return folder

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        cfg = self.path / "config.json"
        if not cfg.exists():
            raise FileNotFoundError(f"{self.path}: no config.json (not a model folder)")
        try:
            self.config: dict = json.loads(cfg.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{cfg}: not valid JSON ({err})") from err
        self.where: dict[str, tuple] = {}  # key -> (reader, stored key, index or None, rows or None)
        for reader in self._readers():
            for key in reader.tensors:
                self.where[key] = (reader, key, None, None)

    def _readers(self) -> list[SafetensorsReader]:
        index = self.path / INDEX
        if index.exists():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{index}: not a valid index ({err})") from err
            files = sorted(set(weight_map.values()))
            for name in files:
                if not (self.path / name).exists():
                    raise FileNotFoundError(f"{index}: names {name}, which is missing")
            return [SafetensorsReader(self.path / name) for name in files]
        single = self.path / SINGLE
        if not single.exists():
            raise FileNotFoundError(f"{self.path}: neither {SINGLE} nor {INDEX}")
        return [SafetensorsReader(single)]

    def alias_fused(self, names: Callable[[str, int], tuple[str, str, str]]) -> None:
        """Offer stacked `<prefix>.experts.gate_up_proj` [E, 2F, D] / `down_proj` [E, D, F] per expert.

        names(prefix, e) -> the (gate, up, down) per-expert key names of the layout.
        """
        for key in list(self.where):
            for tail in (".experts.gate_up_proj", ".experts.down_proj"):
                if not key.endswith(tail):
                    continue
                reader = self.where.pop(key)[0]
                shape = reader.tensors[key].shape
                prefix = key[: -len(tail)]
                for e in range(shape[0]):
                    gate, up, down = names(prefix, e)
                    if tail.endswith("down_proj"):
                        self.where[down] = (reader, key, e, None)
                    else:
                        F = shape[1] // 2
                        self.where[gate] = (reader, key, e, (0, F))
                        self.where[up] = (reader, key, e, (F, 2 * F))

    def alias(self, new: str, old: str) -> None:
        """Offer tensor `old` under the name `new` (another spelling of the same layout)."""
        if old in self.where and new not in self.where:
            self.where[new] = self.where.pop(old)

    def keys(self) -> list[str]:
        return list(self.where)

    def shape(self, key: str) -> tuple[int, ...]:
        reader, real, index, rows = self.where[key]
        shape = reader.tensors[real].shape
        if index is not None:
            shape = shape[1:]
        if rows is not None:
            shape = (rows[1] - rows[0], *shape[1:])
        return tuple(shape)

    def dtype(self, key: str) -> torch.dtype:
        reader, real, _, _ = self.where[key]
        return reader.tensors[real].dtype

    def read(self, key: str) -> torch.Tensor:
        reader, real, index, rows = self.where[key]
        t = reader.read(real, index)
        return t[rows[0] : rows[1]] if rows is not None else t


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
        t = torch.empty(shape, dtype=dtype or folder.dtype(parts[0].key))
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
    """The tensors of one moge model.safetensors, read one tensor (or one expert) at a time."""

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

    dtype None: each tensor keeps the moge tensor's dtype.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    shapes = src.shapes()
    missing = [p.param for p in pieces if p.param not in shapes and p.fill is None]
    extra = sorted(set(shapes) - {p.param for p in pieces})
    assert not missing and not extra, f"the layout covers the model exactly: {missing} {extra}"
    dtypes = [dtype or (src.dtype(p.param) if p.param in shapes else torch.float32) for p in pieces]
    layout_shapes = [p.layout_shape(shapes[p.param]) if p.param in shapes else p.shape for p in pieces]
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
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return [out / name for name in names]
