"""`moge torchrun [TORCHRUN OPTIONS] SUBCOMMAND ...`: torchrun without the launcher noise.

Plain `torchrun ... -m moge train ...` works, but when a rank exits non-zero (a bad config,
exit code 2) torchrun's launcher raises ChildFailedError and prints ~40 lines of its
own traceback and failure summary after the one `error: ...` line moge printed. This
runs the same launcher (torch.distributed.run) in-process, so every torchrun option works
(--standalone, --nnodes, --rdzv_*, ...), and on a failed rank it prints nothing more: the
rank already said why in one line. The exit code is the failed rank's (2 for a user error);
a rank killed by a signal (which prints nothing) is named in one line, exit 128 + the signal.
A signal to the launcher (a scheduler's SIGTERM, Ctrl-C) reaches the ranks, which save the
step in flight and say so; the launcher then exits 128 + the signal (143, 130) as they do.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

SUBCOMMANDS = ("train", "params", "eval", "generate", "simulate", "bench", "convert", "extract")


def _options_with_values() -> set[str]:
    """torchrun's options that take a value (`--rdzv_id JOB`), in every spelling."""
    from torch.distributed.run import get_args_parser

    return {
        name for action in get_args_parser()._actions if action.nargs != 0 for name in action.option_strings
    }


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(torchrun options, moge arguments): the moge part starts at the first subcommand name
    that is not the value of a torchrun option (`--rdzv_id train` names a job)."""
    with_value = _options_with_values()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in SUBCOMMANDS:
            return list(argv[:i]), list(argv[i:])
        i += 2 if arg in with_value else 1
    raise ValueError(
        f"moge torchrun: expected [TORCHRUN OPTIONS] then a moge subcommand ({', '.join(SUBCOMMANDS)}), "
        "e.g. moge torchrun --standalone --nproc_per_node 2 train configs/tiny-moge.yaml parallel.expert_parallel=2"
    )


def _failed_rank(err) -> int:
    """The exit code of a launch that torch's ChildFailedError ended: its first failed
    rank's. A rank killed by a signal (SIGKILL: often the out-of-memory killer) said
    nothing itself, so it is named here, and the code is 128 + the signal, as a shell's."""
    rank, failure = err.get_first_failure()
    if failure.exitcode < 0:
        print(f"error: rank {rank} was killed by {failure.signal_name()}", file=sys.stderr)
        return 128 - failure.exitcode
    return failure.exitcode or 1


def main(argv: Sequence[str]) -> int:
    """Launch `python -m moge ARGS` on every rank; returns the exit code."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if list(argv[:1]) in (["-h"], ["--help"]):
        print(__doc__.strip())
        return 0
    launcher, moge_args = split_argv(argv)
    # The launcher's own log lines: the OMP_NUM_THREADS banner, and every failed worker at
    # ERROR level ("failed (exitcode: 2) ..."). The ranks' output is not affected.
    # torch gives these loggers their own levels, so each one is quieted by name.
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        # run(), not main(): main's @record wrapper logs about error files on failure.
        torchrun.run(torchrun.parse_args([*launcher, "-m", "moge", *moge_args]))
    except ChildFailedError as err:
        return _failed_rank(err)
    except SignalException as sig:  # the ranks got the signal too, and said what they saved
        return 128 + int(sig.sigval)
    except SystemExit as exit_:  # torchrun's own argparse: bad launcher options
        return exit_.code if isinstance(exit_.code, int) else 2
    sys.stdout.flush()
    return 0
