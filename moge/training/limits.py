"""Refuse sizes that validate but cannot exist on this machine, before allocating anything.

Configs check each field on its own (integers stop at the int64 limit); this module checks
what the fields add up to against the memory the machine has: a run with
`model.max_seq_len: 1000000000000` passes every field check, then asks for terabytes of
RoPE tables. The estimates are lower bounds (what is certainly allocated), so a refusal is
never wrong; a run that passes may still run out of memory later, for the usual reasons.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import torch

GIB = 1 << 30


class TooLargeError(ValueError):
    """A size this machine cannot hold; the message says what would be needed."""


def format_bytes(n: int | float) -> str:
    for unit, size in (("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{int(n)} bytes"


def available_memory(device: str = "cpu") -> int | None:
    """Bytes that can be allocated now on `device` (None: unknown, nothing is refused)."""
    if device == "cuda":
        try:
            return int(torch.cuda.mem_get_info()[0])
        except (RuntimeError, AssertionError):
            return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(what: str, parts: Mapping[str, int], hint: str, available: int | None) -> None:
    """Raise TooLargeError naming `what` when the parts add up to more than `available`."""
    needed = sum(parts.values())
    if available is None or needed <= available:
        return
    detail = ", ".join(f"{name} {format_bytes(b)}" for name, b in parts.items() if b)
    raise TooLargeError(
        f"{what}: needs at least {format_bytes(needed)} of memory ({detail}) but "
        f"{format_bytes(available)} is available; {hint}"
    )


def block_counts(model_cfg) -> tuple[int, int]:
    """(dense, MoE) block counts of a ModelConfig, in closed form (n_layers may be huge)."""
    m = model_cfg
    if m.n_layers <= m.first_dense_layers:
        return m.n_layers, 0
    n_moe = -(-(m.n_layers - m.first_dense_layers) // m.moe_every)
    return m.n_layers - n_moe, n_moe


def parameter_count(model_cfg, moe_cfg):
    """`moge.model.count_parameters(...)` (total and activated) without building n_layers blocks.

    Both counts are affine in the numbers of dense and MoE blocks, so three meta-device
    models of one or two blocks give them for any depth (a billion blocks would take hours
    to build even on the meta device). The random router's token table is a buffer, not a
    parameter, and is built on the CPU: it is counted as the grouped router (one group for
    PanGu-Sigma's domain routing), whose parameters are the same.
    """
    from moge.model import ParamCount, count_parameters  # meta device: no memory

    moe = moe_cfg
    if moe_cfg.router == "random":
        sigma = moe_cfg.rre_domain_groups is not None or moe_cfg.rre_group_ids is not None
        moe = dataclasses.replace(
            moe_cfg, router="grouped", rre_vocab_size=None, rre_domain_groups=None, rre_group_ids=None,
            num_groups=1 if sigma else moe_cfg.num_groups,  # PanGu-Sigma: one group fits any top_k
        )  # fmt: skip

    def count(n_layers: int, first_dense: int) -> tuple[int, int]:
        m = dataclasses.replace(model_cfg, n_layers=n_layers, first_dense_layers=first_dense, moe_every=1)
        c = count_parameters(m, moe)
        return c.total, c.activated

    one_dense, two_dense, one_moe = count(1, 1), count(2, 2), count(1, 0)
    n_dense, n_moe = block_counts(model_cfg)
    out = []
    for i in range(2):  # total, activated
        per_dense = two_dense[i] - one_dense[i]
        base = one_dense[i] - per_dense
        out.append(base + n_dense * per_dense + n_moe * (one_moe[i] - base))
    return ParamCount(total=out[0], activated=out[1])


def total_parameters(model_cfg, moe_cfg) -> int:
    return parameter_count(model_cfg, moe_cfg).total


def train_memory(cfg, processes: int = 1) -> dict[str, int]:
    """Lower bound of what `moge train` allocates for `cfg` (a RunConfig), by part, in bytes,
    on the busiest of `processes` ranks: FSDP2 and expert parallelism give each rank about
    1/processes of the weights, gradients and AdamW moments (rank 0 at least that share)."""
    m, t, moe = cfg.model, cfg.train, cfg.moe
    params = total_parameters(m, moe)
    act = 2 if t.dtype == "bfloat16" else 4
    parts = {
        "weights, gradients and AdamW moments": params * 4 * 4 // processes,
        "RoPE tables": 2 * m.max_seq_len * m.resolved_head_dim * 4,  # cos and sin, float32
        "one batch of logits": t.batch_size * cfg.data.seq_len * m.vocab_size * act,
    }
    if moe.router == "random":  # one [V, K] int64 table per MoE block, built from [V, E] noise
        parts["random-router tables"] = block_counts(m)[1] * moe.rre_vocab_size * moe.top_k * 8
        parts["building one table"] = moe.rre_vocab_size * moe.num_experts * (4 + 8)
    return parts


def check_train_fits(cfg, available: int | None = None, processes: int = 1) -> None:
    """Refuse a run whose model, optimizer, RoPE tables and logits cannot fit in memory
    (with several processes: this rank's share of the model and optimizer)."""
    if available is None:
        available = available_memory(cfg.train.device)
    check_fits(
        f"config {cfg.name}",
        train_memory(cfg, processes),
        "lower model.max_seq_len, train.batch_size, data.seq_len or the model's sizes",
        available,
    )


def check_model_fits(cfg, what: str, device: str = "cpu") -> None:
    """Refuse to build a model (its weights and tables, for eval or generate) that cannot fit."""
    parts = train_memory(cfg)
    parts["weights, gradients and AdamW moments"] //= 4  # the weights alone
    del parts["one batch of logits"]
    check_fits(what, parts, "this checkpoint's model is too large for this machine", available_memory(device))
