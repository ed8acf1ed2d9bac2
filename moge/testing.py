"""Assertion helpers for users' own routing-balance tests, and a Monte-Carlo IS estimate.

One convention across helpers: the tensor being checked comes first, positionally; every
setting is keyword-only and, where several appear, in the order num_experts, num_groups,
num_devices, top_k, then the rest (tokens, tolerance, router, ...):

    assert_group_quota(ids, num_experts=64, num_groups=8, top_k=8)
    assert_balanced(load, tolerance=0.1)
    assert_device_balanced(ids, num_experts=64, num_devices=8, tolerance=0.0)
    expected_imbalance(num_experts=64, num_devices=8, top_k=8, tokens=16, router="global")

Changed in 0.1 (before any release): assert_group_quota's settings and all of
expected_imbalance's arguments became keyword-only. The old positional forms still work
and emit a DeprecationWarning naming the keyword form; they will be removed.

Legend: T tokens, E experts, K experts per token, M groups, N devices, R trials.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor

from moge._validate import check_float, check_int, check_optional_int
from moge.balance import device_load
from moge.routing import RouterSettings, route

DEFAULT_TRIALS = 1000  # expected_imbalance's default (the README's table uses it)


def _legacy_positional(names: tuple[str, ...], leading: int):
    """Accept the pre-0.1 positional call (settings in the order `names`) with a warning."""

    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            extra = args[leading:]
            if extra:
                if len(extra) > len(names):
                    raise TypeError(f"{fn.__name__}: too many positional arguments")
                given = dict(zip(names, extra))
                for name in given:
                    if name in kwargs:
                        raise TypeError(f"{fn.__name__}: {name} given twice")
                keywords = ", ".join(f"{k}={v!r}" for k, v in given.items())
                warnings.warn(
                    f"{fn.__name__}: positional settings are deprecated; pass them by keyword: {keywords}",
                    DeprecationWarning,
                    stacklevel=2,
                )
                kwargs.update(given)
            return fn(*args[:leading], **kwargs)

        return call

    return wrap


def _check_integer(name: str, t: Tensor) -> None:
    # .long() would truncate 4.7 to 4 and pass: ids are never read from another dtype.
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name}: expected integer ids, got dtype {t.dtype}")


def _as_ids(expert_ids: Tensor, num_experts: int) -> Tensor:
    _check_integer("expert_ids", expert_ids)
    if expert_ids.dim() != 2:
        raise AssertionError(f"expert_ids: expected [tokens, top_k], got shape {tuple(expert_ids.shape)}")
    if expert_ids.numel():
        lo, hi = int(expert_ids.min()), int(expert_ids.max())
        if lo < 0 or hi >= num_experts:
            bad = lo if lo < 0 else hi
            raise AssertionError(f"expert_ids: id {bad} is outside 0..{num_experts - 1}")
    return expert_ids.long()


@_legacy_positional(("num_experts", "num_groups", "top_k"), leading=1)
def assert_group_quota(expert_ids: Tensor, *, num_experts: int, num_groups: int, top_k: int) -> None:
    """Fail unless every token took exactly top_k/num_groups distinct experts per group.

    expert_ids [T, K]. The message names the first offending token and group.
    """
    for name, value in (("num_experts", num_experts), ("num_groups", num_groups), ("top_k", top_k)):
        check_int(name, value, minimum=1)
    if num_experts % num_groups or top_k % num_groups:
        raise ValueError(f"num_groups: {num_groups} must divide num_experts={num_experts} and top_k={top_k}")
    ids_TK = _as_ids(expert_ids, num_experts)
    if ids_TK.shape[1] != top_k:
        raise AssertionError(f"expert_ids: {ids_TK.shape[1]} experts per token, expected top_k={top_k}")
    quota, per_group = top_k // num_groups, num_experts // num_groups
    group_TK = ids_TK // per_group
    counts_TM = torch.zeros(ids_TK.shape[0], num_groups, dtype=torch.long, device=ids_TK.device)
    counts_TM.scatter_add_(1, group_TK, torch.ones_like(group_TK))
    bad = (counts_TM != quota).nonzero()
    if bad.numel():
        t, g = bad[0].tolist()
        chosen = ids_TK[t][group_TK[t] == g].tolist()
        raise AssertionError(
            f"token {t}: group {g} got {counts_TM[t, g].item()} experts {chosen}, expected "
            f"{quota} (top_k={top_k} / num_groups={num_groups}); {bad.shape[0]} (token, group) pairs are off"
        )
    sorted_TK = ids_TK.sort(dim=1).values
    dup = (sorted_TK[:, 1:] == sorted_TK[:, :-1]).any(dim=1).nonzero()
    if dup.numel():
        t = int(dup[0])
        raise AssertionError(f"token {t}: the same expert was chosen twice: {ids_TK[t].tolist()}")


@_legacy_positional(("tolerance",), leading=1)
def assert_balanced(load: Tensor, *, tolerance: float) -> None:
    """Fail if any entry of `load` deviates from the mean by more than tolerance * mean.

    load [E] (per expert, per group or per device); a NaN or infinite entry fails, a
    negative one is a ValueError. tolerance 0.1 allows +-10%. Expert
    loads of a small batch are noisy even when routing is fair (a fresh layer's 16
    experts on 1024 tokens are 10-20% apart): test experts on many tokens or with a
    wide tolerance, and test devices with assert_device_balanced.
    """
    check_float("tolerance", tolerance, minimum=0.0)
    load_f = load.detach().double().reshape(-1)
    if load_f.numel() == 0:
        raise AssertionError("load: empty")
    # A NaN (a diverged router's shares) compares False with any tolerance: fail on it here.
    not_finite = (~torch.isfinite(load_f)).nonzero()
    if not_finite.numel():
        i = int(not_finite[0])
        raise AssertionError(f"entry {i} has load {load_f[i].item():g}, not finite; load = {load_f.tolist()}")
    negative = (load_f < 0).nonzero()
    if negative.numel():
        i = int(negative[0])
        raise ValueError(
            f"load: entry {i} is {load_f[i].item():g}; a load (slots or shares) is never negative"
        )
    mean = load_f.mean().item()
    if mean == 0:
        raise AssertionError("load: every entry is 0, nothing was routed")
    dev = (load_f - mean).abs() / mean
    worst = int(dev.argmax())
    if dev[worst] > tolerance:
        raise AssertionError(
            f"entry {worst} has load {load_f[worst].item():g}, {dev[worst].item():.1%} from the mean "
            f"{mean:g} (tolerance {tolerance:.1%}); load = {load_f.tolist()}"
        )


def _device_of_expert(placement: Tensor, num_experts: int, num_devices: int) -> Tensor:
    """[E] device ids from either placement form (see assert_device_balanced)."""
    _check_integer("placement", placement)
    if placement.dim() == 2:
        if placement.shape[0] != num_devices or placement.numel() != num_experts:
            raise ValueError(
                f"placement: expected [{num_devices}, {num_experts // max(num_devices, 1)}] expert ids, "
                f"got {tuple(placement.shape)}"
            )
        flat = placement.reshape(-1).long().cpu()
        if int(flat.min()) < 0 or int(flat.max()) >= num_experts:
            raise ValueError(f"placement: expert ids must lie in 0..{num_experts - 1}")
        owner_E = torch.full((num_experts,), -1, dtype=torch.long)
        owner_E[flat] = torch.arange(num_devices).repeat_interleave(placement.shape[1])
        if bool((owner_E < 0).any()):
            raise ValueError("placement: some experts are on no device")
        return owner_E
    if placement.shape != (num_experts,):
        raise ValueError(f"placement: expected [{num_experts}] device ids, got {tuple(placement.shape)}")
    return placement.long()


def assert_device_balanced(
    expert_ids: Tensor,
    *,
    num_experts: int,
    num_devices: int,
    tolerance: float = 0.0,
    placement: Tensor | None = None,
) -> None:
    """Fail unless every device received the same token-slots, within tolerance * mean.

    expert_ids [T, K]. By default experts sit on devices in contiguous blocks (expert i
    on device i // (E / N): whole groups per device, the paper's layout, as
    moge.balance.device_load counts), which is also where moge's expert-parallel
    training puts them (moge.distributed.expert_parallel.expert_placement). `placement`
    gives another layout: [E] the device of every expert, or [N, E/N] the experts of
    every device (expert_placement's form).
    tolerance 0 (the default) demands IS = 0, which the grouped router guarantees when
    every device holds whole groups.
    """
    check_int("num_experts", num_experts, minimum=1)
    check_int("num_devices", num_devices, minimum=1)
    check_float("tolerance", tolerance, minimum=0.0)
    ids_TK = _as_ids(expert_ids, num_experts)
    if placement is None:
        load_N = device_load(ids_TK, num_experts, num_devices)
    else:
        placement = _device_of_expert(placement, num_experts, num_devices)
        if int(placement.min()) < 0 or int(placement.max()) >= num_devices:
            raise ValueError(f"placement: device ids must lie in 0..{num_devices - 1}")
        owner_TK = placement.to(ids_TK.device).long()[ids_TK]
        load_N = torch.bincount(owner_TK.reshape(-1), minlength=num_devices)
    if ids_TK.shape[0] == 0:
        return
    load_f = load_N.double()
    mean = load_f.mean().item()
    dev = (load_f - mean).abs() / mean
    worst = int(dev.argmax())
    if dev[worst] > tolerance:
        spread = (load_N.max() - load_N.min()).item()
        raise AssertionError(
            f"device {worst} got {load_N[worst].item()} token-slots, {dev[worst].item():.1%} from the mean "
            f"{mean:g} (tolerance {tolerance:.1%}); IS = {spread / ids_TK.shape[0]:.4f}; "
            f"slots per device = {load_N.tolist()}"
        )


@dataclass
class ImbalanceEstimate:
    """Monte-Carlo distribution of the Imbalance Score over random batches."""

    prob_positive: float  # P(IS > 0)
    mean: float
    std: float
    max: float
    trials: int


@_legacy_positional(("num_experts", "top_k", "num_devices", "tokens", "router"), leading=0)
@torch.no_grad()
def expected_imbalance(
    *,
    num_experts: int,
    num_groups: int | None = None,
    num_devices: int,
    top_k: int,
    tokens: int,
    router: str = "global",
    topk_groups: int | None = None,
    trials: int = DEFAULT_TRIALS,
    seed: int = 0,
) -> ImbalanceEstimate:
    """IS (Eq. 3) of batches of `tokens` tokens with i.i.d. uniform random scores.

    Reproduces the paper's Fig. 2b: E=64, K=8, 8 devices, 16 tokens -> P(IS > 0) is
    nearly 1 for router="global", exactly 0 for router="grouped". Groups default to
    one per device (num_groups = num_devices). IS ranges over [0, K]: a device can hold
    up to K slots per token, so values above 1 are possible.
    """
    for name, value in (("num_experts", num_experts), ("num_devices", num_devices), ("tokens", tokens),
                        ("trials", trials), ("top_k", top_k)):  # fmt: skip
        check_int(name, value, minimum=1)
    check_optional_int("num_groups", num_groups, minimum=1)
    if router == "random":
        raise ValueError(
            "router: random routes by token id, not by scores, so random scores cannot estimate it; "
            "it takes top_k/num_groups experts from every group, as grouped does"
        )
    if num_experts % num_devices:
        raise ValueError(f"num_devices: {num_devices} devices do not divide num_experts={num_experts}")
    M = num_groups or num_devices
    settings = RouterSettings(router=router, top_k=top_k, num_groups=M, topk_groups=topk_groups)
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(trials * tokens, num_experts, generator=gen)
    _, ids = route(scores, settings)
    ids_RX = rearrange(ids, "(r t) k -> r (t k)", r=trials)
    device_RX = ids_RX // (num_experts // num_devices)
    load_RN = torch.zeros(trials, num_devices, dtype=torch.long).scatter_add_(
        1, device_RX, torch.ones_like(device_RX)
    )
    is_R = (load_RN.max(dim=1).values - load_RN.min(dim=1).values).double() / tokens
    return ImbalanceEstimate(
        prob_positive=float((is_R > 0).double().mean()),
        mean=float(is_R.mean()),
        std=float(is_R.std(unbiased=False)),
        max=float(is_R.max()),
        trials=trials,
    )
