"""Parsing of the user's numbers: stage lists ('14,14,7') and budgets ('10G', '68.12M', '1.5e9')."""

from __future__ import annotations

import math
import re

from scaler.errors import ScalerError

_SUFFIX = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_BUDGET_RE = re.compile(r"^([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMGTkmgt]?)$")
MAX_BUDGET = 1e18


def parse_budget(text: str, what: str = "budget") -> int:
    """'10G' -> 10_000_000_000. K/M/G/T suffixes (any case); plain numbers are absolute."""
    raw = (text or "").strip()
    if not raw:
        raise ScalerError(f"{what} is empty; give a number such as 10G, 800M or 1.5e9")
    if raw.startswith("-"):
        raise ScalerError(f"{what} {text!r} is negative; budgets must be > 0")
    m = _BUDGET_RE.match(raw)
    if not m:
        raise ScalerError(f"{what} {text!r} is not a number with an optional K/M/G/T suffix (e.g. 10G, 68.12M)")
    value = float(m.group(1)) * _SUFFIX[m.group(2).upper()]
    if not math.isfinite(value) or value > MAX_BUDGET:
        raise ScalerError(f"{what} {text!r} is out of range (at most {MAX_BUDGET:.0e})")
    if value < 1:
        raise ScalerError(f"{what} {text!r} must be > 0")
    return int(round(value))


def parse_list(text: str, what: str, *, kind=int, n: int = 3, minimum: float = 1) -> tuple:
    """'14,14,7' -> (14, 14, 7); exactly `n` values, each >= minimum."""
    parts = [p.strip() for p in (text or "").split(",")]
    if len(parts) != n or any(not p for p in parts):
        raise ScalerError(f"{what} needs {n} comma-separated values (one per stage), got {text!r}")
    values = []
    for p in parts:
        try:
            v = kind(p)
        except ValueError:
            noun = "whole numbers" if kind is int else "numbers"
            raise ScalerError(f"{what} must be {noun}, got {text!r}") from None
        if isinstance(v, float) and not math.isfinite(v):
            raise ScalerError(f"{what} must be finite, got {text!r}")
        if v < minimum:
            raise ScalerError(f"{what} must be >= {minimum:g}, got {text!r}")
        values.append(int(v) if kind is float and float(v).is_integer() else v)
    return tuple(values)


def format_count(n: float) -> str:
    """11_234_567_890 -> '11.235G'."""
    for suffix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f}{suffix}"
    return f"{n:g}"
