"""The plain corpus of toy language-model training: load, split, batch.

Legend: B batch, L sequence length (data.seq_len), N tokens in a stream.

Sources (`DataConfig.path`):
- None: the built-in offline corpus, CPython's `pydoc_data.topics` (~0.46 MB of English
  documentation), topics joined in sorted key order, UTF-8 bytes -> byte tokens (vocab 256).
- a text file: its raw bytes are the tokens.
- a folder: every regular file under it whose suffix is in `TEXT_SUFFIXES`, found recursively
  and read in sorted relative-path order, joined with a newline. Hidden files and folders
  (name starting with ".") are skipped, and so is any file with a NUL byte in its first
  8 KiB (binary, whatever its suffix).
- a `.bin` file: pre-tokenised native-endian (little-endian on x86/ARM) uint16 ids, as written
  by `numpy.ndarray.tofile`; read through `torch.from_file` so numpy is not needed. The vocab
  may exceed 256; `vocab_size_needed` says how large `model.vocab_size` must be.

Split: the stream is cut into contiguous chunks and a seeded permutation picks the chunks that
go to validation, so the two splits never share a token. Each split is its chunks concatenated
in stream order; a window may straddle the seam between two chunks that were not neighbours,
as it may straddle the seam between two files of a folder -- harmless for a toy model.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from moge.training.config import DataConfig
from moge.training.limits import available_memory, check_fits

BYTE_VOCAB = 256
TEXT_SUFFIXES = frozenset(
    {".txt", ".text", ".md", ".rst", ".py", ".tex", ".html", ".csv", ".json", ".yaml", ".yml", ".toml"}
)
SPLITS = ("train", "val")
_SNIFF_BYTES = 8192  # NUL in this prefix marks a file as binary
_CHUNK_SEQS = 16  # chunks are at most this many sequences long ...
_MIN_CHUNKS = 100  # ... and short enough that a corpus has about this many


# ---------------------------------------------------------------- byte encoding


def encode(text: str) -> torch.Tensor:
    """UTF-8 bytes of `text` as token ids, shape (N,), int64."""
    data = bytearray(text.encode("utf-8"))
    if not data:
        return torch.zeros(0, dtype=torch.int64)
    return torch.frombuffer(data, dtype=torch.uint8).to(torch.int64)


def decode(ids: torch.Tensor | Sequence[int]) -> str:
    """Byte ids back to text; invalid UTF-8 and ids outside 0..255 become U+FFFD."""
    ids_N = torch.as_tensor(ids, dtype=torch.int64).flatten()
    # 0xFF never occurs in UTF-8, so mapping out-of-byte ids to it makes the decoder
    # emit a replacement character for each of them.
    ids_N = torch.where((ids_N >= 0) & (ids_N < BYTE_VOCAB), ids_N, torch.full_like(ids_N, 0xFF))
    return bytes(ids_N.to(torch.uint8).tolist()).decode("utf-8", errors="replace")


def unigram_entropy_bits(tokens: torch.Tensor) -> float:
    """Empirical unigram entropy of `tokens` (any shape) in bits per token."""
    flat = tokens.flatten()
    if flat.numel() == 0:
        raise ValueError("unigram_entropy_bits: got an empty token tensor")
    counts = torch.bincount(flat.to(torch.int64)).to(torch.float64)
    p = counts[counts > 0] / flat.numel()
    return float(-(p * torch.log2(p)).sum())


# ---------------------------------------------------------------- reading sources


def _bytes_to_tokens(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _builtin_corpus() -> tuple[torch.Tensor, str]:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    data = text.encode("utf-8")
    desc = f"built-in corpus pydoc_data.topics ({len(topics)} topics, {len(data):,} bytes)"
    return _bytes_to_tokens(data), desc


def _looks_binary(data: bytes) -> bool:
    return b"\x00" in data[:_SNIFF_BYTES]


def _read_bytes(path: Path) -> bytes:
    """path's bytes; an I/O error -> OSError naming the file (the CLI prints it as one line)."""
    try:
        # bytes, their tensor copy and the split: about three times the file in memory
        check_fits(f"data.path: {path}", {"the text and its token copies": 3 * path.stat().st_size},
                   "use a smaller corpus", available_memory())  # fmt: skip
        return path.read_bytes()
    except OSError as err:
        raise OSError(f"data.path: reading {path} failed: {err.strerror or err}") from err


