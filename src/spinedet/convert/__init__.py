"""Conversion of TensorFlow SpineNet checkpoints (Model Garden TF2, tensorflow/tpu TF1), read
without TensorFlow."""

from .api import convert_tf
from .tf_checkpoint import CheckpointError, TensorBundle, TFCheckpoint, open_checkpoint
from .tf_mapping import ConversionError, convert_checkpoint
from .tpu_mapping import convert_tpu_checkpoint

__all__ = [
    "CheckpointError",
    "ConversionError",
    "TFCheckpoint",
    "TensorBundle",
    "convert_checkpoint",
    "convert_tf",
    "convert_tpu_checkpoint",
    "open_checkpoint",
]
