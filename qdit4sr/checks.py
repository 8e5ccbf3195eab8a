"""Argument checks shared by every package, each failing with one clear line."""
from __future__ import annotations

from numbers import Integral


def is_int(value: object) -> bool:
    """An int (numpy integers included), not a bool."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def check_int(name: str, value: object, *, minimum: int = 1, optional: bool = False,
              error: type[Exception] = ValueError) -> int | None:
    """`value` as an int after checking it is an int >= minimum (None passes when `optional`).

    The default minimum 1 is the positive-int guard; `error` lets a caller keep its own exception type.
    """
    if optional and value is None:
        return None
    if not is_int(value) or value < minimum:
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise error(f"{name} must be {what}{' or None' if optional else ''}, got {value!r}")
    return int(value)
