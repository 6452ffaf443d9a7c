"""Checks of the arguments that every floor's constructors take: one wording for each kind of bad
value, naming the argument, the value and what is allowed."""
from __future__ import annotations

import math


def positive_int(name: str, v, *, allow_none: bool = False, odd: bool = False) -> int | None:
    """``v`` itself if it is a positive integer (odd with ``odd``; None allowed with ``allow_none``),
    else a ValueError naming ``name`` and ``v`` (a bool is not an integer here)."""
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1 or (odd and v % 2 == 0):
        raise ValueError(f"{name} must be a{'n odd' if odd else ''} positive integer"
                         f"{' or null' if allow_none else ''}, got {v!r}")
    return v


def number(name: str, v, minimum: float = 0.0, strict: bool = False) -> float:
    """``v`` as a float if it is a finite number ≥ ``minimum`` (> with ``strict``), else a
    ValueError naming ``name`` and ``v``."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or (v <= minimum if strict else v < minimum):
        raise ValueError(f"{name} must be a number {'>' if strict else '≥'} {minimum:g}, got {v!r}")
    return float(v)
