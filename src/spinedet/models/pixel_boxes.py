"""tensorflow/tpu's box convention, for detectors converted from its model zoo.

tensorflow/tpu (``models/official/detection/utils/box_utils.py``) treats a box's corners as
pixel indices: a box from ``x1`` to ``x2`` is ``x2 - x1 + 1`` wide, box coding measures
anchors and proposals that way, a decoded box ends at ``start + width - 1``, and boxes are
clipped to the last pixel, ``size - 1``. torchvision and Model Garden take corners as
continuous coordinates (``x2 - x1`` wide, clipped to ``size``). A zoo checkpoint's detections
(and its published AP) are those of its own decoding: decoded the torchvision way, every box
would be about a pixel off (4% of a P3 anchor of 24 pixels).

In this convention a box whose corners coincide is one pixel wide, not empty: tensorflow/tpu's
two-stage inference (``ops/roi_ops.py``, ``ops/postprocess_ops.py``) keeps proposals and
detections that clipping squeezed onto the image's last row or column, where torchvision drops
boxes under 1e-3 (proposals) or 1e-2 (detections) of continuous width. A zoo Mask R-CNN's
detections from such proposals are real boxes after decoding, and without them other proposals
take their places among the 1000, so :class:`PixelBoxRPN` and :class:`PixelBoxRoIHeads` select
as tensorflow/tpu does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import clip_boxes_to_image

from .host_data import DeviceBoxCoder, device_tensor
from .postprocess import DetectionTransform, nms_by_group
from .rcnn import BatchedRoIHeads, BatchedRPN

__all__ = [
    "BOX_CONVENTIONS",
    "corner_boxes",
    "PixelBoxCoder",
    "PixelBoxRPN",
    "PixelBoxRoIHeads",
    "PixelBoxTransform",
    "use_pixel_boxes",
]

# ``box_convention`` values of the detector builders.
BOX_CONVENTIONS = ("torchvision", "tpu")


def _shift_ends(boxes: Tensor, delta: float) -> Tensor:
    """(..., 4k) boxes with every box's far corner (x1, y1) moved by ``delta``."""
    # Sizes spelled out: unflatten does not export to ONNX, -1 is ambiguous for no boxes.
    corners = boxes.reshape(*boxes.shape[:-1], boxes.shape[-1] // 4, 4)
    return torch.cat([corners[..., :2], corners[..., 2:] + delta], -1).reshape(boxes.shape)


def _extent(boxes: Tensor) -> Tensor:
    """Pixel-index corners -> continuous ones: the box ends after its last pixel."""
    return _shift_ends(boxes, 1.0)


class PixelBoxCoder(DeviceBoxCoder):
    """torchvision's box coder on pixel-index boxes: tensorflow/tpu's ``encode_boxes`` and
    ``decode_boxes`` (same weights and clip of the size deltas)."""

    def encode_single(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        return super().encode_single(_extent(reference_boxes), _extent(proposals))

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        decoded = super().decode_single(rel_codes, _extent(boxes.to(rel_codes.dtype)))
        return _shift_ends(decoded, -1.0)  # each class's box ends on its last pixel


class PixelBoxTransform(DetectionTransform):
    """torchvision's detector transform, with boxes clipped to the last pixel: the detectors
    clip to the ``image_sizes`` the transform reports, so it reports each image one pixel
    smaller, and restores the sizes before mapping detections back to the input image."""

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[ImageList, list[dict[str, Tensor]] | None]:
        image_list, targets = super().forward(images, targets)
        image_list.image_sizes = [(h - 1, w - 1) for h, w in image_list.image_sizes]
        return image_list, targets

    def postprocess(
        self,
        result: list[dict[str, Tensor]],
        image_shapes: list[tuple[int, int]],
        original_image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        sizes = [(h + 1, w + 1) for h, w in image_shapes]
        return super().postprocess(result, sizes, original_image_sizes)


def corner_boxes(boxes: Tensor) -> Tensor:
    """Which boxes are all zero (clipped to the image's top-left pixel): padding to
    tensorflow/tpu's NMS (its own and TensorFlow's ``non_max_suppression_padded``), which
    never selects them."""
    return boxes.eq(0).all(-1)


def _descending(scores: Tensor) -> Tensor:
    """Indices sorting ``scores`` high to low, equal scores in index order (TF's ``top_k``)."""
    return scores.sort(descending=True, stable=True).indices


class PixelBoxRPN(BatchedRPN):
    """torchvision's RPN choosing proposals as tensorflow/tpu's ``ROIGenerator``: per level the
    top ``pre_nms_top_n`` probabilities, clipped, NMS per level, then the top
    ``post_nms_top_n`` of all levels. Unlike torchvision it keeps boxes without continuous
    area (one pixel wide here); its padded NMS never selects an all-zero box (clipped to the
    top-left corner) and pads with all-zero boxes when fewer than ``post_nms_top_n``
    survive."""

    def filter_proposals(
        self,
        proposals: Tensor,
        objectness: Tensor,
        image_shapes: list[tuple[int, int]],
        num_anchors_per_level: list[int],
    ) -> tuple[list[Tensor], list[Tensor]]:
        probs = torch.sigmoid(objectness.detach().reshape(len(proposals), -1))
        counts = device_tensor(num_anchors_per_level, probs.device)
        total = sum(num_anchors_per_level)  # known here: repeat_interleave would read it back
        levels = torch.repeat_interleave(
            torch.arange(len(counts), device=probs.device), counts, output_size=total
        )
        per_level = torch.arange(total, device=probs.device).split(num_anchors_per_level)
        size = self.post_nms_top_n()
        all_boxes, all_scores = [], []
        for boxes, scores, shape in zip(proposals, probs, image_shapes, strict=True):
            boxes = clip_boxes_to_image(boxes, shape)
            keep = torch.cat(
                [level[_descending(scores[level])[: self.pre_nms_top_n()]] for level in per_level]
            )
            keep = keep[self.selectable(boxes[keep])]
            keep = keep[nms_by_group(boxes[keep], scores[keep], levels[keep], self.nms_thresh)]
            keep = keep[_descending(scores[keep])[:size]]
            pad = size - len(keep)
            all_boxes.append(F.pad(boxes[keep], (0, 0, 0, pad)))
            all_scores.append(F.pad(scores[keep], (0, pad), value=-1.0))
        return all_boxes, all_scores

    def selectable(self, boxes: Tensor) -> Tensor:
        return ~corner_boxes(boxes)


class PixelBoxRoIHeads(BatchedRoIHeads):
    """torchvision's R-CNN heads whose detections are tensorflow/tpu's
    ``GenericDetectionGenerator``'s: softmax, background dropped, boxes decoded per class and
    clipped, scores over ``score_thresh``, NMS per class, the best ``detections_per_img``;
    boxes without continuous area are kept (torchvision drops those under 1e-2), all-zero
    boxes never (TensorFlow's ``non_max_suppression_padded`` takes them for padding)."""

    def selectable(self, boxes: Tensor) -> Tensor:
        return ~corner_boxes(boxes)


def use_pixel_boxes(model: nn.Module) -> None:
    """Give a torchvision RetinaNet, Faster or Mask R-CNN tensorflow/tpu's box convention: its
    transform and every box coder (the detector's or RPN's and box head's, and the RetinaNet
    regression head's, which encodes the training targets), and an R-CNN its proposal and
    detection selection (:class:`PixelBoxRPN`, :class:`PixelBoxRoIHeads`)."""
    # The subclasses add no state, only selection rules: the built modules change class.
    for name, cls in [("rpn", PixelBoxRPN), ("roi_heads", PixelBoxRoIHeads)]:
        module = getattr(model, name, None)
        if module is not None:
            module.__class__ = cls
    t = model.transform
    model.transform = PixelBoxTransform(
        t.min_size, t.max_size, t.image_mean, t.image_std, t.size_divisible, t.fixed_size
    )
    for module in model.modules():
        coder = getattr(module, "box_coder", None)
        if isinstance(coder, BoxCoder):
            module.box_coder = PixelBoxCoder(coder.weights, coder.bbox_xform_clip)
