"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations

import difflib
import math
from typing import Iterable


class UserError(Exception):
    """Bad input: the message says what was wrong, what is allowed, and what to try."""


def nearest(name: str, valid: Iterable[str], n: int = 3) -> list[str]:
    """The valid names closest to ``name`` (nearest first), then the rest in order."""
    valid = list(valid)
    close = difflib.get_close_matches(name, valid, n=n, cutoff=0.0)
    return close + [v for v in valid if v not in close]


class RunFailed(Exception):
    """A run that started but could not finish (diverged, ...); the message says what to try."""


def check_range(name: str, value, low: float, high: float, integer: bool = False) -> None:
    """UserError unless ``value`` is a finite number (an integer if asked) in ``[low, high]``."""

    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (not integer or float(value).is_integer()) and low <= value <= high
    if not ok:
        kind = "an integer" if integer else "a number"
        raise UserError(f"{name} must be {kind} from {low:g} to {high:g}; got {value!r}")


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> UserError:
    names = nearest(str(name), valid)
    return UserError(f"unknown {kind} {name!r}; valid: {', '.join(names)}")
