"""Checks of the settings a caller passes, made where the value is received.

Each helper returns the value (converted to ``int``/``float``) or raises a typed error that names
the argument, says what was expected and what came. ``bool`` is refused wherever a number is
expected: ``True`` is an ``int`` to Python, but ``block=True`` for a block size is a mistake.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

from .errors import InputTypeError, InvalidSettingError


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def integer(name: str, value: Any, minimum: int | None = None,
            maximum: int | None = None) -> int:
    """``value`` as an ``int`` in [minimum, maximum] (either bound optional)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        kind = {0: "a non-negative integer", 1: "a positive integer"}.get(minimum, "an integer")
        raise InputTypeError(f"{name} must be {kind}, got {_describe(value)}.")
    value = int(value)
    if minimum is not None and value < minimum:
        kind = {0: "a non-negative integer", 1: "a positive integer"}.get(
            minimum, f"an integer ≥ {minimum}")
        raise InvalidSettingError(f"{name} must be {kind}, got {value}.")
    if maximum is not None and value > maximum:
        raise InvalidSettingError(f"{name} must be an integer ≤ {maximum}, got {value}.")
    return value


def seed(name: str, value: Any) -> int:
    """A seed for ``torch.Generator.manual_seed``: an ``int`` in [0, 2⁶²] (solvers derive a few
    more seeds from it by adding small offsets)."""
    return integer(name, value, minimum=0, maximum=2**62)


def positive_integer(name: str, value: Any) -> int:
    """``value`` as an ``int`` ≥ 1."""
    return integer(name, value, minimum=1)


def optional_positive_integer(name: str, value: Any) -> int | None:
    """``None`` or an ``int`` ≥ 1."""
    return None if value is None else positive_integer(name, value)


def real(name: str, value: Any, minimum: float | None = None, maximum: float | None = None,
         strict_minimum: bool = False, strict_maximum: bool = False) -> float:
    """``value`` as a finite ``float`` within the bounds (open where ``strict_*``)."""
    bounds = []
    if minimum is not None:
        bounds.append(f"{'>' if strict_minimum else '≥'} {minimum:g}")
    if maximum is not None:
        bounds.append(f"{'<' if strict_maximum else '≤'} {maximum:g}")
    expected = f"a finite number{' ' + ' and '.join(bounds) if bounds else ''}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputTypeError(f"{name} must be {expected}, got {_describe(value)}.")
    value = float(value)
    too_low = minimum is not None and (value <= minimum if strict_minimum else value < minimum)
    too_high = maximum is not None and (value >= maximum if strict_maximum else value > maximum)
    if not math.isfinite(value) or too_low or too_high:
        raise InvalidSettingError(f"{name} must be {expected}, got {value:g}.")
    return value


def non_negative(name: str, value: Any) -> float:
    """A finite ``float`` ≥ 0."""
    return real(name, value, minimum=0.0)


def positive(name: str, value: Any) -> float:
    """A finite ``float`` > 0."""
    return real(name, value, minimum=0.0, strict_minimum=True)


def optional_positive(name: str, value: Any) -> float | None:
    """``None`` or a finite ``float`` > 0."""
    return None if value is None else positive(name, value)


def flag(name: str, value: Any) -> bool:
    """A ``bool`` (not a number or a string that happens to be truthy)."""
    if not isinstance(value, bool):
        raise InputTypeError(f"{name} must be True or False, got {_describe(value)}.")
    return value


def choice(name: str, value: Any, options: Iterable[str]) -> str:
    """One of ``options`` (strings)."""
    options = tuple(options)
    if not isinstance(value, str) or value not in options:
        raise InvalidSettingError(
            f"{name} must be one of {', '.join(repr(o) for o in options)}; got {value!r}.")
    return value
