"""spinedet: SpineNet scale-permuted backbones for detection and instance segmentation."""

from .models import (
    SpineNet,
    create_model,
    list_models,
    load_model,
    load_weights,
    save_weights,
    spinenet,
    spinenet_fasterrcnn,
    spinenet_maskrcnn,
    spinenet_retinanet,
)

__version__ = "0.1.0"

__all__ = [
    "SpineNet",
    "create_model",
    "list_models",
    "load_model",
    "load_weights",
    "save_weights",
    "spinenet",
    "spinenet_fasterrcnn",
    "spinenet_maskrcnn",
    "spinenet_retinanet",
]
