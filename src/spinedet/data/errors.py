"""The exception types the data package raises for bad input files."""

from __future__ import annotations

from pathlib import Path

from ..errors import SpinedetError


class DataError(SpinedetError):
    """A dataset file is missing or malformed.

    With ``file``, the message is a single line starting with the offending file, so it reads
    well in a log; ``file`` and ``reason`` keep the two parts apart for callers that report
    problems themselves. Without ``file`` the message is kept as is: torch's DataLoader re-raises
    worker errors as ``DataError(traceback_text)``.
    """

    def __init__(self, reason: str, file: str | Path | None = None) -> None:
        self.file = None if file is None else str(file)
        self.reason = reason if file is None else " ".join(str(reason).split())
        super().__init__(self.reason if self.file is None else f"{self.file}: {self.reason}")


class UnreadableImage(DataError):
    """An image file that is missing or cannot be decoded (as opposed to one that does not fit
    its annotations): training can do without it."""
