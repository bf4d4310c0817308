"""Which torch device a command or ``Predictor`` runs on; the training engine and the inference
path share it, so a device this machine lacks is the same one-line error everywhere."""

from __future__ import annotations

import torch

from .errors import SpinedetError

__all__ = ["default_device"]


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` (``cpu``, ``cuda``, ``cuda:N``), checked against this machine: a one-line
    SpinedetError for another name or a CUDA device that is not here. None: CUDA when present,
    else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        chosen = None
    if chosen is None or chosen.type not in ("cpu", "cuda"):
        raise SpinedetError(f"device {str(device)!r}: expected cpu, cuda or cuda:N")
    if chosen.type == "cuda" and not torch.cuda.is_available():
        build = "" if torch.version.cuda else "; this torch is built without CUDA"
        raise SpinedetError(f"device {str(device)!r}: no CUDA device is available here{build}")
    if chosen.type == "cuda" and (chosen.index or 0) >= torch.cuda.device_count():
        raise SpinedetError(
            f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA devices"
        )
    return chosen
