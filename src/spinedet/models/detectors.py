"""SpineNet detectors assembled from torchvision's detection models.

SpineNet's outputs already form the P3..P7 pyramid, so the backbone plugs into torchvision's
RetinaNet, Faster R-CNN and Mask R-CNN without an FPN neck.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import torch
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor

from ..errors import ModelError
from .heads import (
    LevelRPNHead,
    PyramidRoIAlign,
    conv_tower,
    pyramid_anchors,
    rcnn_box_head,
    rcnn_mask_predictor,
    retinanet_head,
)
from .host_data import DeviceBoxCoder
from .layers import ACTIVATIONS, make_norm
from .matching import match, pad_boxes, pairwise_iou
from .pixel_boxes import BOX_CONVENTIONS, PixelBoxCoder, corner_boxes, use_pixel_boxes
from .postprocess import (
    SELECTION,
    DetectionTransform,
    best_detections,
    image_limits,
    retinanet_candidates,
    selection_setting,
    split_detections,
)
from .rcnn import BatchedRoIHeads, BatchedRPN
from .registry import check_option_types, register_task, resolve_variant
from .spinenet import ScalePermutedBackbone, build_variant
from .spinenet_mobile import SPINENET_MOBILE  # noqa: F401 - registers the Mobile family

__all__ = [
    "detection_selection",
    "selecting",
    "spinenet_retinanet",
    "spinenet_fasterrcnn",
    "spinenet_maskrcnn",
]


def _check_num_classes(num_classes: int, class_names: Sequence[str] | None) -> int:
    if class_names is not None:
        expected = len(class_names) + 1
        if num_classes is not None and num_classes != expected:
            raise ModelError(
                f"num_classes={num_classes} does not match {len(class_names)} class names "
                f"(num_classes counts the background: expected {expected})"
            )
        num_classes = expected
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ModelError(
            "num_classes must be an integer >= 2 (object classes + background), "
            f"got {num_classes!r}"
        )
    return num_classes


def _head_norm(norm: str, backbone: ScalePermutedBackbone) -> Callable[[int], nn.Module]:
    """Head norm layers; BN takes the backbone's momentum and epsilon."""
    if norm == "bn":
        return make_norm("bn", backbone.bn_momentum, backbone.bn_eps)
    if norm == "gn":
        return make_norm("gn")
    raise ModelError(f"unknown head_norm {norm!r}; expected 'bn' or 'gn'")


def _fc_norm(norm: str, backbone: ScalePermutedBackbone) -> Callable[[int], nn.Module] | None:
    """Norm after the box head's FC: BatchNorm1d as in Model Garden, none with GroupNorm."""
    if norm == "bn":
        return partial(nn.BatchNorm1d, eps=backbone.bn_eps, momentum=backbone.bn_momentum)
    return None


def _split_kwargs(detector: type, kwargs: dict) -> tuple[dict, dict]:
    """Split options into those of the torchvision ``detector`` (e.g. ``rpn_batch_size_per_image``)
    and the rest, which go to the SpineNet backbone."""
    accepted = inspect.signature(detector.__init__).parameters
    own = {k: v for k, v in kwargs.items() if k in accepted}
    check_option_types(own, accepted, f"torchvision's {detector.__name__}")
    return own, {k: v for k, v in kwargs.items() if k not in accepted}


def _backbone(variant: str, backbone_kwargs: dict) -> tuple[nn.Module, dict]:
    """The backbone a task builder's ``variant`` names, and its family's head defaults."""
    family, key = resolve_variant(variant)
    return build_variant(family, key, backbone_kwargs), family.head_defaults[key]


