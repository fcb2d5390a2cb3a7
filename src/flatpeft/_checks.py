"""Range checks for method keywords (``ValueError`` naming the argument and the value).

Values appear in messages through :func:`short_repr`, so an error never prints a whole (possibly huge) value.
"""
from __future__ import annotations

import numbers
import reprlib
from typing import Any

#: Longest value representation an error message shows (:func:`short_repr`).
REPR_LIMIT = 200

#: Largest seed flatpeft accepts: numpy's legacy seeding (``transformers.set_seed``) takes 0 .. 2**32 - 1.
SEED_MAX = 2**32 - 1

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 3, 8, 8, 8, 8
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = REPR_LIMIT, REPR_LIMIT, REPR_LIMIT


def short_repr(value: Any, limit: int = REPR_LIMIT) -> str:
    """``repr(value)`` cut to at most ``limit`` characters, computed without building the whole repr
    (``reprlib``: a nested or long value costs no more than its first items)."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_int(value: Any) -> bool:
    """An integer (Python or numpy), never a boolean."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and type(value).__name__ != "bool_"


def check_seed(name: str, value: Any) -> None:
    """Refuse (naming ``name``) a seed that is not an integer in ``0 .. SEED_MAX``."""
    if not (is_int(value) and 0 <= value <= SEED_MAX):
        raise ValueError(f"Invalid {name}: {short_repr(value)} (must be an integer in 0 .. 2**32 - 1 = {SEED_MAX})")


def _kind(default: Any) -> str | None:
    """The kind of value a keyword with ``default`` takes, for :func:`check_like_default` (None: not checked)."""
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, (int, float)):
        return "a number"
    if isinstance(default, str):
        return "a string"
    return None


def _fits(value: Any, kind: str) -> bool:
    """Whether ``value`` is of ``kind`` (numpy booleans are booleans; numpy numbers and tensors are numbers)."""
    is_bool = isinstance(value, bool) or type(value).__name__ == "bool_"
    if kind == "true or false":
        return is_bool
    if kind == "a number":
        return not is_bool and (isinstance(value, numbers.Real) or hasattr(value, "__float__"))
    return isinstance(value, str)


def check_like_default(name: str, value: Any, default: Any, allow_none: bool = True) -> None:
    """Refuse (naming ``name``) a keyword value whose type does not match its default's: a number where the
    default is a number, a boolean where it is a boolean, a string where it is a string, and a list of as many
    such items where the default is a tuple (``betas=(0.9, 0.999)``). A default of None (or another type) is
    not checked here; a value of None passes when ``allow_none``."""
    if isinstance(default, tuple) and default and all(_kind(d) for d in default):
        kinds = [_kind(d) for d in default]
        if not (isinstance(value, (list, tuple)) and len(value) == len(default)
                and all(_fits(v, k) for v, k in zip(value, kinds))):
            what = kinds[0] if len(set(kinds)) == 1 else "values"
            plural = {"a number": "numbers", "a string": "strings", "true or false": "booleans"}.get(what, what)
            raise ValueError(f"Invalid {name}: {short_repr(value)} (must be a list of {len(default)} {plural}, "
                             f"like the default {list(default)})")
        return
    kind = _kind(default)
    if kind is not None and not (value is None and allow_none) and not _fits(value, kind):
        raise ValueError(f"Invalid {name}: {short_repr(value)} (must be {kind}, like the default {default!r})")


def one_of(name: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"Invalid {name}: {short_repr(value)}; valid: {', '.join(map(repr, valid))}")


def in_range(name: str, value: Any, low: float, high: float, *, low_open: bool, high_open: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ValueError(f"Invalid {name}: {short_repr(value)} (must be in {lo}{low}, {high}{hi})")


def non_negative(name: str, value: Any) -> None:
    in_range(name, value, 0.0, float("inf"), low_open=False, high_open=True)


def optional(check, name: str, value: Any, *args: Any) -> None:
    """Run ``check(name, value, *args)`` unless ``value`` is None."""
    if value is not None:
        check(name, value, *args)


def positive_int(name: str, value: Any) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ValueError(f"Invalid {name}: {short_repr(value)} (must be a positive integer)")