def _read_text_file(path: Path) -> tuple[torch.Tensor, str]:
    data = _read_bytes(path)
    if not data:
        raise ValueError(f"data.path: file {str(path)!r} is empty")
    if _looks_binary(data):
        raise ValueError(
            f"data.path: file {str(path)!r} looks binary (NUL bytes); pass a text file, "
            "a folder of text files or a uint16 .bin file"
        )
    return _bytes_to_tokens(data), f"text file {path} ({len(data):,} bytes)"


def _text_files_under(root: Path) -> list[Path]:
    found = []
    for folder, subdirs, names in os.walk(root):  # does not follow symlinked folders
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        for name in names:
            path = Path(folder) / name
            if not name.startswith(".") and path.suffix.lower() in TEXT_SUFFIXES and path.is_file():
                found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _read_folder(root: Path) -> tuple[torch.Tensor, str]:
    parts, skipped = [], 0
    for path in _text_files_under(root):
        data = _read_bytes(path)
        if not data:
            continue
        if _looks_binary(data):
            skipped += 1
            continue
        parts.append(data)
    if not parts:
        raise ValueError(
            f"data.path: folder {str(root)!r} holds no non-empty text files "
            f"(suffixes: {' '.join(sorted(TEXT_SUFFIXES))})"
        )
    data = b"\n".join(parts)
    desc = f"folder {root} ({len(parts)} text files, {len(data):,} bytes"
    return _bytes_to_tokens(data), desc + (f", {skipped} binary skipped)" if skipped else ")")


def _read_bin(path: Path) -> tuple[torch.Tensor, str]:
    n_bytes = path.stat().st_size
    if n_bytes == 0:
        raise ValueError(f"data.path: .bin file {str(path)!r} is empty")
    if n_bytes % 2:
        raise ValueError(
            f"data.path: .bin file {str(path)!r} has {n_bytes} bytes, not a whole number of uint16 tokens"
        )
    # The stream, then the train and val copies of it: about twice the file in memory.
    check_fits(f"data.path: {path}", {"the token stream and its split": 2 * n_bytes},
               "use a smaller .bin file", available_memory())  # fmt: skip
    try:
        tokens = torch.from_file(str(path), shared=False, size=n_bytes // 2, dtype=torch.uint16)
    except RuntimeError as err:  # torch reports read errors as RuntimeError
        raise OSError(f"data.path: reading {path} failed: {str(err).splitlines()[0][:200]}") from err
    return tokens, f"uint16 .bin file {path} ({n_bytes // 2:,} tokens)"


def _read_source(path: str | None) -> tuple[torch.Tensor, str]:
    """The whole token stream (N,) as uint8 (bytes) or uint16 (.bin), and a description."""
    if path is None:
        return _builtin_corpus()
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"data.path: {path!r} does not exist")
    if p.is_dir():
        return _read_folder(p)
    if not p.is_file():
        raise ValueError(f"data.path: {path!r} is neither a regular file nor a folder")
    return _read_bin(p) if p.suffix.lower() == ".bin" else _read_text_file(p)


def _max_token(tokens_N: torch.Tensor) -> int:
    # max() is not implemented for uint16, and one int64 copy of a large .bin is wasteful.
    step = 1 << 20
    return max(int(tokens_N[i : i + step].to(torch.int32).max()) for i in range(0, tokens_N.numel(), step))


# ---------------------------------------------------------------- splitting