def _finish(
    model: nn.Module, num_classes: int, class_names: Sequence[str] | None, box_convention: str
) -> nn.Module:
    if box_convention not in BOX_CONVENTIONS:
        raise ModelError(
            f"unknown box_convention {box_convention!r}; expected one of {BOX_CONVENTIONS}"
        )
    # Whole-batch selection and mask pasting (the same detections, see models.postprocess),
    # and box coders that copy their weights to the device once (models.host_data).
    model.transform.__class__ = DetectionTransform
    if hasattr(model, "roi_heads"):
        model.rpn.__class__, model.roi_heads.__class__ = BatchedRPN, BatchedRoIHeads
    for module in model.modules():
        if type(getattr(module, "box_coder", None)) is BoxCoder:
            module.box_coder.__class__ = DeviceBoxCoder
    if box_convention == "tpu":
        use_pixel_boxes(model)
    if getattr(model.backbone, "downsample", None) == "tpu":
        # tensorflow/tpu sizes its pools by the ratio of two levels' widths, which is the same
        # at every input size (as a traced export needs) only on inputs padded to the coarsest
        # stride; its own pipeline pads to the square image size, a multiple of it.
        model.transform.size_divisible = max(model.backbone.strides)
    model.num_classes = num_classes
    model.class_names = (
        list(class_names) if class_names is not None else [str(i) for i in range(1, num_classes)]
    )
    return model


def detection_selection(model: nn.Module) -> nn.Module:
    """The module whose ``score_thresh`` and ``detections_per_img`` select a detector's
    detections: an R-CNN's ``roi_heads``, a RetinaNet itself."""
    return getattr(model, "roi_heads", model)


@contextmanager
def selecting(
    model: nn.Module,
    max_detections: int | None = None,
    kept_labels: Tensor | None = None,
    score_thresh: float | None = None,
    nms_thresh: float | None = None,
) -> Iterator[None]:
    """Within the block, ``model`` keeps at most ``max_detections`` detections an image, only of
    the labels where ``kept_labels`` (a bool tensor over its class outputs, on its device) is
    true, scored above ``score_thresh``, suppressing overlaps above ``nms_thresh`` (IoU); None
    leaves the model's own (its ``detections_per_img``, every label, its ``score_thresh`` and
    ``nms_thresh``).

    The model itself is never changed: the settings hold for the calls made in the block's own
    context (thread or asyncio task), so that a model shared with other threads gives each its
    own settings at the same time. The labels left out are dropped before any cap (a
    RetinaNet's best candidates per level, the best ``detections_per_img``): other classes
    never crowd out those kept."""
    heads = detection_selection(model)
    given = {"detections_per_img": max_detections, "kept_labels": kept_labels,
             "score_thresh": score_thresh, "nms_thresh": nms_thresh}  # fmt: skip
    changes = {name: value for name, value in given.items() if value is not None}
    settings = SELECTION.get() or {}
    token = SELECTION.set({**settings, id(heads): {**settings.get(id(heads), {}), **changes}})
    try:
        yield
    finally:
        SELECTION.reset(token)


# Options of torchvision's detector classes (thresholds, proposal counts, sizes) leave the
# weights alone: they are the tasks' runtime options, with the input size.
def _runtime(detector: type) -> set[str]:
    return {*inspect.signature(detector.__init__).parameters, "image_size", "box_convention"}


