"""Value checks for the configuration classes: each raises an
:class:`~compress.errors.OptionError` naming the field, the value (shortened) and what is valid,
so a config's ``__post_init__`` reads as a list of its rules::

    def __post_init__(self):
        positive("lr", self.lr, "the learning rate, e.g. 0.01")
        integer("lr_step", self.lr_step, low=1, hint="epochs between two decays")

A leaf: it imports nothing but :mod:`compress.errors`.
"""

from __future__ import annotations

import math
from typing import Any

from compress.errors import OptionError, shorten

__all__ = ["number", "positive", "integer", "seed", "one_of", "MAX_IMAGE_SIDE", "MAX_CHANNELS", "MAX_CLASSES",
           "MAX_SEED"]

MAX_IMAGE_SIDE = 4096  # pixels: the largest height or width of an input the toolkit builds for
MAX_CHANNELS = 64  # input channels
MAX_CLASSES = 100_000  # output units
MAX_SEED = 2**32 - 1


def _fail(key: str, value: Any, why: str, hint: str) -> OptionError:
    return OptionError(key, f"{shorten(value)}: {why}" + (f"; {hint}" if hint else ""))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def number(key: str, value: Any, *, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False, hint: str = "") -> float:
    """Check that ``value`` is a finite number within ``[low, high]`` (``low_open``/``high_open``:
    the bound itself is excluded); returns it.

    Raises:
        OptionError: ``<key> <value>: <why>; <hint>``.
    """
    if not _is_number(value):
        raise _fail(key, value, "expected a number", hint)
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int too large for a float
        finite = False
    if not finite:
        raise _fail(key, value, "must be a finite number (not NaN or infinite)", hint)
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        if low is not None and high is not None:
            why = f"must be in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            why = f"must be {'>' if low_open else '>='} {low:g}"
        else:
            why = f"must be {'<' if high_open else '<='} {high:g}"
        raise _fail(key, value, why, hint)
    return value


def positive(key: str, value: Any, hint: str = "") -> float:
    """A finite number above 0."""
    return number(key, value, low=0, low_open=True, hint=hint)


def integer(key: str, value: Any, *, low: int | None = None, high: int | None = None, hint: str = "") -> int:
    """An integer (not a bool) within ``[low, high]``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise _fail(key, value, "expected an integer", hint)
    if low is not None and value < low or high is not None and value > high:
        span = (f"from {low} to {high}" if low is not None and high is not None
                else f"at least {low}" if low is not None else f"at most {high}")
        raise _fail(key, value, f"must be {span}", hint)
    return value


def seed(key: str, value: Any) -> int:
    """A random seed: an integer from 0 to 2**32 - 1."""
    return integer(key, value, low=0, high=MAX_SEED)


def one_of(key: str, value: Any, valid: tuple[Any, ...]) -> Any:
    """``value`` must be one of ``valid``."""
    if value not in valid:
        raise _fail(key, value, "unknown value", "valid: " + ", ".join(str(v) for v in valid))
    return value
