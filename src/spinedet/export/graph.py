"""The whole detector as one traceable module: images in, fixed-size detections out.

torchvision's detectors take lists of images and return lists of dicts whose lengths depend
on the data; :class:`DetectorGraph` runs the same layers and the same post-processing on a
batch tensor and pads every image's detections to the model's ``K`` detections per image, so
``torch.jit.trace`` records it once for any batch and image size (the TorchScript-based ONNX
exporter reads the same trace). Each step mirrors torchvision's eval path; where that path
loops over images or levels with data-dependent lengths, the whole batch is processed at once
(images are NMS groups of their own), which selects the same detections.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import _topk_min
from torchvision.models.detection.rpn import concat_box_prediction_layers

from ..models import describe, detection_selection
from ..models.pixel_boxes import PixelBoxTransform
from ..models.postprocess import (
    class_candidates,
    clip_to,
    gather_rows,
    paste_masks,
    retinanet_candidates,
    select_detections,
)
from ..models.registry import TASKS

__all__ = ["DetectorGraph"]


class DetectorGraph(nn.Module):
    """A RetinaNet, Faster or Mask R-CNN with its pre- and post-processing, tensors only.

    Input ``images``: (N, 3, H, W) RGB, ``uint8`` (0..255) or, with ``dtype=torch.float32``,
    float in [0, 1]; any N, H and W. The images are used at the size given (the model's own
    transform would resize the longer side to ``image_size``: resize before, as
    ``spinedet.Predictor`` does), normalised, and zero-padded to a multiple of 32 as
    torchvision batches them.

    Outputs, ``K`` = the model's detections per image, best first, padding after the
    ``num_detections`` real ones: ``boxes`` (N, K, 4) float xyxy in input pixels (0 in
    padding), ``scores`` (N, K) (0), ``labels`` (N, K) int64 category ids of the data set
    (-1), ``num_detections`` (N,) int64, and for Mask R-CNN ``masks`` (N, K, H, W) uint8,
    1 where the pasted mask probability is above 0.5.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.uint8) -> None:
        super().__init__()
        description = describe(model)
        self.task = description.task
        self.with_masks = TASKS[self.task].masks
        self.model = model
        self.dtype = dtype
        transform = model.transform
        self.register_buffer("mean", torch.tensor(transform.image_mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(transform.image_std).view(1, 3, 1, 1))
        self.size_divisible = transform.size_divisible
        # tensorflow/tpu's convention (models.pixel_boxes): boxes clip to the last pixel, and
        # its selection keeps boxes without area but never all-zero ones.
        self.pixel_boxes = isinstance(transform, PixelBoxTransform)
        table = [-1] * description.num_classes
        for label, category in description.label_to_category_id().items():
            table[label] = category
        self.register_buffer("category_ids", torch.tensor(table))
        self.max_detections = int(detection_selection(model).detections_per_img)

    @property
    def output_names(self) -> list[str]:
        names = ["boxes", "scores", "labels", "num_detections"]
        return [*names, "masks"] if self.with_masks else names

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = images.float()
        if images.dtype == torch.uint8:
            x = x / 255
        x = (x - self.mean) / self.std
        height, width = images.shape[-2:]
        d = self.size_divisible
        x = F.pad(x, (0, (-width) % d, 0, (-height) % d))
        features = list(self.model.backbone(x).values())
        # (w, h, w, h) of the unpadded images, a tensor even while tracing: boxes clip to it.
        limits = torch._shape_as_tensor(images)[2:].flip(0).repeat(2).to(x.dtype)
        limits = limits - float(self.pixel_boxes)
        if self.task == "retinanet":
            boxes, scores, labels, found = self._retinanet(features, limits)
        else:
            boxes, scores, labels, found = self._rcnn(features, limits)
        outputs = (
            torch.where(found[..., None], boxes, 0),
            torch.where(found, scores, 0),
            torch.where(found, self.category_ids[labels], -1),
            found.sum(1),
        )
        if not self.with_masks:
            return outputs
        masks = self._masks(features, boxes, labels, height, width)
        return *outputs, (masks & found[..., None, None]).to(torch.uint8)

    def _retinanet(self, features: list[torch.Tensor], limits: torch.Tensor) -> tuple:
        """torchvision's ``RetinaNet.postprocess_detections``: per level the top candidates
        above the score threshold, decoded and clipped, then class-wise NMS."""
        model = self.model
        logits = model.head.classification_head(features)  # (N, A, C)
        deltas = model.head.regression_head(features)  # (N, A, 4)
        anchors = model.anchor_generator.pyramid_anchors(
            [f.shape[-2:] for f in features], logits.dtype, logits.device
        )
        per_location = model.anchor_generator.num_anchors_per_location()[0]
        classes = logits.shape[-1]
        levels, start = [], 0
        for feature in features:
            end = start + feature.shape[-2] * feature.shape[-1] * per_location
            levels.append((logits[:, start:end], deltas[:, start:end], anchors[start:end]))
            start = end
        boxes, scores, labels = retinanet_candidates(
            levels, model.box_coder, model.topk_candidates, limits
        )
        keep = (scores > model.score_thresh) & model.selectable(boxes)
        index, found = select_detections(
            boxes, scores, labels, keep, classes, model.nms_thresh, self.max_detections
        )
        return *gather_rows(index, boxes, scores, labels), found

    def _proposals(
        self, features: list[torch.Tensor], limits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """torchvision's ``RegionProposalNetwork`` at inference: (N, R, 4) proposals, R its
        post-NMS count, and which of them exist."""
        rpn = self.model.rpn
        objectness, deltas = concat_box_prediction_layers(*rpn.head(features))
        n = features[0].shape[0]
        anchors = rpn.anchor_generator.pyramid_anchors(
            [f.shape[-2:] for f in features], deltas.dtype, deltas.device
        )
        proposals = rpn.box_coder.decode_single(deltas, anchors.repeat(n, 1)).reshape(n, -1, 4)
        objectness = objectness.reshape(n, -1)
        per_location = rpn.anchor_generator.num_anchors_per_location()[0]
        boxes, scores, levels = [], [], []
        start = 0
        for i, feature in enumerate(features):
            end = start + feature.shape[-2] * feature.shape[-1] * per_location
            level = objectness[:, start:end]
            top, index = level.topk(_topk_min(level, rpn.pre_nms_top_n(), 1), dim=1)
            boxes.append(proposals[:, start:end].gather(1, index[..., None].expand(-1, -1, 4)))
            scores.append(top.sigmoid())
            levels.append(torch.full_like(index, i))
            start = end
        boxes = clip_to(torch.cat(boxes, 1), limits)
        scores, levels = torch.cat(scores, 1), torch.cat(levels, 1)
        keep = rpn.selectable(boxes) & (scores >= rpn.score_thresh)
        index, found = select_detections(
            boxes, scores, levels, keep, len(features), rpn.nms_thresh, rpn.post_nms_top_n()
        )
        (boxes,) = gather_rows(index, boxes)
        if self.pixel_boxes:  # PixelBoxRPN pads with all-zero proposals, which the head sees
            return boxes * found[..., None], torch.ones_like(found)
        return boxes, found

    def _rcnn(self, features: list[torch.Tensor], limits: torch.Tensor) -> tuple:
        """torchvision's ``RoIHeads.postprocess_detections`` on the proposals: per-class boxes
        and softmax scores, background dropped, thresholds, class-wise NMS."""
        heads = self.model.roi_heads
        proposals, proposed = self._proposals(features, limits)
        n = proposals.shape[0]
        crops = heads.box_roi_pool.pool_every_level(self._feature_map(features), _rois(proposals))
        logits, regression = heads.box_predictor(heads.box_head(crops))
        classes = logits.shape[-1]
        boxes, scores, labels = class_candidates(
            logits, regression, proposals, limits.reshape(1, 1, 4), heads.box_coder
        )
        proposed = proposed[..., None].expand(-1, -1, classes - 1).reshape(n, -1)
        keep = (scores > heads.score_thresh) & heads.selectable(boxes) & proposed
        index, found = select_detections(
            boxes, scores, labels, keep, classes, heads.nms_thresh, self.max_detections
        )
        return *gather_rows(index, boxes, scores, labels), found

    def _masks(
        self,
        features: list[torch.Tensor],
        boxes: torch.Tensor,
        labels: torch.Tensor,
        height: int,
        width: int,
    ) -> torch.Tensor:
        """torchvision's mask branch on the detections and ``paste_masks_in_image``,
        thresholded at 0.5: (N, K, H, W) bool."""
        heads = self.model.roi_heads
        n, k = boxes.shape[0], boxes.shape[1]
        crops = heads.mask_roi_pool.pool_every_level(self._feature_map(features), _rois(boxes))
        logits = heads.mask_predictor(heads.mask_head(crops))  # (N * K, classes, M, M)
        size = logits.shape[-1]
        index = labels.reshape(-1, 1, 1, 1).expand(-1, 1, size, size)
        probs = logits.gather(1, index)[:, 0].sigmoid()
        masks = paste_masks(probs, boxes.reshape(-1, 4), height, width)
        return (masks > 0.5).reshape(n, k, masks.shape[-2], masks.shape[-1])

    def _feature_map(self, features: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {f"p{lvl}": f for lvl, f in zip(self.model.backbone.levels, features, strict=True)}


def _rois(boxes: torch.Tensor) -> torch.Tensor:
    """(N, R, 4) boxes as (N * R, 5) RoIAlign rois led by their image index."""
    n, r = boxes.shape[0], boxes.shape[1]
    image = torch.arange(n, device=boxes.device, dtype=boxes.dtype)[:, None, None]
    return torch.cat([image.expand(n, r, 1), boxes], 2).reshape(-1, 5)
