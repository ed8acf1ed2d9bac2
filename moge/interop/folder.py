"""A checkpoint folder as a set of named tensors: config.json + safetensors file(s), headers only.

Tensors are read one at a time (moge.interop.tensorfile). Other spellings of the same
tensors (transformers 5's stacked experts) are offered under the names a layout uses.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from moge.interop.tensorfile import SafetensorsReader

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


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
    """config.json + model.safetensors, or else shards listed by model.safetensors.index.json.

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
                if key in self.where:  # which copy counts would depend on the reading order
                    raise ValueError(
                        f"{self.path}: tensor {key!r} is stored twice, in {self.where[key][0].path.name} "
                        f"and {reader.path.name}"
                    )
                self.where[key] = (reader, key, None, None)

    def _readers(self) -> list[SafetensorsReader]:
        # model.safetensors first, as transformers' from_pretrained looks for it: a folder
        # holding both (its own sharded save over a single-file one leaves the file) loads
        # the single file there, and the same weights here.
        single = self.path / SINGLE
        if single.exists():
            return [SafetensorsReader(single)]
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
        raise FileNotFoundError(f"{self.path}: neither {SINGLE} nor {INDEX}")

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
