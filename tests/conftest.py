"""Fixtures shared by several test modules (helpers used by one module stay in it)."""

from __future__ import annotations

import pytest
import torch

from moge.cli import main


@pytest.fixture(autouse=True, scope="session")
def _one_thread_for_the_suite():
    """Every test runs torch on one thread (see one_thread); their sizes are tiny anyway."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def one_thread():
    """torch on one thread for the test, restored after it.

    On a busy 2-core machine two OpenMP threads wait for each other's core: tiny models
    run tens of times slower than on one. The trainer's own train.threads also sticks.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def cli_error(capsys):
    """run(argv, expected_code=2) -> the one stderr line of a failing `moge` call.

    Checks the exit code, that stderr is that single line starting with `error: `, and
    that no traceback was printed anywhere.
    """

    def run(argv: list[str], expected_code: int = 2) -> str:
        code = main(argv)
        out = capsys.readouterr()
        lines = out.err.splitlines()
        assert code == expected_code, (code, out.err)
        assert len(lines) == 1 and lines[0].startswith("error: "), out.err
        assert "Traceback" not in out.err + out.out
        return lines[0]

    return run
