"""Small validators shared by every config dataclass.

Each raises ValueError whose message starts with the field's name, so a user who
mistyped a YAML value is told which field is wrong and why.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def _type_name(value: Any) -> str:
    return type(value).__name__


def check_int(field: str, value: Any, *, minimum: int | None = None) -> None:
    # bool is a subclass of int; `num_experts: true` is a typo, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{field}: expected an integer, got {value!r} ({_type_name(value)})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{field}: must be >= {minimum}, got {value}")


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
        raise ValueError(f"{field}: expected a number, got {value!r} ({_type_name(value)})")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{field}: must be finite, got {value}")
    if minimum is not None:
        if strict_min and value <= minimum:
            raise ValueError(f"{field}: must be > {minimum}, got {value}")
        if not strict_min and value < minimum:
            raise ValueError(f"{field}: must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{field}: must be <= {maximum}, got {value}")


def check_bool(field: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{field}: expected true or false, got {value!r} ({_type_name(value)})")


def check_choice(field: str, value: Any, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{field}: expected one of {', '.join(choices)}; got {value!r}")


def check_optional_str(field: str, value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{field}: expected a string, got {value!r} ({_type_name(value)})")
