"""The dataset a run trains on: the plain corpus, or PanGu-Sigma's domain streams.

`load_dataset` is the one entry point: `moge.training.corpus` reads, splits and batches a
corpus; with `data.domains` set, `moge.sigma.data` splits it into domains on top of that.
"""

from __future__ import annotations

from moge.sigma.data import load_domain_dataset
from moge.training.config import DataConfig
from moge.training.corpus import (
    BYTE_VOCAB,
    Batch,
    TokenDataset,
    decode,
    encode,
    load_corpus,
    split_tokens,
    unigram_entropy_bits,
)

__all__ = [
    "BYTE_VOCAB",
    "Batch",
    "TokenDataset",
    "decode",
    "encode",
    "load_corpus",
    "load_dataset",
    "split_tokens",
    "unigram_entropy_bits",
]


def load_dataset(cfg: DataConfig) -> TokenDataset:
    """Read `cfg.path` (or the built-in corpus) and split it by `cfg.seed`; by domain if set."""
    if cfg.domains is not None:
        return load_domain_dataset(cfg)
    return load_corpus(cfg)
