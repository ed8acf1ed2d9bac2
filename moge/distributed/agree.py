"""Ranks agreeing on a failure, so none is left waiting in a collective.

After a phase that may fail on some ranks only (reading files, writing a checkpoint,
a NaN on one rank) every rank learns which failed, and all raise together: the
lowest failing rank raises its own error marked for printing (`moge_report`, read by
moge.cli), the others a quiet PeerError. In a world of one process nothing is
exchanged and the error is raised as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from moge.distributed.mesh import World

_R = TypeVar("_R")
_OK, _USAGE, _OTHER = 0, 1, 2


class PeerError(RuntimeError):
    """Another rank failed (and printed why), so this one stops too.

    usage: the other rank's error was a user error (bad path, config, checkpoint).
    """

    def __init__(self, message: str, usage: bool) -> None:
        super().__init__(message)
        self.usage = usage


def mark(err: BaseException, report: bool) -> BaseException:
    # Read by moge.cli: print this error on this rank or not. A tag on any exception
    # type, so no declared attribute (setattr with a constant name trips ruff B010).
    err.moge_report = report  # type: ignore[attr-defined]
    return err


def _kind(err: BaseException | None) -> int:
    if err is None:
        return _OK
    return _USAGE if isinstance(err, (ValueError, OSError)) else _OTHER


def failed_ranks(world: World, err: BaseException | None) -> list[int]:
    """Every rank's kind of failure (0: none), all-reduced: a collective."""
    kinds_W = torch.zeros(world.size, dtype=torch.int32, device=world.device)
    kinds_W[world.rank] = _kind(err)
    return world.all_reduce(kinds_W).cpu().tolist()


def raise_together(world: World, what: str, err: BaseException | None) -> None:
    """A collective: if any rank failed, all raise; only the lowest failing one reports."""
    if world.size == 1:
        if err is not None:
            raise err
        return
    kinds = failed_ranks(world, err)
    failed = [r for r, k in enumerate(kinds) if k]
    if not failed:
        return
    first = failed[0]
    if err is not None:
        raise mark(err, world.rank == first)
    raise mark(PeerError(f"{what}: rank {first} failed (see its error)", kinds[first] == _USAGE), False)


def agree(world: World, what: str, fn: Callable[[], _R]) -> _R:
    """fn() on every rank, then all ranks learn whether any failed and raise together.

    fn must not run collectives (a rank that failed before one would leave the others
    waiting in it). `what` names the phase in the other ranks' PeerError.
    """
    try:
        result = fn()
    # BaseException too: a KeyboardInterrupt or SystemExit (a second SIGTERM) inside fn on
    # one rank would otherwise leave the others waiting in the collective below.
    except BaseException as err:  # noqa: BLE001 -- shared with the other ranks, then re-raised
        raise_together(world, what, err)
        raise  # unreachable: raise_together raises err
    raise_together(world, what, None)
    return result
