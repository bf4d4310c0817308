"""The tensorflow/tpu detection code (``models/official/detection``) as a reference: builds its
SpineNet, classification head and RetinaNet head under ``tf.compat.v1`` graph mode, randomises
every variable, saves TF1 name-based checkpoints and runs forward passes.

The repository is not part of spinedet: point ``SPINEDET_TPU_DIR`` at a checkout's
``models/official/detection`` directory. Needs TensorFlow with ``tf_keras``
(``TF_USE_LEGACY_KERAS=1`` is set here, before TensorFlow is imported).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # tf.layers needs Keras 2

TPU_DIR = os.environ.get("SPINEDET_TPU_DIR", "")


def available() -> bool:
    return bool(TPU_DIR) and (Path(TPU_DIR) / "modeling" / "architecture" / "spinenet.py").is_file()


def _modules():
    # The detection code imports ``hyperparameters`` from the repository's models/ directory.
    for path in (str(Path(TPU_DIR).parents[1]), TPU_DIR):
        if path not in sys.path:
            sys.path.insert(0, path)
    import tensorflow.compat.v1 as tf
    from modeling.architecture import heads, nn_ops, spinenet, spinenet_mbconv

    tf.disable_eager_execution()
    return tf, {"spinenet": spinenet, "spinenet_mbconv": spinenet_mbconv}, heads, nn_ops


def _anchors(tf, size, num_scales: int, anchor_size: float) -> dict:
    """tensorflow/tpu's anchors (``dataloader/anchor.py``, its ratios) with a batch of one."""
    from dataloader import anchor

    boxes = anchor.Anchor(3, 7, num_scales, [1.0, 2.0, 0.5], anchor_size, list(size))
    return {level: tf.expand_dims(b, 0) for level, b in boxes.multilevel_boxes.items()}


def _retinanet_detections(tf, scores, boxes, size, anchor_size) -> dict:
    """``RetinanetModel``'s inference: its ``MultilevelDetectionGenerator`` as the RetinaNet
    configs set it (``retinanet_config.py``; the SpineNet yamls leave ``postprocess`` alone)."""
    from ops import postprocess_ops

    from configs import retinanet_config

    params = retinanet_config.RETINANET_CFG
    generator = postprocess_ops.MultilevelDetectionGenerator(3, 7, params.postprocess)
    image_shape = tf.constant([[list(size)]], tf.float32)
    out = generator(boxes, scores, _anchors(tf, size, 3, anchor_size), image_shape)
    return _detections(out)


def _detections(out: dict) -> dict:
    keys = ("boxes", "scores", "classes", "masks")
    return {f"detection_{k}": out[f"detection_{k}"][0] for k in keys if f"detection_{k}" in out}


def _maskrcnn_outputs(tf, heads, feats, norm, activation, config, size) -> dict:
    """The R-CNN heads on the given RoIs and, in the same calls, ``MaskrcnnModel``'s inference
    (``maskrcnn_model.py``): proposals (``ROIGenerator``), box head, ``GenericDetectionGenerator``
    and the mask head on the detections, as the Mask R-CNN configs set them."""
    from ops import postprocess_ops, roi_ops, spatial_transform_ops

    from configs import maskrcnn_config

    params = maskrcnn_config.MASKRCNN_CFG
    classes, filters = config["num_classes"], config["num_filters"]
    rpn = heads.RpnHead(3, 7, 3, 1, filters, False, activation, True, norm)
    scores, boxes = rpn(feats, is_training=False)
    outputs = {f"rpn_scores{lvl}": scores[lvl] for lvl in scores}
    outputs |= {f"rpn_boxes{lvl}": boxes[lvl] for lvl in boxes}
    anchors = _anchors(tf, size, 1, config["anchor_size"])
    image_shape = tf.constant([list(size)], tf.float32)
    proposals, _ = roi_ops.ROIGenerator(params.roi_proposal)(
        boxes, scores, anchors, image_shape, False
    )
    # One call of each head on the given RoIs followed by the pipeline's: the heads are
    # per RoI, and a second call would create a second set of variables.
    n = len(config["rois"])
    rois = tf.concat([tf.constant([config["rois"]], tf.float32), proposals], 1)
    box_features = spatial_transform_ops.multilevel_crop_and_resize(feats, rois, output_size=7)
    fast_rcnn = heads.FastrcnnHead(
        classes, 4, filters, False, 1, config["fc_dims"], activation, True, norm
    )
    logits, deltas = fast_rcnn(box_features, is_training=False)
    generator = postprocess_ops.GenericDetectionGenerator(params.postprocess)
    detections = generator(deltas[:, n:], logits[:, n:], proposals, image_shape[:, None])
    rois = tf.concat([rois[:, :n], detections["detection_boxes"]], 1)
    roi_classes = tf.concat(
        [tf.constant([config["roi_classes"]], tf.int32), detections["detection_classes"]], 1
    )
    mask_features = spatial_transform_ops.multilevel_crop_and_resize(feats, rois, output_size=14)
    mask_head = heads.MaskrcnnHead(classes, 28, 4, filters, False, activation, True, norm)
    masks = mask_head(mask_features, roi_classes, is_training=False)
    detections["detection_masks"] = tf.sigmoid(masks[:, n:])
    return (
        outputs
        | _detections(detections)
        | {
            "proposals": proposals[0],
            "proposal_classes": logits[0, n:],
            "proposal_deltas": deltas[0, n:],
            "box_features": box_features[0, :n],
            "classes": logits[0, :n],
            "deltas": deltas[0, :n],
            "mask_features": mask_features[0, :n],
            "masks": masks[0, :n],
        }
    )


