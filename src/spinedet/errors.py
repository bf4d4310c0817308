"""The one base class of the problems a user can cause and fix.

Commands print a :class:`SpinedetError` as one line and exit non-zero; anything else is a
bug and keeps its traceback. It derives from ``ValueError`` so code that caught the earlier
``ValueError`` subclasses keeps working.
"""

from __future__ import annotations

import signal

__all__ = ["ModelError", "SpinedetError", "Stopped", "shorten"]


class SpinedetError(ValueError):
    """A problem with the user's input (a file, a name, an option), told in one line."""


class ModelError(SpinedetError):
    """An unknown model name, variant or builder option."""


class Stopped(KeyboardInterrupt):
    """A stop by SIGINT or SIGTERM, with what it leaves in one line; commands exit with the
    shell's code for the signal, 128 + its number (130, 143)."""

    def __init__(self, message: str = "", signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = signum


def shorten(items: list[str], limit: int = 5) -> str:
    """``a, b, c and 7 more``: a list for a one-line message."""
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
