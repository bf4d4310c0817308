"""spinedet: SpineNet scale-permuted backbones for detection and instance segmentation."""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

# libgomp reads this when torch loads it: idle OpenMP threads spin briefly, then sleep, so a
# busy neighbouring process slows spinedet ~1.7x rather than ~5x (see engine/runtime.py).
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "3000")

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .engine import evaluate, predict, train
    from .models import (
        SpineNet,
        create_model,
        list_models,
        load_model,
        load_weights,
        save_weights,
        spinenet,
        spinenet_classifier,
        spinenet_fasterrcnn,
        spinenet_maskrcnn,
        spinenet_retinanet,
    )
    from .predictor import Detections, Predictor

__all__ = [
    "Detections",
    "Predictor",
    "SpineNet",
    "create_model",
    "evaluate",
    "list_models",
    "load_model",
    "load_weights",
    "predict",
    "save_weights",
    "spinenet",
    "spinenet_classifier",
    "spinenet_fasterrcnn",
    "spinenet_maskrcnn",
    "spinenet_retinanet",
    "train",
]

# The module each public name lives in (models, unless named here). They load on first use:
# the models pull in torch and torchvision (~5 s), the engine TensorBoard and pycocotools, and
# `spinedet --help` or the data commands need none of them.
_WHERE = (
    dict.fromkeys(__all__, "models")
    | dict.fromkeys(("train", "evaluate", "predict"), "engine")
    | dict.fromkeys(("Predictor", "Detections"), "predictor")
)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'spinedet' has no attribute {name!r}")
