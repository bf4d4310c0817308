"""A model's fixed-shape part (``spinedet export --dense``): normalisation, backbone, dense heads.

What it computes, for an ``(N, 3, S, S)`` float input:

- a backbone: the input is used as given (already normalised); outputs ``p3``..``p7``.
- a classifier: the same input; outputs ``logits`` (N, classes).
- RetinaNet: the input is an RGB image in [0, 1] resized and padded to ``S x S``; the graph
  normalises it like the model's transform and returns ``cls_logits`` (N, A, classes) and
  ``bbox_regression`` (N, A, 4) over all A anchors of all levels, plus the constant ``anchors``
  (A, 4, xyxy pixels) they refer to.
- Faster / Mask R-CNN: the same input; outputs ``p3``..``p7``, the RPN's ``objectness``
  (N, A, 1) and ``rpn_bbox_regression`` (N, A, 4), and ``anchors``.

Decoding (torchvision's ``BoxCoder`` with weights (1, 1, 1, 1)), score thresholds, NMS, and
the second stage of the R-CNNs are left to the caller; the whole detector is
:class:`~spinedet.export.graph.DetectorGraph`.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import concat_box_prediction_layers

from ..errors import SpinedetError
from ..models import describe

__all__ = ["DenseOutputs", "ExportError"]


class ExportError(SpinedetError):
    """The export failed or the exported model does not match PyTorch."""


class DenseOutputs(nn.Module):
    """A model's fixed-shape part (normalisation, backbone, dense heads) as one module."""

    def __init__(self, model: nn.Module, image_size: int) -> None:
        super().__init__()
        self.image_size = image_size
        try:
            self.description = describe(model)  # for the export's metadata
        except SpinedetError as e:
            raise ExportError(f"cannot export: {e}") from None
        task = self.description.task
        if task in ("backbone", "classifier"):  # the input is used as given (normalised)
            self.kind, self.backbone, self.model = task, getattr(model, "backbone", model), model
            return
        self.backbone = model.backbone
        if task == "retinanet":
            self.kind, self.head, generator = "retinanet", model.head, model.anchor_generator
        else:
            self.kind, self.head, generator = "rcnn", model.rpn.head, model.rpn.anchor_generator
        self.register_buffer("mean", torch.tensor(model.transform.image_mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(model.transform.image_std).view(1, 3, 1, 1))
        self.register_buffer("anchors", _anchors(generator, self.backbone.levels, image_size))

    @property
    def output_names(self) -> list[str]:
        levels = [f"p{lvl}" for lvl in self.backbone.levels]
        if self.kind == "backbone":
            return levels
        if self.kind == "classifier":
            return ["logits"]
        if self.kind == "retinanet":
            return ["cls_logits", "bbox_regression", "anchors"]
        return [*levels, "objectness", "rpn_bbox_regression", "anchors"]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.kind == "backbone":
            return tuple(self.backbone(images).values())
        if self.kind == "classifier":
            return (self.model(images),)
        features = list(self.backbone((images - self.mean) / self.std).values())
        n = images.shape[0]
        if self.kind == "retinanet":
            out = self.head(features)
            return out["cls_logits"], out["bbox_regression"], self.anchors
        objectness, deltas = concat_box_prediction_layers(*self.head(features))
        return *features, objectness.view(n, -1, 1), deltas.view(n, -1, 4), self.anchors


@torch.no_grad()
def _anchors(generator: nn.Module, levels: list[int], image_size: int) -> torch.Tensor:
    """The generator's anchors for one ``image_size`` square image (the same for every image)."""
    sizes = [math.ceil(image_size / 2**lvl) for lvl in levels]
    features = [torch.zeros(1, 1, s, s) for s in sizes]
    images = ImageList(torch.zeros(1, 3, image_size, image_size), [(image_size, image_size)])
    return generator(images, features)[0]
