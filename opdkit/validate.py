"""The checks every typed config runs on construction (`opdkit train`, `opdkit sft`, the objective): each raises a
one-line ValueError that names `section.name`, the value given and what is allowed."""

from __future__ import annotations

import math


def pos_int(section: str, name: str, value, allow_zero: bool = False) -> None:
    """An int (not a bool) >= 1, or >= 0 with allow_zero."""
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value >= 1)
    if not ok:
        raise ValueError(f"{section}.{name}={value!r} must be an integer >= {0 if allow_zero else 1}")


def in_range(section: str, name: str, value, lo: float, hi: float, lo_open: bool = False,
             hi_open: bool = False) -> None:
    """A finite number in [lo, hi], either end open on request."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
        raise ValueError(f"{section}.{name}={value!r} must be a number in {lb}{lo}, {hi}{rb}")


def choice(section: str, name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{section}.{name}={value!r} is not one of {', '.join(str(a) for a in allowed)}")
