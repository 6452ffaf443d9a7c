"""Checks of the arguments that every floor's constructors take: one wording for each kind of bad
value, naming the argument, the value and what is allowed (``why``: what the value is, in the
argument's own words, appended in parentheses)."""
from __future__ import annotations

import math


def _note(why: str) -> str:
    return f" ({why})" if why else ""


def is_real(v) -> bool:
    """A finite int or float (a bool is not a number here)."""
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def positive_int(name: str, v, *, allow_none: bool = False, odd: bool = False) -> int | None:
    """``v`` itself if it is a positive integer (odd with ``odd``; None allowed with ``allow_none``),
    else a ValueError naming ``name`` and ``v`` (a bool is not an integer here)."""
    if v is None and allow_none:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1 or (odd and v % 2 == 0):
        raise ValueError(f"{name} must be a{'n odd' if odd else ''} positive integer"
                         f"{' or null' if allow_none else ''}, got {v!r}")
    return v


def count(name: str, v, *, why: str = "") -> int:
    """``v`` itself if it is an integer ≥ 0, else a ValueError naming ``name`` and ``v``."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name} must be a non-negative integer{_note(why)}, got {v!r}")
    return v


def positive(name: str, v, *, allow_none: bool = False, why: str = "") -> float | None:
    """``v`` as a float if it is a finite number > 0 (None allowed with ``allow_none``), else a
    ValueError naming ``name`` and ``v``."""
    if v is None and allow_none:
        return None
    if not is_real(v) or v <= 0:
        raise ValueError(f"{name} must be a positive finite number{' or null' if allow_none else ''}{_note(why)}, "
                         f"got {v!r}")
    return float(v)


def non_negative(name: str, v, *, why: str = "") -> float:
    """``v`` as a float if it is a finite number ≥ 0, else a ValueError naming ``name`` and ``v``."""
    if not is_real(v) or v < 0:
        raise ValueError(f"{name} must be a non-negative finite number{_note(why)}, got {v!r}")
    return float(v)


def number(name: str, v, minimum: float = 0.0, strict: bool = False) -> float:
    """``v`` as a float if it is a finite number ≥ ``minimum`` (> with ``strict``), else a
    ValueError naming ``name`` and ``v``."""
    if not is_real(v) or (v <= minimum if strict else v < minimum):
        raise ValueError(f"{name} must be a number {'>' if strict else '≥'} {minimum:g}, got {v!r}")
    return float(v)