class TpuModel:
    """One graph: an NHWC image placeholder of a fixed size and named output tensors."""

    def __init__(
        self,
        size: tuple[int, int],
        activation: str,
        model_id: str = "49",
        scaling: dict | None = None,
        num_classes: int | None = None,
        retinanet: dict | None = None,
        maskrcnn: dict | None = None,
        bn_eps: float = 1e-5,
        backbone: str = "spinenet",
    ) -> None:
        """``scaling`` overrides SpineNet's SCALING_MAP entry (``filter_size_scale``,
        ``endpoints_num_filters``, ...); ``num_classes`` adds the classification head
        (aggregation ``all``, as the zoo's configs); ``retinanet`` (``num_classes``,
        ``num_convs``, ``num_filters``, ``anchor_size``, optionally ``separable``) adds a
        RetinaNet head with 9 anchors per place and its inference (``detection_boxes``, ...);
        ``maskrcnn`` (``num_classes``, ``num_filters``, ``fc_dims``, ``anchor_size``, ``rois``
        as y1, x1, y2, x2, ``roi_classes``) adds the Mask R-CNN heads of its SpineNet configs
        (BatchNorm, RPN of one conv and 3 anchors, 4 convs + 1 FC, 4 mask convs) run on the
        given RoIs, and its inference (``proposals``, ``detection_boxes``, ...,
        ``detection_masks``). ``backbone`` ``"spinenet_mbconv"`` builds SpineNet-Mobile
        (``SpineNetMBConv``, the zoo's SpineNetMB-49, SE ratio 0.2) instead of SpineNet."""
        tf, backbones, heads, nn_ops = _modules()
        module = backbones[backbone]
        self.tf = tf
        self.graph = tf.Graph()
        with self.graph.as_default():
            norm = nn_ops.BatchNormActivation(momentum=0.9, epsilon=bn_eps, activation=activation)
            params = {**module.SCALING_MAP[model_id], **(scaling or {})}
            builder = module.SpineNet if backbone == "spinenet" else module.SpineNetMBConv
            network = builder(
                min_level=3,
                max_level=7,
                block_specs=module.build_block_specs(),
                activation=activation,
                batch_norm_activation=norm,
                **params,
            )
            self.images = tf.placeholder(tf.float32, [1, *size, 3])
            feats = network(self.images, is_training=False)
            self.outputs = {f"p{level}": value for level, value in feats.items()}
            if num_classes is not None:
                head = heads.ClassificationHead(num_classes, 0, "all", 0.0, norm)
                self.outputs["logits"] = head(feats, is_training=False)
            if retinanet is not None:
                head = heads.RetinanetHead(
                    3,
                    7,
                    retinanet["num_classes"],
                    9,
                    retinanet["num_convs"],
                    retinanet["num_filters"],
                    use_separable_conv=retinanet.get("separable", False),
                    activation=activation,
                    batch_norm_activation=norm,
                )
                scores, boxes = head(feats, is_training=False)
                for level in scores:
                    self.outputs[f"scores{level}"] = scores[level]
                    self.outputs[f"boxes{level}"] = boxes[level]
                self.outputs |= _retinanet_detections(
                    tf, scores, boxes, size, retinanet["anchor_size"]
                )
                self._predictors = {
                    "retinanet/class_net/class-predict": (list(scores.values()), -4.0, 1.5, 6.0),
                    "retinanet/box_net/box-predict": (list(boxes.values()), 0.0, 0.3),
                }
            if maskrcnn is not None:
                self.outputs |= _maskrcnn_outputs(
                    tf, heads, feats, norm, activation, maskrcnn, size
                )
                levels = range(3, 8)
                rpn_scores = [self.outputs[f"rpn_scores{lvl}"] for lvl in levels]
                rpn_boxes = [self.outputs[f"rpn_boxes{lvl}"] for lvl in levels]
                self._predictors = {
                    "rpn_head/rpn-class": (rpn_scores, 0.0, 2.0),
                    "rpn_head/rpn-box": (rpn_boxes, 0.0, 0.3),
                    "fast_rcnn_head/class-predict": ([self.outputs["classes"]], 0.0, 2.0),
                    "fast_rcnn_head/box-predict": ([self.outputs["deltas"]], 0.0, 1.0),
                    "mask_head/mask_fcn_logits": ([self.outputs["masks"]], 0.0, 2.0),
                }
            self.variables = tf.global_variables()
            self.session = tf.Session(graph=self.graph)
            self.session.run(tf.global_variables_initializer())

    def num_parameters(self) -> int:
        """Trainable parameters (BN moving statistics excluded), as the zoo counts them."""
        with self.graph.as_default():
            return sum(int(np.prod(v.shape)) for v in self.tf.trainable_variables())

    def randomize(self, seed: int = 0) -> None:
        """Fan-in scaled kernels, random BN parameters and statistics, random biases."""
        rng = np.random.default_rng(seed)
        values = {}
        for var in self.variables:
            name, shape = var.op.name, tuple(var.shape.as_list())
            if name.endswith("kernel"):
                value = rng.normal(0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
            elif name.endswith(("gamma", "moving_variance")):
                value = rng.uniform(0.5, 1.5, shape)
            else:
                value = rng.normal(0, 0.2, shape)
            # Fed in place of the initial value: one run, no new ops per variable.
            values[var.initializer.inputs[1]] = value.astype(np.float32)
        self.session.run([v.initializer for v in self.variables], values)

    def calibrate(self, images: np.ndarray) -> None:
        """Make the randomised detector behave like a trained one on ``images``, so that its
        detections are worth comparing: each predictor's kernel and bias are rescaled so its
        outputs have a set mean and spread (RetinaNet: confident few classes, sigmoid > 0.05
        for about a quarter; box deltas of plausible size; mask logits of a trained head's
        size, not the thousands random weights give, whose rounding would swamp the mask
        probabilities). RetinaNet's class logits are also kept under 6 (sigmoid 0.9975): a
        heavy tail would saturate the top scores to exactly 1.0 in float32, and the detections
        would be decided by the order of ties. Two passes, as the second stage's inputs depend
        on the calibrated RPN."""
        for _ in range(2):
            for scope, (tensors, mean, std, *ceiling) in self._predictors.items():
                values = np.concatenate(
                    [v.ravel() for v in self.session.run(tensors, {self.images: images})]
                )
                scale = std / values.std()
                if ceiling:
                    scale = min(scale, (ceiling[0] - mean) / (values.max() - values.mean()))
                variables = {v.op.name: v for v in self.variables}
                # A separable predictor's pointwise kernel scales its outputs.
                name = "kernel" if f"{scope}/kernel" in variables else "pointwise_kernel"
                kernel = variables[f"{scope}/{name}"]
                bias = variables[f"{scope}/bias"]
                k, b = self.session.run([kernel, bias])
                kernel.load(k * scale, self.session)
                bias.load((b - values.mean()) * scale + mean, self.session)

    def save(self, directory: str | Path) -> str:
        """A TF1 name-based checkpoint ``directory/model.ckpt`` (``.index`` + ``.data``)."""
        with self.graph.as_default():
            saver = self.tf.train.Saver(self.variables)
            return saver.save(
                self.session, str(Path(directory) / "model.ckpt"), write_meta_graph=False
            )

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return self.session.run(self.outputs, {self.images: images})
