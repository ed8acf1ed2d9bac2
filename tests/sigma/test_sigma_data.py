"""Domains in the data (moge.sigma.data, moge.sigma.domains): windows, ids, splits, errors."""

from __future__ import annotations

import pytest
import torch

from moge.sigma.data import DomainTokenDataset
from moge.sigma.domains import TOPIC_FAMILIES
from moge.training.config import DataConfig
from moge.training.data import Batch, load_dataset


def synthetic(seq_len: int = 8) -> DomainTokenDataset:
    """Three domains whose tokens live in disjoint ranges: 0-9, 100-109, 200-209."""
    parts = [torch.arange(n) % 10 + 100 * d for d, n in enumerate((40, 25, 60))]
    train = [p.to(torch.uint8) for p in parts]
    val = [(p[:20] + 5).to(torch.uint8) for p in parts]
    return DomainTokenDataset(
        train=torch.cat(train), val=torch.cat(val), seq_len=seq_len, vocab_size_needed=256, source="synthetic",
        domains=["a", "b", "c"], train_parts=train, val_parts=val,
    )  # fmt: skip


def assert_windows_inside_their_domain(batch: Batch) -> None:
    x_BL, y_BL = batch  # unpacks like the old (x, y) pair
    band_B = torch.div(torch.cat([x_BL, y_BL[:, -1:]], 1), 100, rounding_mode="floor")
    assert torch.equal(band_B, batch.domain_ids[:, None].expand_as(band_B)), (x_BL, batch.domain_ids)


def test_random_windows_never_cross_domains_and_carry_their_id():
    ds = synthetic()
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(20):
        batch = ds.get_batch("train", 16, gen)
        assert_windows_inside_their_domain(batch)
        seen |= set(batch.domain_ids.tolist())
    assert seen == {0, 1, 2}
    again = ds.get_batch("train", 16, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], ds.get_batch("train", 16, torch.Generator().manual_seed(0))[0])


def test_eval_windows_per_domain_and_overall():
    ds = synthetic()
    for batch in ds.iter_eval_batches("val", 4, 10):
        assert_windows_inside_their_domain(batch)
    b = list(ds.iter_eval_batches("val", 4, 10, domain="b"))
    assert all(set(x.domain_ids.tolist()) == {1} for x in b)
    # Every start of b's val part once (20 - 8 = 12 of them), evenly spaced, in order.
    assert torch.cat([x[0][:, 0] for x in b]).tolist() == [(i % 10) + 105 for i in range(12)]
    with pytest.raises(ValueError, match="unknown domain 'z'; the data has a, b, c"):
        next(ds.iter_eval_batches("val", 4, 1, domain="z"))


def test_topics_split_the_builtin_corpus_into_families():
    ds = load_dataset(DataConfig(seq_len=64, domains="topics"))
    assert ds.domains == list(TOPIC_FAMILIES)
    sizes = [p.numel() for p in ds.train_parts]
    assert min(sizes) > 50_000, sizes
    assert "in 4 domain(s)" in ds.source and "in no domain" not in ds.source
    # Each domain is split on its own, so one domain alone gives the very same val windows.
    alone = load_dataset(DataConfig(seq_len=64, domains="topics", only_domain="library"))
    assert alone.domains == ["library"]
    full_windows = [b[0] for b in ds.iter_eval_batches("val", 8, 3, domain="library")]
    alone_windows = [b[0] for b in alone.iter_eval_batches("val", 8, 3)]
    assert all(torch.equal(a, b) for a, b in zip(full_windows, alone_windows, strict=True))
    assert all(bool((b.domain_ids == 0).all()) for b in alone.iter_eval_batches("val", 8, 3))


def test_subfolders_and_glob_mappings(tmp_path):
    for sub, text in (
        ("news", "news text " * 40),
        ("code", "def f(): pass\n" * 30),
        ("code/deep", "x = 1\n" * 50),
    ):
        (tmp_path / sub).mkdir(parents=True, exist_ok=True)
        (tmp_path / sub / "a.txt").write_text(text)
    (tmp_path / "top.txt").write_text("no domain " * 30)
    ds = load_dataset(DataConfig(path=str(tmp_path), seq_len=8, domains="subfolders"))
    assert ds.domains == ["code", "news"]  # sorted; code/deep belongs to code
    assert ds.train_parts[0].numel() + ds.val_parts[0].numel() == len("def f(): pass\n" * 30) + 1 + len(
        "x = 1\n" * 50
    )
    assert "1 files in no domain" in ds.source
    # First match wins, so a catch-all may come last.
    mapped = load_dataset(
        DataConfig(path=str(tmp_path), seq_len=8, domains={"deep": ["*/deep/*"], "rest": ["*"]})
    )
    assert mapped.domains == ["deep", "rest"]
    assert mapped.train_parts[0].numel() + mapped.val_parts[0].numel() == len("x = 1\n" * 50)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(domains="topics", path="somewhere"), "topics splits the built-in corpus"),
        (dict(domains="subfolders"), "subfolders needs data.path"),
        (dict(domains={"a": "*.txt"}), "domain 'a': expected a non-empty list of globs"),
        (dict(domains=["a"]), "expected topics, subfolders or a mapping"),
        (dict(only_domain="a"), "data.only_domain: needs data.domains"),
        (dict(domains={"a": ["*"]}, only_domain="b"), "unknown domain 'b'; data.domains has a"),
    ],
)
def test_bad_domain_specs_name_the_field(kwargs, fragment):
    with pytest.raises(ValueError, match="data.") as err:
        DataConfig(**kwargs)
    assert fragment in str(err.value)


def test_a_domain_matching_nothing_is_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("text " * 100)
    with pytest.raises(ValueError, match="domain 'b' matches no file"):
        load_dataset(DataConfig(path=str(tmp_path), seq_len=8, domains={"a": ["a.txt"], "b": ["b/*"]}))
    with pytest.raises(ValueError, match="needs the built-in corpus or a folder"):
        load_dataset(DataConfig(path=str(tmp_path / "a.txt"), seq_len=8, domains={"a": ["*"]}))


def test_batches_without_domains_are_plain_pairs():
    ds = load_dataset(DataConfig(seq_len=16))
    batch = ds.get_batch("train", 2, torch.Generator().manual_seed(0))
    x_BL, y_BL = batch
    assert batch.domain_ids is None and batch.model_kwargs("cpu") == {}
    assert torch.equal(x_BL[:, 1:], y_BL[:, :-1])
