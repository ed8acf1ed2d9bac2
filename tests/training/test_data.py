"""Tests for moge/training/data.py: sources, split, batches, entropy, byte encoding, errors."""

from __future__ import annotations

import array
import math

import pytest
import torch

from moge.training.config import DataConfig
from moge.training.data import (
    TokenDataset,
    decode,
    encode,
    load_dataset,
    split_tokens,
    unigram_entropy_bits,
)


def _write_bin(path, ids):
    path.write_bytes(array.array("H", ids).tobytes())  # native order, like numpy.tofile


def _text(n_bytes: int, seed: int = 0) -> str:
    gen = torch.Generator().manual_seed(seed)
    letters = torch.randint(ord("a"), ord("z") + 1, (n_bytes,), generator=gen)
    return bytes(letters.to(torch.uint8).tolist()).decode("ascii")


@pytest.fixture(scope="module")
def builtin() -> TokenDataset:
    return load_dataset(DataConfig(seq_len=64, val_fraction=0.1, seed=0))


# ---------------------------------------------------------------- built-in corpus


def test_builtin_corpus_is_large_bytes_and_deterministic(builtin):
    again = load_dataset(DataConfig(seq_len=64, val_fraction=0.1, seed=0))
    assert builtin.train.numel() + builtin.val.numel() > 300_000
    assert builtin.train.dtype == torch.uint8
    assert builtin.vocab_size_needed == 256
    assert "pydoc_data" in builtin.source
    torch.testing.assert_close(builtin.train, again.train)
    torch.testing.assert_close(builtin.val, again.val)


def test_builtin_corpus_starts_with_first_sorted_topic(builtin):
    from pydoc_data.topics import topics

    first = topics[sorted(topics)[0]].encode("utf-8")[:200]
    whole = torch.cat([builtin.train, builtin.val])
    # The first chunk goes to either split; it starts one of them.
    heads = {bytes(builtin.train[:200].tolist()), bytes(builtin.val[:200].tolist())}
    assert first in heads
    assert whole.numel() == len("\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8"))


# ---------------------------------------------------------------- split


def _positions(n: int, seq_len: int, seed: int, frac: float = 0.1):
    ids_N = torch.arange(n, dtype=torch.int64)  # token value == stream position
    return split_tokens(ids_N, DataConfig(seq_len=seq_len, val_fraction=frac, seed=seed))


def test_split_is_disjoint_and_covers_stream():
    train, val = _positions(10_000, 16, seed=3)
    assert set(train.tolist()).isdisjoint(val.tolist())
    torch.testing.assert_close(torch.cat([train, val]).sort().values, torch.arange(10_000))
    # Each split keeps stream order.
    assert bool((train.diff() > 0).all()) and bool((val.diff() > 0).all())


@pytest.mark.parametrize("frac", [0.05, 0.1, 0.25, 0.5])
def test_split_val_share_is_about_val_fraction(frac):
    train, val = _positions(20_000, 8, seed=1, frac=frac)
    share = val.numel() / (train.numel() + val.numel())
    assert abs(share - frac) < 0.02


def test_split_depends_only_on_seed():
    a_train, a_val = _positions(10_000, 16, seed=5)
    b_train, b_val = _positions(10_000, 16, seed=5)
    c_train, c_val = _positions(10_000, 16, seed=6)
    torch.testing.assert_close(a_val, b_val)
    torch.testing.assert_close(a_train, b_train)
    assert not torch.equal(a_val, c_val)


def test_builtin_split_seed_changes_val(builtin):
    other = load_dataset(DataConfig(seq_len=64, val_fraction=0.1, seed=1))
    assert not torch.equal(builtin.val[: other.val.numel()], other.val[: builtin.val.numel()])
    share = builtin.val.numel() / (builtin.train.numel() + builtin.val.numel())
    assert abs(share - 0.1) < 0.02


# ---------------------------------------------------------------- batches


def test_get_batch_shapes_shift_and_determinism(builtin):
    x, y = builtin.get_batch("train", 4, torch.Generator().manual_seed(0))
    assert x.shape == (4, 64) and y.shape == (4, 64)
    assert x.dtype == torch.int64 and y.dtype == torch.int64
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    x2, y2 = builtin.get_batch("train", 4, torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, x2)
    torch.testing.assert_close(y, y2)
    x3, _ = builtin.get_batch("train", 4, torch.Generator().manual_seed(1))
    assert not torch.equal(x, x3)


