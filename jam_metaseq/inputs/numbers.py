"""Class 4: numbers that are not numbers (issue 27 §4).

``float("nan")`` passes every ``x < 0`` check and ``"1e999"`` parses to ``inf``; a NaN temperature
samples all-zero ids, a NaN merge weight writes NaN tensors. Every float option of every CLI is
therefore parsed by a ``finite_float(...)`` argparse type (finite, in its range: argparse's own
usage error, exit 2, naming the flag), every count by a ``bounded_int(...)`` type (``--threads
100000`` crashed OpenMP); library entry points check the same with ``check_float`` / ``check_int``.
"""

from __future__ import annotations

import argparse
import math
import numbers
import os
from typing import Any, Callable

INT64_MAX = 2**63 - 1
MAX_THREADS = max(256, 4 * (os.cpu_count() or 1))
"""Bound of ``--threads``: more than any sane setting on this machine (100000 crashed OpenMP)."""


def _interval(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    def bound(op: str, v: float) -> str:
        return f"{op} {v:g}" if isinstance(v, float) else f"{op} {v}"

    parts = []
    if lo is not None:
        parts.append(bound(">" if lo_open else ">=", lo))
    if hi is not None:
        parts.append(bound("<" if hi_open else "<=", hi))
    return " and ".join(parts)


def _float_problem(v: float, lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str | None:
    if not math.isfinite(v):
        return "not a finite number"
    if lo is not None and (v <= lo if lo_open else v < lo) or hi is not None and (v >= hi if hi_open else v > hi):
        return f"out of range (must be {_interval(lo, hi, lo_open, hi_open)})"
    return None


def check_float(value: Any, *, name: str, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False) -> float:
    """``value`` as a float when it is a finite real number in range; else ``ValueError`` naming
    ``name`` (for library callers; CLIs use ``finite_float``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # numpy and torch scalars
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    v = float(value)
    problem = _float_problem(v, lo, hi, lo_open, hi_open)
    if problem is not None:
        raise ValueError(f"{name} = {value!r} is {problem}")
    return v


def check_int(value: Any, *, name: str, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int when it is an integer (Python or numpy, not bool) in ``[lo, hi]``; else
    ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    v = int(value)
    if lo is not None and v < lo or hi is not None and v > hi:
        raise ValueError(f"{name} = {v} is out of range (must be {_interval(lo, hi, False, False)})")
    return v


def finite_float(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                 hi_open: bool = False, none_ok: bool = False) -> Callable[[str], float | None]:
    """An argparse ``type=``: the text as a finite float in the given range (``none_ok``: the word
    ``none`` gives None, for thresholds that can be switched off)."""

    def parse(text: str) -> float | None:
        if none_ok and text.strip().lower() == "none":
            return None
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        problem = _float_problem(v, lo, hi, lo_open, hi_open)
        if problem is not None:
            raise argparse.ArgumentTypeError(f"{text!r} is {problem}")
        return v

    parse.__name__ = "finite float"
    return parse


def bounded_int(lo: int | None = None, hi: int | None = INT64_MAX) -> Callable[[str], int]:
    """An argparse ``type=``: the text as an int in ``[lo, hi]`` (default upper bound: int64, what
    torch and numpy hold)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if lo is not None and v < lo or hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"{text!r} is out of range (must be {_interval(lo, hi, False, False)})")
        return v

    parse.__name__ = "bounded int"
    return parse


INT64 = bounded_int(-INT64_MAX - 1)
"""Any integer torch and numpy hold (the option's own range is checked where its value is used)."""
POSITIVE_INT = bounded_int(1)
NON_NEGATIVE_INT = bounded_int(0)
SEED = bounded_int(0, 2**63 - 1)
"""A seed torch and numpy both take."""
THREADS = bounded_int(0, MAX_THREADS)
"""``--threads``: 0 = the library's default."""
PORT = bounded_int(1, 65535)
FINITE = finite_float()
NON_NEGATIVE_FLOAT = finite_float(0.0)
"""A rate or loss weight."""
POSITIVE_FLOAT = finite_float(0.0, lo_open=True)
RATE = finite_float(0.0, 1.0, hi_open=True)
"""A dropout rate, in [0, 1)."""
