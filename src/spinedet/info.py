"""Model summaries: parameters, multiply-adds and output pyramid of registered models."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.detection.roi_heads import RoIHeads

from .models import create_model, describe

__all__ = ["count_params", "count_macs", "model_info"]


def count_params(module: nn.Module) -> int:
    """Number of parameters (excluding buffers such as BN statistics)."""
    return sum(p.numel() for p in module.parameters())


def _backbone(model: nn.Module) -> nn.Module:
    """The SpineNet of a detector, or the model itself when it is a backbone."""
    return model if describe(model).task == "backbone" else model.backbone


def _roi_macs(roi: RoIHeads, features: dict, image_size: int, num_boxes: int, masks: bool) -> None:
    """Run the second-stage heads on ``num_boxes`` fixed boxes (the test-time proposal count),
    so the count does not depend on how many detections random weights produce."""
    side = torch.linspace(0, image_size * 0.75, num_boxes)
    boxes = [torch.stack([side, side, side + image_size / 4, side + image_size / 4], dim=1)]
    sizes = [(image_size, image_size)]
    roi.box_predictor(roi.box_head(roi.box_roi_pool(features, boxes, sizes)))
    if masks and roi.has_mask():
        detections = [boxes[0][: roi.detections_per_img]]
        roi.mask_predictor(roi.mask_head(roi.mask_roi_pool(features, detections, sizes)))


@torch.no_grad()
def count_macs(model: nn.Module, image_size: int = 640) -> int:
    """Multiply-adds of one ``image_size`` x ``image_size`` image, as the SpineNet paper counts.

    Detector counts cover the backbone and heads and exclude post-processing (decoding, NMS);
    two-stage detectors are counted at their test-time proposal and detection numbers.
    """
    was_training = model.training
    model.eval()
    x = torch.zeros(1, 3, image_size, image_size)
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            task = describe(model).task
            if task == "classifier":  # the whole network: backbone, level sum, linear layer
                model(x)
                features = {}
            else:
                features = _backbone(model)(x)
            if task == "retinanet":
                model.head(list(features.values()))
            elif task in ("fasterrcnn", "maskrcnn"):
                model.rpn.head(list(features.values()))
                proposals = model.rpn._post_nms_top_n["testing"]
                _roi_macs(model.roi_heads, features, image_size, proposals, masks=True)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2  # the counter counts a multiply-add as 2 FLOPs


def model_info(name: str, image_size: int = 640, num_classes: int | None = None) -> dict:
    """Summary of a registered model: parameters (total, backbone), GFLOPs (multiply-adds) at
    ``image_size``, and the output levels with their strides and channels."""
    model = create_model(name, num_classes=num_classes)
    backbone = _backbone(model)
    return {
        "model": name,
        "image_size": image_size,
        "num_classes": getattr(model, "num_classes", None),
        "params": count_params(model),
        "backbone_params": count_params(backbone),
        "gflops": round(count_macs(model, image_size) / 1e9, 2),
        "levels": [
            {"level": lvl, "name": f"p{lvl}", "stride": 2**lvl, "channels": backbone.out_channels}
            for lvl in backbone.levels
        ],
    }