def test_get_batch_windows_come_from_the_split():
    ds = TokenDataset(
        train=torch.arange(100, 200, dtype=torch.int64),
        val=torch.arange(0, 50, dtype=torch.int64),
        seq_len=8,
        vocab_size_needed=256,
        source="test",
    )
    gen = torch.Generator().manual_seed(0)
    for split, lo, hi in (("train", 100, 200), ("val", 0, 50)):
        x, y = ds.get_batch(split, 64, gen)
        assert int(x.min()) >= lo and int(y.max()) < hi
        torch.testing.assert_close(y, x + 1)  # contiguous windows of the stream
    state = gen.get_state()
    a, _ = ds.get_batch("val", 3, gen)
    gen.set_state(state)
    b, _ = ds.get_batch("val", 3, gen)
    torch.testing.assert_close(a, b)


def test_iter_eval_batches_fixed_evenly_spaced_windows():
    ds = TokenDataset(
        train=torch.arange(1000),
        val=torch.arange(101),
        seq_len=10,
        vocab_size_needed=1000,
        source="test",
    )
    batches = list(ds.iter_eval_batches("val", 2, 3))
    assert len(batches) == 3
    starts = torch.cat([x[:, 0] for x, _ in batches])
    torch.testing.assert_close(starts, torch.tensor([0, 18, 36, 54, 72, 90]))  # last start 101-11=90
    for x, y in batches:
        assert x.shape == (2, 10) and x.dtype == torch.int64
        torch.testing.assert_close(y, x + 1)
    again = torch.cat([x[:, 0] for x, _ in ds.iter_eval_batches("val", 2, 3)])
    torch.testing.assert_close(starts, again)


def test_iter_eval_batches_tiny_split_gives_fewer_windows():
    ds = TokenDataset(
        train=torch.arange(100), val=torch.arange(13), seq_len=10, vocab_size_needed=100, source="t"
    )
    starts = torch.cat([x[:, 0] for x, _ in ds.iter_eval_batches("val", 4, 5)])
    torch.testing.assert_close(starts, torch.tensor([0, 1, 2]))


def test_unknown_split_raises(builtin):
    with pytest.raises(ValueError, match="split"):
        builtin.get_batch("test", 2, torch.Generator())


# ---------------------------------------------------------------- file sources


def test_text_file_source(tmp_path):
    text = _text(5000)
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    ds = load_dataset(DataConfig(path=str(path), seq_len=16, seed=0))
    assert str(path) in ds.source and ds.vocab_size_needed == 256
    assert sorted(torch.cat([ds.train, ds.val]).tolist()) == sorted(text.encode())
    x, y = ds.get_batch("val", 2, torch.Generator().manual_seed(0))
    assert decode(x[0]) in text


