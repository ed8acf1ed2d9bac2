"""The streaming safetensors reader and writer agree with the safetensors library."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from moge.interop.mapping import Piece, plan_shards
from moge.interop.tensorfile import SafetensorsReader, SafetensorsWriter

TENSORS = {
    "a": torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0)),
    "b": torch.randn(7, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16),
    "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    "empty": torch.zeros(0, 4),
    "scalar": torch.tensor(2.5),
}


def test_writer_output_reads_back_with_safetensors(tmp_path):
    path = tmp_path / "x.safetensors"
    with SafetensorsWriter(path, [(k, v.dtype, tuple(v.shape)) for k, v in TENSORS.items()]) as w:
        for k, v in TENSORS.items():
            w.write(k, v)
    back = load_file(str(path))
    for k, v in TENSORS.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_reader_reads_safetensors_files_whole_and_by_row(tmp_path):
    path = tmp_path / "y.safetensors"
    save_file(TENSORS, str(path))
    r = SafetensorsReader(path)
    for k, v in TENSORS.items():
        assert torch.equal(r.read(k), v), k
    for e in range(3):
        assert torch.equal(r.read("a", e), TENSORS["a"][e])


def test_damaged_files_are_one_value_error(tmp_path):
    path = tmp_path / "z.safetensors"
    save_file({"a": torch.zeros(100)}, str(path))
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(ValueError, match="a: its data offsets do not fit the file"):
        SafetensorsReader(path)
    (tmp_path / "w.safetensors").write_bytes(b"abc")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        SafetensorsReader(tmp_path / "w.safetensors")


def test_piece_regions_and_shard_plans():
    w = torch.arange(2 * 3 * 8).reshape(2, 3, 8)  # [E, D, 2F] with F = 4
    up = Piece("up", "w", expert=1, transpose=True, rows=(4, 8))
    assert torch.equal(up.region(w), w[1].T[4:])
    assert up.layout_shape(w.shape) == (4, 3)
    assert plan_shards([5, 5, 5, 20, 1], 10) == [[0, 1], [2], [3], [4]]


def test_a_tensor_stored_in_two_shards_is_refused_naming_both(tmp_path):
    """Which copy a reader keeps would depend on the order it reads the shards in."""
    import json

    from moge.interop.folder import LayoutFolder

    save_file({"a": torch.zeros(2), "b": torch.ones(2)}, str(tmp_path / "s1.safetensors"))
    save_file({"b": torch.full((2,), 2.0)}, str(tmp_path / "s2.safetensors"))
    index = {"metadata": {}, "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(
        ValueError, match=r"tensor 'b' is stored twice, in s1\.safetensors and s2\.safetensors"
    ):
        LayoutFolder(tmp_path)
    save_file({"a": torch.zeros(2)}, str(tmp_path / "s1.safetensors"))  # each tensor once: it reads
    assert sorted(LayoutFolder(tmp_path).keys()) == ["a", "b"]


def _raw_file(path, header) -> None:
    """A safetensors file with this JSON header and 8 zero bytes of data."""
    import json
    import struct

    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ([1, 2], "its header is not a JSON object"),
        ({"__metadata__": [1]}, "__metadata__ is not a JSON object"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, "a: its data offsets do not fit"),
        ({"a": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}, "a: dtype 'F8_E4M3' is not supported"),
    ],
)  # fmt: skip
def test_a_damaged_or_unsupported_header_is_a_value_error_naming_it(tmp_path, header, message):
    _raw_file(tmp_path / "h.safetensors", header)
    with pytest.raises(ValueError, match=message):
        SafetensorsReader(tmp_path / "h.safetensors")
