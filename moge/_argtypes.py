"""argparse type= functions whose errors name what the flag takes.

Shared by moge/cli.py and the tools' own parsers (moge/tools/), which moge.cli imports:
a tool importing moge.cli for this would be an import cycle (tests/test_layout.py).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

_T = TypeVar("_T")  # what an argparse type= function returns


def arg_type(parse: Callable[[str], _T], accept: Callable[[_T], bool], expected: str) -> Callable[[str], _T]:
    """An argparse type=: parse(text), kept where accept(value). Text that does not parse
    and a value out of range both read "argument --flag: expected EXPECTED, got 'text'"
    (for a plain ValueError argparse would print "invalid <function name> value")."""

    def convert(text: str) -> _T:
        shown = repr(text[:40]) + ("..." if len(text) > 40 else "")
        refused = argparse.ArgumentTypeError(f"expected {expected}, got {shown}")
        try:
            value = parse(text)
        except ValueError:  # "abc", "1.5" for an int, an int of more digits than Python allows
            raise refused from None
        if not accept(value):
            raise refused
        return value

    return convert


def _anything(value: object) -> bool:
    return True


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t.strip())


# Parse-only: the tools check ranges themselves, naming the setting.
integer = arg_type(int, _anything, "an integer")
number = arg_type(float, _anything, "a number")
integers = arg_type(_int_list, _anything, "comma-separated integers")
