"""Value types of command-line options: a bad value is argparse's one-line usage error naming
the option, not a traceback from the code that first uses it."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def at_least(low: int) -> Callable[[str], int]:
    """An integer option's type that refuses values under ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    return parse


def score(text: str) -> float:
    """A score option's type: a number in 0..1 (NaN refused)."""
    return _unit(text, "a score in 0..1")


def fraction(text: str) -> float:
    """A fraction option's type: a number in 0..1, 1 itself excluded (NaN refused)."""
    value = _unit(text, "a fraction in 0..1 (1 excluded)")
    if value == 1:
        raise argparse.ArgumentTypeError("expected a fraction below 1, got 1")
    return value


def _unit(text: str, expected: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
    return value
