"""Training state on disk: atomic writes, so an interrupted run can always continue."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import SpinedetError
from ..models.weights import atomic_write

__all__ = ["save_state", "load_state", "CheckpointError", "TrainingStateError"]


class TrainingStateError(SpinedetError):
    """A training checkpoint that is missing or unreadable."""


CheckpointError = TrainingStateError  # its earlier name


def save_state(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` (model, optimizer, scheduler, scaler, counters) via temp file + rename."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise TrainingStateError(f"{path}: no checkpoint to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise TrainingStateError(
            f"{path}: unreadable checkpoint ({type(e).__name__}: {e})"
        ) from None
    missing = {"model", "optimizer", "scheduler", "epoch", "step"} - set(state)
    if missing:
        raise TrainingStateError(
            f"{path}: not a spinedet training checkpoint (no {sorted(missing)})"
        )
    return state
