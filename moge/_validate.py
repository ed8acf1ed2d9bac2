"""Small validators shared by every config dataclass.

Each raises ValueError whose message starts with the field's name, so a user who
mistyped a YAML value is told which field is wrong and why.
"""

from __future__ import annotations

import reprlib
import sys
from collections.abc import Iterable
from typing import Any

INT64_MAX = 2**63 - 1  # torch sizes, seeds and counters are int64

_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxlist, _repr.maxdict, _repr.maxtuple, _repr.maxset = 2, 6, 6, 6, 6
_repr.maxstring, _repr.maxother, _repr.maxlong = 80, 80, 40


def shown(value: Any) -> str:
    """repr(value) bounded in length and in work, whatever value is (an alias bomb's expansion,
    a 5000-digit int): error messages quote user values through this."""
    return _repr.repr(value)


def _type_name(value: Any) -> str:
    return type(value).__name__


def check_int(field: str, value: Any, *, minimum: int | None = None, maximum: int = INT64_MAX) -> None:
    # bool is a subclass of int; `num_experts: true` is a typo, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{field}: expected an integer, got {shown(value)} ({_type_name(value)})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{field}: must be >= {minimum}, got {shown(value)}")
    if value > maximum:
        limit = "2**63 - 1, the int64 limit" if maximum == INT64_MAX else str(maximum)
        raise ValueError(f"{field}: must be <= {limit}, got {shown(value)}")


def check_optional_int(field: str, value: Any, *, minimum: int | None = None) -> None:
    if value is not None:
        check_int(field, value, minimum=minimum)


def check_float(
    field: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    strict_min: bool = False,
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field}: expected a number, got {shown(value)} ({_type_name(value)})")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{field}: must be finite, got {value}")
    if isinstance(value, int) and abs(value) > sys.float_info.max:  # float(value) would overflow
        raise ValueError(f"{field}: must be finite, got {shown(value)} (an integer too large for a float)")
    if minimum is not None:
        if strict_min and value <= minimum:
            raise ValueError(f"{field}: must be > {minimum}, got {value}")
        if not strict_min and value < minimum:
            raise ValueError(f"{field}: must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{field}: must be <= {maximum}, got {value}")


def check_bool(field: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{field}: expected true or false, got {shown(value)} ({_type_name(value)})")


def check_choice(field: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{field}: expected one of {', '.join(choices)}; got {shown(value)}")


def check_optional_str(field: str, value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{field}: expected a string, got {shown(value)} ({_type_name(value)})")


def check_path(field: str, value: Any) -> None:
    """An optional file-system path: a string without NUL bytes (no OS accepts them)."""
    check_optional_str(field, value)
    if value is not None and "\0" in value:
        raise ValueError(f"{field}: contains a NUL byte, which no path may hold: {shown(value)}")
