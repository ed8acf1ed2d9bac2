"""Safetensors files read and written one tensor at a time, without mmap or whole-file loads.

Reading uses positioned reads of just the bytes of one tensor (or of one index of its
first axis, e.g. one expert of a stacked [E, ...] tensor), so nothing stays mapped and
the resident memory is what the caller holds. Writing lays out the header from the
planned names, dtypes and shapes first, then appends each tensor's bytes as it comes.
The format (https://github.com/huggingface/safetensors): an 8-byte little-endian
header length, a JSON header {name: {dtype, shape, data_offsets}} padded with spaces,
then the raw little-endian data.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100_000_000  # bytes: larger headers are damaged files, not models


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class SafetensorsReader:
    """Header of one safetensors file; `read(key, index)` fetches one tensor or one row of it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ValueError("shorter than the 8-byte header length")
                (n,) = struct.unpack("<Q", head)
                if n > _MAX_HEADER:
                    raise ValueError(f"header length {n} is implausible")
                header = json.loads(f.read(n))
        except (OSError, ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{self.path}: not a readable safetensors file ({err})") from err
        if not isinstance(header, dict):
            raise ValueError(
                f"{self.path}: not a readable safetensors file (its header is not a JSON object)"
            )
        self.metadata: dict = header.pop("__metadata__", None) or {}
        if not isinstance(self.metadata, dict):
            raise ValueError(
                f"{self.path}: not a readable safetensors file (__metadata__ is not a JSON object)"
            )
        size = self.path.stat().st_size
        self.tensors: dict[str, TensorInfo] = {}
        for key, entry in header.items():
            try:
                kind = str(entry["dtype"])
                a, b = (int(o) for o in entry["data_offsets"])
                shape = tuple(int(s) for s in entry["shape"])
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(
                    f"{self.path}: {key}: unsupported or damaged header entry {entry!r}"
                ) from err
            if kind not in DTYPES:  # e.g. an FP8 release's F8_E4M3: dequantise it first
                raise ValueError(
                    f"{self.path}: {key}: dtype {kind!r} is not supported (one of {', '.join(DTYPES)})"
                )
            dtype = DTYPES[kind]
            start, end = 8 + n + a, 8 + n + b
            if a < 0 or end > size or end - start != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"{self.path}: {key}: its data offsets do not fit the file (truncated?)")
            self.tensors[key] = TensorInfo(dtype, shape, start, end)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def read(self, key: str, index: int | None = None) -> torch.Tensor:
        """The tensor `key`, or only `key[index]` (contiguous in the file), as a fresh CPU tensor."""
        info = self.tensors[key]
        start, shape = info.start, info.shape
        if index is not None:
            row = info.nbytes // shape[0]
            start, shape = start + index * row, shape[1:]
        nbytes = math.prod(shape) * info.dtype.itemsize
        buf = bytearray(nbytes)
        with open(self.path, "rb") as f:
            f.seek(start)
            got = f.readinto(buf)
        if got != nbytes:
            raise ValueError(f"{self.path}: {key}: the file ended early")
        if nbytes == 0:
            return torch.empty(shape, dtype=info.dtype)
        return torch.frombuffer(buf, dtype=info.dtype).reshape(shape)


class SafetensorsWriter:
    """Writes one safetensors file whose tensors are planned up front and written in order."""

    def __init__(
        self, path: str | Path, plan: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], metadata=None
    ) -> None:
        self.path = Path(path)
        header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        self._expected: list[tuple[str, torch.dtype, tuple[int, ...]]] = list(plan)
        for name, dtype, shape in self._expected:
            n = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self._file = open(self.path, "wb")  # noqa: SIM115 -- closed by close() / __exit__
        self._file.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        exp_name, dtype, shape = self._expected[self._next]
        assert (name, tensor.dtype, tuple(tensor.shape)) == (exp_name, dtype, shape), "written as planned"
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            self._file.write(t.reshape(-1).view(torch.uint8).numpy().data)
        self._next += 1

    def close(self) -> None:
        assert self._next == len(self._expected), "every planned tensor written"
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()
