"""Conversion of TensorFlow Model Garden SpineNet checkpoints (read without TensorFlow)."""

from .api import convert_tf
from .tf_checkpoint import CheckpointError, TFCheckpoint
from .tf_mapping import ConversionError, convert_checkpoint

__all__ = [
    "CheckpointError",
    "ConversionError",
    "TFCheckpoint",
    "convert_checkpoint",
    "convert_tf",
]
