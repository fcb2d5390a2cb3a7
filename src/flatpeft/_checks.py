"""Range checks for method keywords (``ValueError`` naming the argument and the value)."""
from __future__ import annotations

from typing import Any


def one_of(name: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"Invalid {name}: {value!r}; valid: {', '.join(map(repr, valid))}")


def in_range(name: str, value: Any, low: float, high: float, *, low_open: bool, high_open: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"Invalid {name}: {value!r} (must be in {lo}{low}, {high}{hi})")


def non_negative(name: str, value: Any) -> None:
    in_range(name, value, 0.0, float("inf"), low_open=False, high_open=True)


def optional(check, name: str, value: Any, *args: Any) -> None:
    """Run ``check(name, value, *args)`` unless ``value`` is None."""
    if value is not None:
        check(name, value, *args)


def positive_int(name: str, value: Any) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ValueError(f"Invalid {name}: {value!r} (must be a positive integer)")
