"""spinedet: SpineNet scale-permuted backbones for detection and instance segmentation."""

import os

# libgomp reads this when torch loads it: idle OpenMP threads spin briefly, then sleep, so a
# busy neighbouring process slows spinedet ~1.7x rather than ~5x (see engine/runtime.py).
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "3000")

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

__version__ = "0.1.0"

_ENGINE = ("train", "evaluate", "predict")


def __getattr__(name: str):
    # The engine pulls in TensorBoard and pycocotools: load it only when asked for.
    if name in _ENGINE:
        from . import engine

        return getattr(engine, name)
    if name in ("Predictor", "Detections"):
        from . import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'spinedet' has no attribute {name!r}")


__all__ = [
    *_ENGINE,
    "Detections",
    "Predictor",
    "SpineNet",
    "create_model",
    "list_models",
    "load_model",
    "load_weights",
    "save_weights",
    "spinenet",
    "spinenet_classifier",
    "spinenet_fasterrcnn",
    "spinenet_maskrcnn",
    "spinenet_retinanet",
]
