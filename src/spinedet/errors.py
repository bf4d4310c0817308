"""The one base class of the problems a user can cause and fix.

Commands print a :class:`SpinedetError` as one line and exit non-zero; anything else is a
bug and keeps its traceback. It derives from ``ValueError`` so code that caught the earlier
``ValueError`` subclasses keeps working.
"""

from __future__ import annotations

__all__ = ["ModelError", "SpinedetError"]


class SpinedetError(ValueError):
    """A problem with the user's input (a file, a name, an option), told in one line."""


class ModelError(SpinedetError):
    """An unknown model name, variant or builder option."""