def test_folder_source_sorted_recursive_text_only(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b" / "two.md").write_text("B" * 400)
    (tmp_path / "a.txt").write_text("A" * 400)
    (tmp_path / "c.rst").write_text("C" * 400)
    (tmp_path / "image.png").write_bytes(b"P" * 400)  # not a text suffix
    (tmp_path / "blob.txt").write_bytes(b"Z\x00" * 200)  # text suffix but binary
    (tmp_path / ".hidden" / "h.txt").write_text("H" * 400)
    ds = load_dataset(DataConfig(path=str(tmp_path), seq_len=4, val_fraction=0.1, seed=0))
    stream = torch.cat([ds.train, ds.val]).sort().values
    expected = sorted(("A" * 400 + "\n" + "B" * 400 + "\n" + "C" * 400).encode())
    assert stream.tolist() == expected
    assert "3 text files" in ds.source and "1 binary skipped" in ds.source


def test_folder_order_is_sorted_relative_paths(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("1" * 300)
    (tmp_path / "b.txt").write_text("2" * 300)
    ds = load_dataset(DataConfig(path=str(tmp_path), seq_len=2, val_fraction=0.05, seed=0))
    # a/x.txt sorts before b.txt, so the 1s come first in whichever split holds them.
    for part in (ds.train, ds.val):
        s = bytes(part.tolist()).replace(b"\n", b"")
        assert s == bytes(sorted(s))
    assert set(bytes(ds.train.tolist())) >= {ord("1"), ord("2")}


def test_bin_source_with_large_ids(tmp_path):
    ids = [(i * 37) % 1000 for i in range(4000)]
    path = tmp_path / "tokens.bin"
    _write_bin(path, ids)
    ds = load_dataset(DataConfig(path=str(path), seq_len=16, seed=0))
    assert ds.train.dtype == torch.uint16
    assert ds.vocab_size_needed == max(ids) + 1
    assert sorted(torch.cat([ds.train, ds.val]).to(torch.int64).tolist()) == sorted(ids)
    x, y = ds.get_batch("train", 3, torch.Generator().manual_seed(0))
    assert x.dtype == torch.int64 and int(x.max()) < 1000
    torch.testing.assert_close(y[:, :-1], x[:, 1:])
    ds.check_vocab_size(1000)
    with pytest.raises(ValueError, match=r"model\.vocab_size.*tokens\.bin.*>= 1000"):
        ds.check_vocab_size(256)


def test_bin_source_full_uint16_range(tmp_path):
    ids = [65535, 0] * 500
    path = tmp_path / "max.bin"
    _write_bin(path, ids)
    ds = load_dataset(DataConfig(path=str(path), seq_len=4, seed=0))
    assert ds.vocab_size_needed == 65536
    assert int(ds.get_batch("train", 8, torch.Generator().manual_seed(0))[0].max()) == 65535


# ---------------------------------------------------------------- errors


def test_missing_path_raises(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=r"data\.path.*nope\.txt"):
        load_dataset(DataConfig(path=str(path)))


def test_empty_file_raises(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("")
    with pytest.raises(ValueError, match=r"data\.path.*empty\.txt.*empty"):
        load_dataset(DataConfig(path=str(path)))


def test_empty_folder_raises(tmp_path):
    folder = tmp_path / "corpus_dir"
    folder.mkdir()
    (folder / "empty.txt").write_text("")
    (folder / "pic.png").write_bytes(b"x" * 1000)
    with pytest.raises(ValueError, match=r"data\.path.*corpus_dir.*no non-empty text files"):
        load_dataset(DataConfig(path=str(folder)))


def test_binary_text_file_raises(tmp_path):
    path = tmp_path / "weights.dat"
    path.write_bytes(b"\x00\x01" * 100)
    with pytest.raises(ValueError, match=r"data\.path.*weights\.dat.*binary"):
        load_dataset(DataConfig(path=str(path)))


def test_odd_bin_raises(tmp_path):
    path = tmp_path / "odd.bin"
    path.write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match=r"data\.path.*odd\.bin.*3 bytes"):
        load_dataset(DataConfig(path=str(path)))


def test_empty_bin_raises(tmp_path):
    path = tmp_path / "zero.bin"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"data\.path.*zero\.bin.*empty"):
        load_dataset(DataConfig(path=str(path)))


@pytest.mark.parametrize("n_bytes", [10, 30, 40])
def test_corpus_too_short_for_seq_len_raises(tmp_path, n_bytes):
    path = tmp_path / "short.txt"
    path.write_text(_text(n_bytes))
    with pytest.raises(ValueError, match=r"data\.seq_len.*short\.txt"):
        load_dataset(DataConfig(path=str(path), seq_len=32))


def test_just_long_enough_corpus_loads(tmp_path):
    path = tmp_path / "ok.txt"
    path.write_text(_text(200))
    ds = load_dataset(DataConfig(path=str(path), seq_len=32, val_fraction=0.5, seed=0))
    assert ds.train.numel() >= 33 and ds.val.numel() >= 33


# ---------------------------------------------------------------- entropy and encoding


def test_unigram_entropy_known_values():
    assert unigram_entropy_bits(encode("aabb")) == pytest.approx(1.0)
    assert unigram_entropy_bits(encode("aaaa")) == pytest.approx(0.0)
    assert unigram_entropy_bits(encode("abcd")) == pytest.approx(2.0)
    h_aaab = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert unigram_entropy_bits(encode("aaab")) == pytest.approx(h_aaab)
    assert unigram_entropy_bits(torch.tensor([300, 300, 7, 7], dtype=torch.uint16)) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        unigram_entropy_bits(torch.zeros(0, dtype=torch.int64))


def test_builtin_entropy_is_plausible_for_english(builtin):
    h = unigram_entropy_bits(builtin.val)
    assert 3.5 < h < 5.5


def test_encode_decode_round_trip():
    text = "Grouped experts — Ünïcödé ✓ 🚀\nnew line"
    ids = encode(text)
    assert ids.dtype == torch.int64 and ids.numel() == len(text.encode("utf-8"))
    assert decode(ids) == text
    assert decode(ids.tolist()) == text
    assert encode("").numel() == 0 and decode([]) == ""


def test_decode_replaces_invalid_bytes_and_non_byte_ids():
    assert decode([104, 105, 0xFF]) == "hi\ufffd"
    assert decode([104, 300, 105]) == "h\ufffdi"
    assert decode(torch.tensor([[104], [105]])) == "hi"
