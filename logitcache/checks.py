"""Checks of numeric options, shared by every command.

Each check returns the value (as int or float) or raises a one-line :class:`LogitCacheError`
naming the option and its valid range. The library checks, so the CLI and API refuse the same
values; nothing is clamped, wrapped or replaced by a default (``0`` never means "default").
"""

from __future__ import annotations

import math
import numbers

from logitcache.errors import LogitCacheError

SEED_MAX = 2**64 - 1  # seeds are uint64: a larger or negative one would wrap onto another seed


def is_whole(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _bounds(low, high) -> str:
    if high is None:
        return f"at least {low}"
    return f"from {low} to {high}"


def whole(option: str, value, low: int = 1, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]``."""
    if not is_whole(value) or value < low or (high is not None and value > high):
        raise LogitCacheError(f"{option} {value}: must be {_bounds(low, high)} (a whole number)")
    return int(value)


def optional_whole(option: str, value, low: int = 1, high: int | None = None) -> int | None:
    """``None`` (the option's default) or a whole number as in :func:`whole`."""
    return None if value is None else whole(option, value, low, high)


def seed(option: str, value) -> int:
    return whole(option, value, 0, SEED_MAX)


def real(option: str, value, low: float | None = None, high: float | None = None, above: bool = False) -> float:
    """``value`` as a finite float at least ``low`` (above it with ``above``) and at most ``high``."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = math.nan
    ok = math.isfinite(x) and not isinstance(value, bool)
    ok = ok and (low is None or (x > low if above else x >= low)) and (high is None or x <= high)
    if not ok:
        if low is not None and high is not None:
            bounds = f"from {low:g} to {high:g} (a finite number)"
        elif low is not None:
            bounds = f"{'above' if above else 'at least'} {low:g} (a finite number)"
        else:
            bounds = f"at most {high:g} (a finite number)" if high is not None else "a finite number"
        raise LogitCacheError(f"{option} {value}: must be {bounds}")
    return x


def optional_real(option: str, value, low: float | None = None, high: float | None = None,
                  above: bool = False) -> float | None:
    return None if value is None else real(option, value, low, high, above)


def ensemble_weights(weights, n_teachers: int, option: str = "--ensemble-weight",
                     of: str = "teacher") -> list[float] | None:
    """One finite weight >= 0 per teacher (``of``: or member) with a positive sum (they are
    normalised), or None for equal weights."""
    if weights is None or len(weights) == 0:
        return None
    shown = ", ".join(map(str, weights))
    if len(weights) != n_teachers:
        raise LogitCacheError(f"{option} {shown}: {len(weights)} ensemble weights for {n_teachers} {of}s "
                              f"(give one per {of}, in order)")
    try:
        w = [float(x) for x in weights]
    except (TypeError, ValueError):
        w = [math.nan]
    if not all(math.isfinite(x) and x >= 0 for x in w) or sum(w) <= 0:
        raise LogitCacheError(f"{option} {shown}: each ensemble weight must be at least 0 (a finite number), "
                              f"and their sum above 0")
    return w