class BackgroundFreeRetinaNet(RetinaNet):
    """torchvision's RetinaNet that never reports label 0, the background: the class head has
    an output for it (``num_classes`` counts it) that no training target makes positive, and
    tensorflow/tpu's detection generator drops it too. In tensorflow/tpu's box convention it
    never reports an all-zero box either, as tensorflow/tpu's NMS (:meth:`selectable`).

    Anchors are matched, and detections selected, for the whole batch at once
    (:mod:`spinedet.models.matching`, :mod:`spinedet.models.postprocess`), as torchvision does
    image by image and level by level."""

    kept_labels: Tensor | None = None  # the labels reported, all where None (selecting's)

    def compute_loss(
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
    ) -> dict[str, Tensor]:
        """torchvision's losses, with every image's anchors matched at once
        (:func:`~spinedet.models.matching.match`)."""
        gt, real = pad_boxes([t["boxes"] for t in targets])
        matches = match(self.proposal_matcher, pairwise_iou(gt, torch.stack(anchors)), real)
        return self.head.compute_loss(targets, head_outputs, anchors, list(matches.unbind()))

    def postprocess_detections(
        self,
        head_outputs: dict[str, list[Tensor]],
        anchors: list[list[Tensor]],
        image_shapes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        logits = head_outputs["cls_logits"]
        kept = selection_setting(self, "kept_labels")
        if kept is not None:  # before each level's best candidates are taken
            logits = [x.masked_fill(~kept, float("-inf")) for x in logits]
        # Every image of a batch has the anchors of the batch's padded size.
        outputs = logits, head_outputs["bbox_regression"], anchors[0]
        boxes, scores, labels = retinanet_candidates(
            zip(*outputs, strict=True),
            self.box_coder,
            self.topk_candidates,
            image_limits(image_shapes, anchors[0][0]),
        )
        index, found = best_detections(
            boxes,
            scores,
            labels,
            (scores > selection_setting(self, "score_thresh")) & self.selectable(boxes),
            head_outputs["cls_logits"][0].shape[-1],
            selection_setting(self, "nms_thresh"),
            selection_setting(self, "detections_per_img"),
        )
        return split_detections(index, found, boxes=boxes, scores=scores, labels=labels)

    def selectable(self, boxes: Tensor) -> Tensor:
        """Which candidate boxes may be detections: all in torchvision's convention; in
        tensorflow/tpu's, all but all-zero ones. Those still hold their places among the best
        candidates, as in tensorflow/tpu, whose NMS skips them after its top-k."""
        if isinstance(self.box_coder, PixelBoxCoder):
            return ~corner_boxes(boxes)
        return torch.ones_like(boxes[..., 0], dtype=torch.bool)


_ALL = {"spinenet": None, "spinenet_mobile": None}


@register_task("retinanet", families=_ALL, runtime=_runtime(RetinaNet))
def spinenet_retinanet(
    variant: str = "49",
    num_classes: int | None = 91,
    *,
    class_names: Sequence[str] | None = None,
    image_size: int = 640,
    head_depth: int | None = None,
    head_norm: str = "bn",
    anchor_size: float | None = None,
    focal_alpha: float = 0.25,
    focal_gamma: float = 1.5,
    box_convention: str = "torchvision",
    **kwargs,
) -> RetinaNet:
    """RetinaNet with a SpineNet-``variant`` backbone, the paper's head and anchors.

    Args:
        variant: ``49s``, ``49``, ``96``, ``143`` or ``190``, or ``mobile49``, ``mobile49s``,
            ``mobile49xs`` for SpineNet-Mobile (separable-conv head as wide as its endpoints).
        num_classes: classes including background (torchvision's convention); inferred from
            ``class_names`` when given.
        class_names: names of classes 1..num_classes-1, kept on the model.
        image_size: images are resized so the longer side is ``image_size``.
        head_depth: convs per head tower (paper: 4, or 7 for 190).
        head_norm: ``"bn"`` or ``"gn"`` in the head towers.
        anchor_size: anchor side in units of the level stride (paper: 3, or 4 for 143/190).
        focal_alpha, focal_gamma: focal loss parameters (paper: 0.25, 1.5).
        box_convention: ``"torchvision"``, or ``"tpu"`` for tensorflow/tpu's pixel-index boxes
            (its box coding and clipping, see :mod:`spinedet.models.pixel_boxes`), which
            ``convert-tf`` sets for its checkpoints.
        **kwargs: options of torchvision's ``RetinaNet`` (``score_thresh``, ``nms_thresh``,
            ``detections_per_img``, ...) or of :class:`~spinedet.models.spinenet.SpineNet`.
    """
    num_classes = _check_num_classes(num_classes, class_names)
    detector_kwargs, backbone_kwargs = _split_kwargs(RetinaNet, kwargs)
    backbone, cfg = _backbone(variant, backbone_kwargs)
    anchors = pyramid_anchors(
        backbone.levels, anchor_size or cfg["anchor_size"], 3, (0.5, 1.0, 2.0)
    )
    head = retinanet_head(
        backbone.out_channels,
        anchors.num_anchors_per_location()[0],
        num_classes,
        head_depth or cfg["head_depth"],
        _head_norm(head_norm, backbone),
        ACTIVATIONS[backbone.activation],
        focal_alpha,
        focal_gamma,
        separable=cfg.get("separable", False),
    )
    model = BackgroundFreeRetinaNet(
        backbone,
        num_classes,
        min_size=image_size,
        max_size=image_size,
        anchor_generator=anchors,
        head=head,
        **detector_kwargs,
    )
    return _finish(model, num_classes, class_names, box_convention)


def _two_stage(
    kind: type,
    variant: str,
    num_classes: int | None,
    class_names: Sequence[str] | None,
    image_size: int,
    heads: dict,
    kwargs: dict,
) -> nn.Module:
    num_classes = _check_num_classes(num_classes, class_names)
    if heads["box_convs"] < 0:
        raise ModelError(f"box_convs={heads['box_convs']}: expected 0 or more")
    if heads.get("mask_convs", 1) < 1:
        raise ModelError(f"mask_convs={heads['mask_convs']}: the mask head needs at least one conv")
    detector_kwargs, backbone_kwargs = _split_kwargs(kind, kwargs)
    backbone, cfg = _backbone(variant, backbone_kwargs)
    norm = _head_norm(heads["head_norm"], backbone)
    act = ACTIVATIONS[backbone.activation]
    in_channels = backbone.out_channels
    channels = heads["head_channels"] or in_channels
    anchors = pyramid_anchors(
        backbone.levels,
        heads["anchor_size"] or cfg["anchor_size"],
        heads["rpn_scales"] or cfg["rpn_scales"],
        (0.5, 1.0, 2.0),
    )
    fc_dim = heads["fc_dim"] or cfg["fc_dim"]
    if kind is MaskRCNN:
        detector_kwargs |= {
            "mask_roi_pool": PyramidRoIAlign(backbone.levels, output_size=14),
            "mask_head": conv_tower(
                channels, heads["mask_convs"], norm, act, in_channels=in_channels, init_std=None
            ),
            "mask_predictor": rcnn_mask_predictor(channels, num_classes, norm, act),
        }
    rpn_head = LevelRPNHead(
        in_channels,
        channels,
        anchors.num_anchors_per_location()[0],
        heads["rpn_depth"],
        norm,
        act,
        len(backbone.levels),
    )
    box_head = rcnn_box_head(
        in_channels,
        channels,
        heads["box_convs"],
        fc_dim,
        norm,
        _fc_norm(heads["head_norm"], backbone),
        act,
    )
    samples = heads.get("mask_samples_per_image")
    if samples is not None and samples < 1:
        raise ModelError(f"mask_samples_per_image={samples}: expected 1 or more, or None for all")
    model = kind(
        backbone,
        num_classes=None,
        min_size=image_size,
        max_size=image_size,
        rpn_anchor_generator=anchors,
        rpn_head=rpn_head,
        box_roi_pool=PyramidRoIAlign(backbone.levels, output_size=7),
        box_head=box_head,
        box_predictor=FastRCNNPredictor(fc_dim, num_classes),
        **detector_kwargs,
    )
    model = _finish(model, num_classes, class_names, heads["box_convention"])
    if kind is MaskRCNN:
        model.roi_heads.mask_samples_per_image = samples
    return model


@register_task("fasterrcnn", families={"spinenet": None}, runtime=_runtime(FasterRCNN))
def spinenet_fasterrcnn(
    variant: str = "49",
    num_classes: int | None = 91,
    *,
    class_names: Sequence[str] | None = None,
    image_size: int = 640,
    head_norm: str = "bn",
    anchor_size: float | None = None,
    fc_dim: int | None = None,
    head_channels: int | None = None,
    rpn_depth: int = 1,
    rpn_scales: int | None = None,
    box_convs: int = 4,
    box_convention: str = "torchvision",
    **kwargs,
) -> FasterRCNN:
    """Faster R-CNN on SpineNet-``variant`` with no neck, heads laid out as Model Garden's: an
    RPN on P3..P7 (shared convs, a norm per level) and a 4-conv + 1-FC box head, each layer
    normalised (FC 512 for 49S, 1024 otherwise).

    Arguments are those of :func:`spinenet_retinanet`, and:
        fc_dim: box-head FC width.
        head_channels: width of the RPN, box and mask head convs (default: the backbone's
            endpoint width; Model Garden's configs use 256 for every variant).
        rpn_depth: 3x3 convs in the RPN head (Model Garden: 1, or 2 in its cascade configs).
        rpn_scales: RPN anchor scales per location, each with 3 aspect ratios (default 3 for
            143 and 190, else 1).
        box_convs: 3x3 convs in the box head before its FC (Model Garden's ``num_convs``; 0
            pools straight into the FC).
        box_convention: as for :func:`spinenet_retinanet` (the RPN's and box head's coding).
        **kwargs: options of torchvision's ``FasterRCNN`` (``box_score_thresh``,
            ``box_batch_size_per_image``, ``rpn_post_nms_top_n_train``, ...) or of the backbone.
    """
    heads = {
        "head_norm": head_norm, "anchor_size": anchor_size, "fc_dim": fc_dim,
        "head_channels": head_channels, "rpn_depth": rpn_depth, "rpn_scales": rpn_scales,
        "box_convs": box_convs, "box_convention": box_convention,
    }  # fmt: skip
    return _two_stage(FasterRCNN, variant, num_classes, class_names, image_size, heads, kwargs)


@register_task(
    "maskrcnn",
    families={"spinenet": None},
    runtime=_runtime(MaskRCNN) | {"mask_samples_per_image"},
    masks=True,
)
def spinenet_maskrcnn(
    variant: str = "49",
    num_classes: int | None = 91,
    *,
    class_names: Sequence[str] | None = None,
    image_size: int = 640,
    head_norm: str = "bn",
    anchor_size: float | None = None,
    fc_dim: int | None = None,
    head_channels: int | None = None,
    rpn_depth: int = 1,
    rpn_scales: int | None = None,
    box_convs: int = 4,
    mask_convs: int = 4,
    mask_samples_per_image: int | None = None,
    box_convention: str = "torchvision",
    **kwargs,
) -> MaskRCNN:
    """Mask R-CNN on SpineNet-``variant``: the Faster R-CNN of :func:`spinenet_fasterrcnn` plus
    a 4-conv mask head and a normalised 2x transposed conv predicting 28 x 28 masks from
    14 x 14 RoIAlign features. Arguments are those of :func:`spinenet_fasterrcnn`, and:
        mask_convs: the mask head's 3x3 convs (at least 1).
        mask_samples_per_image: in training, a random sample of at most this many of each
            image's positive boxes trains the mask head (Model Garden's ``num_sampled_masks``;
            default: every positive, as torchvision). With 32 positives per image, the mask
            branch's forward took 2/3 of the backbone's in the quickstart on a CPU."""
    heads = {
        "head_norm": head_norm, "anchor_size": anchor_size, "fc_dim": fc_dim,
        "head_channels": head_channels, "rpn_depth": rpn_depth, "rpn_scales": rpn_scales,
        "box_convs": box_convs, "mask_convs": mask_convs, "box_convention": box_convention,
        "mask_samples_per_image": mask_samples_per_image,
    }  # fmt: skip
    return _two_stage(MaskRCNN, variant, num_classes, class_names, image_size, heads, kwargs)
