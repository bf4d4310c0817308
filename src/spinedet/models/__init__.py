"""SpineNet backbones and detectors."""

from .classifier import SpineNetClassifier, spinenet_classifier
from .description import Category, ModelDescription
from .detectors import (
    detection_selection,
    selecting,
    spinenet_fasterrcnn,
    spinenet_maskrcnn,
    spinenet_retinanet,
)
from .registry import FAMILIES, TASKS, create_model, describe, list_models, load_model, model_task
from .specs import (
    MOBILE_SCALING,
    SCALING,
    SPINENET_BLOCK_SPECS,
    SPINENET_MOBILE_BLOCK_SPECS,
    BlockSpec,
    MobileScaling,
    Scaling,
)
from .spinenet import SpineNet, spinenet
from .spinenet_mobile import SpineNetMobile, spinenet_mobile
from .weights import WeightsError, load_weights, read_description, save_weights

__all__ = [
    "BlockSpec",
    "Category",
    "FAMILIES",
    "ModelDescription",
    "TASKS",
    "describe",
    "detection_selection",
    "read_description",
    "selecting",
    "MOBILE_SCALING",
    "MobileScaling",
    "SCALING",
    "SPINENET_BLOCK_SPECS",
    "SPINENET_MOBILE_BLOCK_SPECS",
    "Scaling",
    "SpineNet",
    "SpineNetClassifier",
    "SpineNetMobile",
    "WeightsError",
    "create_model",
    "list_models",
    "load_model",
    "load_weights",
    "model_task",
    "save_weights",
    "spinenet",
    "spinenet_classifier",
    "spinenet_mobile",
    "spinenet_fasterrcnn",
    "spinenet_maskrcnn",
    "spinenet_retinanet",
]
