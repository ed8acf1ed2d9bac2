"""A token dataset split into domains: every window lies in one domain and carries its id.

Legend: B batch, L sequence length, N domains.

Each domain's stream is split into train/val on its own (`moge.training.corpus.split_tokens`, the
same seed), so domain D's validation windows are the same whether the other domains are
loaded or not (`data.only_domain`): the full model and D's sub-model are measured on
identical windows.
"""

from __future__ import annotations

import fnmatch
import glob
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from moge.sigma.domains import TOPIC_FAMILIES, check_names_match, selected_names
from moge.training.config import DataConfig
from moge.training.corpus import (
    BYTE_VOCAB,
    Batch,
    TokenDataset,
    _looks_binary,
    _text_files_under,
    split_tokens,
)


def _builtin_items() -> list[tuple[str, bytes]]:
    from pydoc_data.topics import topics

    return [(key, topics[key].encode("utf-8")) for key in sorted(topics)]


def _folder_items(root: Path) -> list[tuple[str, bytes]]:
    items = []
    for path in _text_files_under(root):
        data = path.read_bytes()
        if data and not _looks_binary(data):
            items.append((path.relative_to(root).as_posix(), data))
    return items


def _patterns(cfg: DataConfig, items: list[tuple[str, bytes]]) -> dict[str, list[str]]:
    if cfg.domains == "topics":
        return TOPIC_FAMILIES
    if cfg.domains == "subfolders":
        subfolders = sorted({name.split("/", 1)[0] for name, _ in items if "/" in name})
        if not subfolders:
            raise ValueError(f"data.domains: subfolders, but {cfg.path!r} has no subfolder with text files")
        return {sub: [f"{glob.escape(sub)}/*"] for sub in subfolders}
    assert isinstance(cfg.domains, dict), "checked by DataConfig"
    return dict(cfg.domains)


def assign_items(items: list[tuple[str, bytes]], patterns: dict[str, list[str]]) -> tuple[dict, int]:
    """{domain: [data, ...]} in item order, each item to the first domain it matches; + left-out count."""
    parts: dict[str, list[bytes]] = {name: [] for name in patterns}
    left_out = 0
    for key, data in items:
        home = next(
            (n for n, pats in patterns.items() if any(fnmatch.fnmatchcase(key, p) for p in pats)), None
        )
        if home is None:
            left_out += 1
        else:
            parts[home].append(data)
    return parts, left_out


@dataclass
class DomainTokenDataset(TokenDataset):
    """TokenDataset whose windows never cross domains; batches carry domain_ids [B].

    domains: names, a domain's id is its position. train_parts / val_parts: each
    domain's split streams (`train` / `val` are their concatenation).
    """

    domains: list[str]
    train_parts: list[torch.Tensor]
    val_parts: list[torch.Tensor]

    def _layout(self, split: str, domain: str | None) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """(domain ids, base offset in `tokens(split)`, window starts available) per domain."""
        parts = self.train_parts if self.tokens(split) is self.train else self.val_parts
        ids = list(range(len(parts))) if domain is None else [self.domain_id(domain)]
        sizes = torch.tensor([p.numel() for p in parts], dtype=torch.int64)
        base = torch.cumsum(sizes, 0) - sizes
        return ids, base[ids], sizes[ids] - self.seq_len

    def domain_id(self, name: str) -> int:
        if name not in self.domains:
            raise ValueError(f"domain: unknown domain {name!r}; the data has {', '.join(self.domains)}")
        return self.domains.index(name)

    def _batch(self, split: str, domain: str | None, positions_B: torch.Tensor) -> Batch:
        """Windows at `positions` of the virtual concatenation of every domain's starts."""
        ids, base_N, starts_N = self._layout(split, domain)
        ends_N = torch.cumsum(starts_N, 0)
        slot_B = torch.searchsorted(ends_N, positions_B, right=True)
        local_B = positions_B - (ends_N - starts_N)[slot_B]
        x_BL, y_BL = self._windows(self.tokens(split), base_N[slot_B] + local_B)
        return Batch(x_BL, y_BL, torch.tensor(ids, dtype=torch.int64)[slot_B])

    def get_batch(self, split: str, batch_size: int, generator: torch.Generator) -> Batch:
        """Random windows, each inside one domain (domains weighted by their size)."""
        total = int(self._layout(split, None)[2].sum())
        return self._batch(split, None, torch.randint(0, total, (batch_size,), generator=generator))

    def iter_eval_batches(
        self, split: str, batch_size: int, max_batches: int, domain: str | None = None
    ) -> Iterator[Batch]:
        """Fixed, evenly spaced windows over all domains (or `domain` alone), in batches.

        With one domain these are exactly TokenDataset's windows of that domain's stream.
        """
        total = int(self._layout(split, domain)[2].sum())
        n = min(batch_size * max_batches, total)
        positions = torch.arange(n, dtype=torch.int64) * (total - 1) // max(n - 1, 1)
        for pos_B in positions.split(batch_size):
            yield self._batch(split, domain, pos_B)


def load_domain_dataset(cfg: DataConfig) -> DomainTokenDataset:
    """Read the corpus of `cfg` (built-in or a folder), assign domains, split each one."""
    if cfg.path is None:
        items, what = _builtin_items(), "topic"
    else:
        root = Path(cfg.path).expanduser()
        if not root.is_dir():
            raise ValueError(
                f"data.domains: needs the built-in corpus or a folder; {cfg.path!r} is not a folder"
            )
        items, what = _folder_items(root), "file"
    patterns = _patterns(cfg, items)
    parts, left_out = assign_items(items, patterns)
    names = selected_names(list(patterns), cfg.only_domain)
    if cfg.only_domain is not None and cfg.only_domain not in patterns:
        raise ValueError(
            f"data.only_domain: unknown domain {cfg.only_domain!r}; the data has {', '.join(patterns)}"
        )
    sep = b"\n\n" if cfg.path is None else b"\n"
    train_parts, val_parts, sizes = [], [], []
    for name in names:
        if not parts[name]:
            raise ValueError(f"data.domains: domain {name!r} matches no {what}")
        data = sep.join(parts[name])
        tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        train, val = split_tokens(tokens, cfg, source=f"domain {name!r}")
        train_parts.append(train)
        val_parts.append(val)
        sizes.append(f"{name} {len(data):,}")
    corpus = "built-in corpus pydoc_data.topics" if cfg.path is None else f"folder {cfg.path}"
    note = f", {left_out} {what}s in no domain" if left_out else ""
    source = f"{corpus} in {len(names)} domain(s) ({'; '.join(sizes)} bytes{note})"
    return DomainTokenDataset(
        train=torch.cat(train_parts), val=torch.cat(val_parts), seq_len=cfg.seq_len,
        vocab_size_needed=BYTE_VOCAB, source=source, domains=names, train_parts=train_parts, val_parts=val_parts,
    )  # fmt: skip


def check_dataset_domains(dataset: TokenDataset, moe) -> None:
    """Raise unless the data's domains are the model's (moe.rre_domain_groups), in order."""
    groups = getattr(moe, "rre_domain_groups", None)
    names = getattr(dataset, "domains", None)
    if not groups:
        return
    if names is None:
        if len(groups) > 1:
            raise ValueError(
                f"moe.rre_domain_groups: {len(groups)} domains need data whose sequences carry a domain (data.domains)"
            )
        return
    check_names_match(names, moe, dataset.source)