def _chunk_len(n_tokens: int, seq_len: int) -> int:
    # Long chunks keep windows contiguous; at least ~_MIN_CHUNKS chunks keep the val share
    # close to val_fraction on small corpora; a chunk always holds one (L+1) window.
    return max(seq_len + 1, min(_CHUNK_SEQS * seq_len, n_tokens // _MIN_CHUNKS))


def split_tokens(
    tokens_N: torch.Tensor, cfg: DataConfig, source: str = "corpus"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic disjoint (train, val) split of a stream by chunks; dtypes are kept."""
    n = tokens_N.numel()
    chunk = _chunk_len(n, cfg.seq_len)
    n_chunks = -(-n // chunk)
    n_val = max(1, round(cfg.val_fraction * n_chunks))
    if n_chunks < 2 or n_val >= n_chunks:
        raise ValueError(
            f"data.seq_len: {source} has {n:,} tokens, too few to split into train and val "
            f"with seq_len={cfg.seq_len} (needs about {2 * (cfg.seq_len + 1)} or more)"
        )
    gen = torch.Generator().manual_seed(cfg.seed)
    is_val = torch.zeros(n_chunks, dtype=torch.bool)
    is_val[torch.randperm(n_chunks, generator=gen)[:n_val]] = True
    pieces = tokens_N.split(chunk)
    train = torch.cat([p for p, v in zip(pieces, is_val.tolist()) if not v])
    val = torch.cat([p for p, v in zip(pieces, is_val.tolist()) if v])
    for name, part in (("train", train), ("val", val)):
        if part.numel() < cfg.seq_len + 1:
            raise ValueError(
                f"data.seq_len: the {name} split of {source} has {part.numel():,} tokens, fewer than "
                f"seq_len+1={cfg.seq_len + 1} (corpus {n:,} tokens, val_fraction={cfg.val_fraction})"
            )
    return train, val


# ---------------------------------------------------------------- dataset


class Batch(tuple):
    """(x_BL, y_BL), unpacking like a pair, plus `domain_ids` [B] (None without domains).

    Domains: see moge.sigma.data (PanGu-Sigma routes each sequence by its domain).
    """

    domain_ids: torch.Tensor | None

    def __new__(cls, x_BL: torch.Tensor, y_BL: torch.Tensor, domain_ids: torch.Tensor | None = None):
        batch = super().__new__(cls, (x_BL, y_BL))
        batch.domain_ids = domain_ids
        return batch

    def model_kwargs(self, device: torch.device | str) -> dict:
        """Extra keyword arguments of the model call: {} or {"domain_ids": ...} on `device`."""
        return {} if self.domain_ids is None else {"domain_ids": self.domain_ids.to(device)}


@dataclass
class TokenDataset:
    """Train/val token streams plus batching.

    train, val: 1-D uint8 (byte corpora) or uint16 (.bin) tensors; batches come out int64.
    vocab_size_needed: smallest model.vocab_size that covers every id (256 for bytes).
    """

    train: torch.Tensor
    val: torch.Tensor
    seq_len: int
    vocab_size_needed: int
    source: str

    def tokens(self, split: str) -> torch.Tensor:
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {', '.join(SPLITS)}; got {split!r}")
        return self.train if split == "train" else self.val

    def check_vocab_size(self, vocab_size: int) -> None:
        """Raise if a model with `vocab_size` embeddings cannot take every token id."""
        if vocab_size < self.vocab_size_needed:
            raise ValueError(
                f"model.vocab_size: {vocab_size} is too small for {self.source}: token ids go up to "
                f"{self.vocab_size_needed - 1}, so it must be >= {self.vocab_size_needed}"
            )

    def _windows(self, tokens_N: torch.Tensor, starts_B: torch.Tensor) -> Batch:
        offsets = torch.arange(self.seq_len + 1)
        win_BL1 = tokens_N[starts_B[:, None] + offsets[None, :]].to(torch.int64)
        return Batch(win_BL1[:, :-1], win_BL1[:, 1:])

    def get_batch(self, split: str, batch_size: int, generator: torch.Generator) -> Batch:
        """Random windows: x_BL, y_BL int64 with y_BL[:, t] == x_BL[:, t + 1] shifted by one.

        Starts come from `generator` (a CPU torch.Generator), so its state fixes the batch.
        """
        tokens_N = self.tokens(split)
        n_starts = tokens_N.numel() - self.seq_len
        starts_B = torch.randint(0, n_starts, (batch_size,), generator=generator)
        return self._windows(tokens_N, starts_B)

    def iter_eval_batches(self, split: str, batch_size: int, max_batches: int) -> Iterator[Batch]:
        """Fixed, evenly spaced windows (no randomness) in up to `max_batches` batches.

        The same split and sizes always give the same windows, so losses compare across runs.
        A split with fewer distinct starts than batch_size * max_batches gives fewer windows.
        """
        tokens_N = self.tokens(split)
        last_start = tokens_N.numel() - self.seq_len - 1
        n_windows = min(batch_size * max_batches, last_start + 1)
        starts = torch.arange(n_windows, dtype=torch.int64) * last_start // max(n_windows - 1, 1)
        for starts_B in starts.split(batch_size):
            yield self._windows(tokens_N, starts_B)


def load_corpus(cfg: DataConfig) -> TokenDataset:
    """Read `cfg.path` (or the built-in corpus) and split it by `cfg.seed` (no domains)."""
    tokens_N, source = _read_source(cfg.path)
    vocab_needed = _max_token(tokens_N) + 1 if tokens_N.dtype == torch.uint16 else BYTE_VOCAB
    train, val = split_tokens(tokens_N, cfg, source)
    return TokenDataset(
        train=train, val=val, seq_len=cfg.seq_len, vocab_size_needed=vocab_needed, source=source
    )
