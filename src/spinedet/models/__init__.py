"""SpineNet backbones and detectors."""

from .detectors import spinenet_fasterrcnn, spinenet_maskrcnn, spinenet_retinanet
from .registry import create_model, list_models, load_model, model_task
from .specs import SCALING, SPINENET_BLOCK_SPECS, BlockSpec, Scaling
from .spinenet import SpineNet, spinenet
from .weights import WeightsError, load_weights, save_weights

__all__ = [
    "BlockSpec",
    "SCALING",
    "SPINENET_BLOCK_SPECS",
    "Scaling",
    "SpineNet",
    "WeightsError",
    "create_model",
    "list_models",
    "load_model",
    "load_weights",
    "model_task",
    "save_weights",
    "spinenet",
    "spinenet_fasterrcnn",
    "spinenet_maskrcnn",
    "spinenet_retinanet",
]
