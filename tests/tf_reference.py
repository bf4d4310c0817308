"""Model Garden reference models for parity checks (needs the ``tf`` extra); a test helper,
imported by tests/test_tf_parity.py, scripts/make_tf_fixture.py and benchmarks/backbone_vs_tf.py.

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

try:
    import tensorflow as tf
    import tf_keras
except ImportError as e:
    raise ImportError(
        f"tests/tf_reference.py needs TensorFlow and Model Garden ({e}): "
        "pip install 'spinedet[tf]' (recipe in DEVELOPERS.md); convert-tf itself does not"
    ) from e
from official.vision.configs import backbones as mg_backbones  # noqa: E402
from official.vision.configs import common as mg_common  # noqa: E402
from official.vision.configs import decoders as mg_decoders  # noqa: E402
from official.vision.configs import maskrcnn as mg_maskrcnn  # noqa: E402
from official.vision.modeling import factory, maskrcnn_model, retinanet_model  # noqa: E402
from official.vision.modeling.backbones import spinenet as mg_spinenet  # noqa: E402
from official.vision.modeling.backbones import spinenet_mobile as mg_mobile  # noqa: E402
from official.vision.modeling.heads import dense_prediction_heads  # noqa: E402
from official.vision.modeling.layers import detection_generator  # noqa: E402
from official.vision.ops import anchor as mg_anchor  # noqa: E402
from official.vision.ops import box_ops  # noqa: E402

__all__ = [
    "anchors",
    "build_maskrcnn",
    "calibrate",
    "decode_boxes",
    "build_retinanet",
    "build_spinenet",
    "build_spinenet_mobile",
    "randomize",
    "restore",
    "run_backbone",
    "run_head",
    "run_detections",
    "run_rcnn_heads",
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


def build_spinenet_mobile(
    model_id: str, size: tuple[int, int], activation: str = "relu", **overrides
) -> tf_keras.Model:
    """Model Garden's SpineNet-Mobile-``model_id`` for ``size`` (H, W) inputs (static, as for
    :func:`build_spinenet`), configured as its ``retinanet_spinenet_mobile_coco``."""
    scaling = {**mg_mobile.SCALING_MAP[model_id.upper()], **overrides}
    return mg_mobile.SpineNetMobile(
        input_specs=tf_keras.layers.InputSpec(shape=[None, *size, 3]),
        endpoints_num_filters=scaling["endpoints_num_filters"],
        filter_size_scale=scaling["filter_size_scale"],
        block_repeats=scaling["block_repeats"],
        expand_ratio=6,
        se_ratio=0.2,
        activation=activation,
        use_keras_upsampling_2d=False,
    )


def build_retinanet(
    backbone: tf_keras.Model,
    num_classes: int,
    depth: int,
    filters: int,
    activation: str,
    separable: bool = False,
    anchor_size: float = 3.0,
) -> retinanet_model.RetinaNetModel:
    """A RetinaNet (SpineNet needs no decoder) with Model Garden's head, 9 anchors per place
    (``separable`` convs for SpineNet-Mobile) and the detection generator of its RetinaNet
    configs (top 5000, score 0.05, NMS 0.5, 100 detections)."""
    head = dense_prediction_heads.RetinaNetHead(
        min_level=3,
        max_level=7,
        num_classes=num_classes,
        num_anchors_per_location=9,
        num_convs=depth,
        num_filters=filters,
        use_separable_conv=separable,
        activation=activation,
    )
    generator = detection_generator.MultilevelDetectionGenerator(
        pre_nms_top_k=5000,
        pre_nms_score_threshold=0.05,
        nms_iou_threshold=0.5,
        max_num_detections=100,
        nms_version="v2",
    )
    model = retinanet_model.RetinaNetModel(
        backbone,
        None,
        head,
        generator,
        min_level=3,
        max_level=7,
        num_scales=3,
        aspect_ratios=[0.5, 1.0, 2.0],
        anchor_size=anchor_size,
    )
    run_head(model, run_backbone(backbone, np.zeros((1, *backbone.input_shape[1:3], 3))))
    return model


def build_maskrcnn(
    backbone: tf_keras.Model,
    num_classes: int,
    filters: int,
    fc_dim: int,
    activation: str,
    *,
    include_mask: bool = True,
    rpn_convs: int = 1,
    rpn_scales: int = 1,
    anchor_size: float = 3.0,
) -> maskrcnn_model.MaskRCNNModel:
    """Model Garden's Mask R-CNN (or Faster R-CNN without the mask) on a SpineNet, built by
    its factory from a config like ``maskrcnn_spinenet_coco`` (identity decoder, P3..P7)."""
    config = mg_maskrcnn.MaskRCNN(
        num_classes=num_classes,
        input_size=[*backbone.input_shape[1:3], 3],
        min_level=3,
        max_level=7,
        anchor=mg_maskrcnn.Anchor(anchor_size=anchor_size, num_scales=rpn_scales),
        include_mask=include_mask,
        backbone=mg_backbones.Backbone(type="spinenet", spinenet=mg_backbones.SpineNet()),
        decoder=mg_decoders.Decoder(type="identity", identity=mg_decoders.Identity()),
        norm_activation=mg_common.NormActivation(activation=activation),
        rpn_head=mg_maskrcnn.RPNHead(num_convs=rpn_convs, num_filters=filters),
        detection_head=mg_maskrcnn.DetectionHead(
            num_convs=4, num_filters=filters, num_fcs=1, fc_dims=fc_dim
        ),
        mask_head=mg_maskrcnn.MaskHead(num_convs=4, num_filters=filters),
    )
    spec = tf_keras.layers.InputSpec(shape=backbone.input_shape)
    model = factory.build_maskrcnn(spec, config, backbone=backbone)
    # Build the heads' variables with one pass on dummy features and RoIs.
    features = run_backbone(backbone, np.zeros((1, *backbone.input_shape[1:3], 3)))
    run_rcnn_heads(model, features, np.asarray([[0.0, 0.0, 32.0, 32.0]]), np.asarray([1]))
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


def calibrate(model: tf_keras.Model, images: np.ndarray, seed: int = 0) -> None:
    """Make a randomised RetinaNet or Mask R-CNN behave like a trained one on ``images`` (NHWC,
    normalised), so that its detections are worth comparing: every BatchNorm's moving
    statistics become those of these images (variances floored at 1: a variance near 0 turns
    float rounding into noise), box predictors give deltas of plausible size and class logits
    are confident (RetinaNet: prior bias -3)."""
    norms = [m for m in model.submodules if isinstance(m, tf_keras.layers.BatchNormalization)]
    for norm in norms:
        norm.momentum = 0.0  # one training-mode call sets the moving statistics
    images = tf.constant(images, tf.float32)
    model.backbone(images, training=True)
    features = model.backbone(images, training=False)
    if isinstance(model, retinanet_model.RetinaNetModel):
        model.head(features, training=True)
    else:
        _calibrate_rcnn_heads(model, features, seed)
    for norm in norms:
        norm.momentum = 0.99
        norm.moving_variance.assign(tf.maximum(norm.moving_variance, 1.0))
    for var in model.variables:
        name = var.name.split("/")[-2:]
        if name[0] in ("boxes", "detection-boxes", "rpn-boxes"):
            var.assign(var * 0.1)
        elif name == ["scores", "bias:0"]:
            var.assign(tf.fill(var.shape, -3.0))
        elif name[0] in ("scores", "detection-scores") and name[1] == "kernel:0":
            var.assign(var * 3.0)


def _calibrate_rcnn_heads(model: maskrcnn_model.MaskRCNNModel, features, seed: int) -> None:
    """Training-mode passes of the R-CNN heads on the features and random RoIs."""
    model.rpn_head(features, training=True)
    h, w = [int(d) * 8 for d in features["3"].shape[1:3]]
    rng = np.random.default_rng(seed)
    sides = np.exp(rng.uniform(np.log(16), np.log(min(h, w)), (64, 2)))
    y, x = rng.uniform(0, h - sides[:, 0]), rng.uniform(0, w - sides[:, 1])
    rois = tf.constant(np.stack([y, x, y + sides[:, 0], x + sides[:, 1]], 1)[None], tf.float32)
    model.detection_head[0](model.roi_aligner(features, rois), training=True)
    if model.mask_head is not None:
        classes = tf.zeros((1, len(sides)), tf.int32)
        model.mask_head([model.mask_roi_aligner(features, rois), classes], training=True)


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


def run_rcnn_heads(
    model: maskrcnn_model.MaskRCNNModel,
    features: dict[str, np.ndarray],
    rois: np.ndarray,
    roi_classes: np.ndarray,
) -> dict[str, np.ndarray]:
    """Raw outputs of a Mask R-CNN's heads in inference mode, NHWC: the RPN's per level
    (``rpn_scores3``, ``rpn_boxes3``, ...), and for the given RoIs (``[R, 4]`` as ``y1, x1, y2,
    x2`` in image pixels) their RoIAlign features, box-head class and box outputs and, with a
    mask head, the mask logits of ``roi_classes``."""
    scores, boxes = model.rpn_head(features, training=False)
    out = {f"rpn_scores{k}": v.numpy() for k, v in scores.items()}
    out |= {f"rpn_boxes{k}": v.numpy() for k, v in boxes.items()}
    rois = tf.constant(np.asarray(rois)[None], tf.float32)
    box_features = model.roi_aligner(features, rois, training=False)
    classes, deltas = model.detection_head[0](box_features, training=False)
    out |= {"box_features": box_features.numpy()[0], "classes": classes.numpy()[0]}
    out["deltas"] = deltas.numpy()[0]
    if model.mask_head is not None:
        mask_features = model.mask_roi_aligner(features, rois, training=False)
        logits = model.mask_head(
            [mask_features, tf.constant(np.asarray(roi_classes)[None])], training=False
        )
        out |= {"mask_features": mask_features.numpy()[0], "masks": logits.numpy()[0]}
    return out


def anchors(
    size: tuple[int, int], num_scales: int, anchor_size: float, levels: range = range(3, 8)
) -> dict[str, np.ndarray]:
    """Model Garden's anchors for an image of ``size``: per level ``[H, W, A * 4]``, ``y1, x1,
    y2, x2``, aspect ratios 0.5, 1, 2."""
    boxes = mg_anchor.Anchor(
        levels[0], levels[-1], num_scales, [0.5, 1.0, 2.0], anchor_size, list(size)
    ).multilevel_boxes
    return {k: v.numpy() for k, v in boxes.items()}


def decode_boxes(deltas: np.ndarray, anchors: np.ndarray, weights=None) -> np.ndarray:
    """Model Garden's box decoding: ``(ty, tx, th, tw)`` deltas on ``y1, x1, y2, x2`` boxes."""
    return box_ops.decode_boxes(
        tf.constant(deltas, tf.float32), tf.constant(anchors, tf.float32), weights
    ).numpy()


def run_detections(model: tf_keras.Model, images: np.ndarray) -> dict[str, np.ndarray]:
    """Model Garden's inference (RetinaNet or Mask R-CNN) on one normalised NHWC image: its
    ``num_detections`` boxes (``y1, x1, y2, x2``), scores, classes and, for Mask R-CNN, 28 x 28
    mask probabilities."""
    size = list(images.shape[1:3])
    out = model(tf.constant(images, tf.float32), image_shape=tf.constant([size], tf.float32))
    n = int(out["num_detections"][0])
    keys = ["detection_boxes", "detection_scores", "detection_classes", "detection_masks"]
    return {k.removeprefix("detection_"): out[k][0][:n].numpy() for k in keys if k in out}
