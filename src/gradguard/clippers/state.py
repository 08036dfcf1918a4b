"""Argument and state_dict checks shared by the stateful clippers (each names the argument and the fix)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Set
from typing import Any

__all__ = ["check_int", "check_number", "check_state_keys"]


def check_number(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite real number within ``[low, high]`` (an end is excluded when ``*_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} of type {type(value).__name__}")
    v = float(value)
    if math.isnan(v) or math.isinf(v):
        raise ValueError(f"{name} must be a finite number, got {v}")
    lo_bad = low is not None and (v <= low if low_open else v < low)
    hi_bad = high is not None and (v >= high if high_open else v > high)
    if lo_bad or hi_bad:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
        hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
        interval = f"{lo or '(-inf'}, {hi or 'inf)'}"
        raise ValueError(f"{name} must be in {interval}, got {v:g}")
    return v


def check_int(value: Any, name: str, *, low: int = 0) -> int:
    """An integer ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} of type {type(value).__name__}")
    if int(value) < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def check_state_keys(state: Mapping[str, Any], required: Set[str], optional: Set[str], owner: str) -> None:
    """A state_dict has the required keys and nothing unknown."""
    if not isinstance(state, Mapping):
        raise TypeError(f"{owner}.load_state_dict expects a mapping, got {type(state).__name__}")
    missing = required - set(state)
    unknown = set(state) - required - optional
    if missing or unknown:
        raise ValueError(
            f"{owner} state_dict does not match: missing {sorted(missing)}, unknown {sorted(unknown)}; "
            f"was it saved from a different clipper?"
        )
