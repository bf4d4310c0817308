"""Model Garden reference models for parity checks (needs the ``tf`` extra).

Import spinedet (torch, torchvision) before this module: loading TensorFlow first makes
torch's optional Triton import crash in the same process.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if importlib.util.find_spec("tensorflow_datasets") is None:
    # official.vision imports it at module level for data pipelines that model building never
    # uses; it pulls in a large dependency tree, so an empty module stands in.
    sys.modules["tensorflow_datasets"] = types.ModuleType("tensorflow_datasets")

import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402
from official.vision.modeling import retinanet_model  # noqa: E402
from official.vision.modeling.backbones import spinenet as mg_spinenet  # noqa: E402
from official.vision.modeling.heads import dense_prediction_heads  # noqa: E402

__all__ = [
    "build_retinanet",
    "build_spinenet",
    "randomize",
    "restore",
    "run_backbone",
    "run_head",
    "save",
]


def build_spinenet(
    model_id: str, size: tuple[int, int], activation: str = "relu", **overrides
) -> tf_keras.Model:
    """Model Garden's SpineNet-``model_id`` for ``size`` (H, W) inputs.

    The input size must be static: with an unknown width Model Garden cannot compare feature
    widths and skips fusing unconsumed blocks (block 11 into block 14).
    """
    scaling = {**mg_spinenet.SCALING_MAP[model_id.upper()], **overrides}
    return mg_spinenet.SpineNet(
        input_specs=tf_keras.layers.InputSpec(shape=[None, *size, 3]),
        endpoints_num_filters=scaling["endpoints_num_filters"],
        filter_size_scale=scaling["filter_size_scale"],
        resample_alpha=scaling["resample_alpha"],
        block_repeats=scaling["block_repeats"],
        activation=activation,
    )


def build_retinanet(
    backbone: tf_keras.Model, num_classes: int, depth: int, filters: int, activation: str
) -> retinanet_model.RetinaNetModel:
    """A RetinaNet (SpineNet needs no decoder) with Model Garden's head, 9 anchors per place."""
    head = dense_prediction_heads.RetinaNetHead(
        min_level=3,
        max_level=7,
        num_classes=num_classes,
        num_anchors_per_location=9,
        num_convs=depth,
        num_filters=filters,
        activation=activation,
    )
    model = retinanet_model.RetinaNetModel(backbone, None, head, None)
    run_head(model, run_backbone(backbone, np.zeros((1, *backbone.input_shape[1:3], 3))))
    return model


def randomize(model: tf_keras.Model, seed: int = 0) -> None:
    """Random kernels (fan-in scaled) and BN parameters and statistics, so every variable
    matters to the outputs."""
    rng = np.random.default_rng(seed)
    for var in model.variables:
        name, shape = var.name, tuple(var.shape)
        if "kernel" in name:
            value = rng.normal(0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
        elif "gamma" in name or "moving_variance" in name:
            value = rng.uniform(0.5, 1.5, shape)
        else:  # beta, moving_mean, conv bias
            value = rng.normal(0, 0.2, shape)
        var.assign(value.astype(np.float32))


def save(model: tf_keras.Model, directory: str) -> str:
    """Write a training-style checkpoint (``model`` at the root) and return its prefix."""
    return tf.train.Checkpoint(model=model).save(os.path.join(directory, "ckpt"))


def run_backbone(backbone: tf_keras.Model, images: np.ndarray) -> dict[str, np.ndarray]:
    """NHWC images -> ``{"3": NHWC array, ...}`` in inference mode."""
    return {k: v.numpy() for k, v in backbone(images.astype(np.float32), training=False).items()}


def run_head(model: retinanet_model.RetinaNetModel, features: dict[str, np.ndarray]):
    """Raw per-level class and box outputs, NHWC, of a RetinaNet head in inference mode."""
    scores, boxes, _ = model.head(features, training=False)
    return {k: v.numpy() for k, v in scores.items()}, {k: v.numpy() for k, v in boxes.items()}


def restore(model: tf_keras.Model, prefix: str | os.PathLike) -> None:
    """Load a checkpoint written by :func:`save` (every variable must match)."""
    tf.train.Checkpoint(model=model).restore(str(prefix)).assert_existing_objects_matched()
