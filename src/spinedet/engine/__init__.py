"""Training, evaluation and prediction."""

from .api import evaluate, load_checkpoint, predict, resolve_checkpoint
from .trainer import TrainingError, train

__all__ = ["TrainingError", "evaluate", "load_checkpoint", "predict", "resolve_checkpoint", "train"]
