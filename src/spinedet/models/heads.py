"""Pieces torchvision's detectors need adapted to SpineNet: exact-stride anchors, deeper
RetinaNet towers with a configurable focal loss."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import (
    RetinaNetClassificationHead,
    RetinaNetHead,
    RetinaNetRegressionHead,
)
from torchvision.ops import sigmoid_focal_loss
from torchvision.ops.misc import Conv2dNormActivation


def pyramid_anchors(
    levels: Sequence[int], anchor_size: float, num_scales: int, aspect_ratios: Sequence[float]
) -> PyramidAnchorGenerator:
    """Anchors of side ``anchor_size * 2**level * 2**(i / num_scales)`` on each level."""
    sizes = tuple(
        tuple(anchor_size * 2**level * 2 ** (i / num_scales) for i in range(num_scales))
        for level in levels
    )
    return PyramidAnchorGenerator(
        [2**level for level in levels], sizes, (tuple(aspect_ratios),) * len(levels)
    )


class PyramidAnchorGenerator(AnchorGenerator):
    """AnchorGenerator with the true stride ``2**level`` of each feature map.

    torchvision derives strides as ``padded_image_size // feature_size``, which is wrong when the
    image is not a multiple of the coarsest stride (SpineNet level sizes are ``ceil(H / 2**l)``).
    """

    def __init__(
        self,
        strides: Sequence[int],
        sizes: Sequence[Sequence[float]],
        aspect_ratios: Sequence[Sequence[float]],
    ) -> None:
        super().__init__(tuple(map(tuple, sizes)), tuple(map(tuple, aspect_ratios)))
        self.strides = list(strides)

    def forward(
        self, image_list: ImageList, feature_maps: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        device = feature_maps[0].device
        grid_sizes = [f.shape[-2:] for f in feature_maps]
        strides = [[torch.tensor(s, device=device)] * 2 for s in self.strides]
        self.set_cell_anchors(feature_maps[0].dtype, device)
        anchors = torch.cat(self.grid_anchors(grid_sizes, strides))
        return [anchors] * len(image_list.image_sizes)


def conv_tower(
    channels: int,
    depth: int,
    norm_layer: Callable[[int], nn.Module],
    activation: Callable[..., nn.Module],
) -> nn.Sequential:
    """``depth`` 3x3 conv + norm + activation layers, initialised like RetinaNet's."""
    tower = nn.Sequential(
        *(
            Conv2dNormActivation(
                channels, channels, norm_layer=norm_layer, activation_layer=activation
            )
            for _ in range(depth)
        )
    )
    for m in tower.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=0.01)
    return tower


class FocalClassificationHead(RetinaNetClassificationHead):
    """RetinaNet classification head with ``depth`` convs and focal ``alpha``/``gamma``."""

    def __init__(
        self,
        channels: int,
        num_anchors: int,
        num_classes: int,
        depth: int,
        norm_layer: Callable[[int], nn.Module],
        activation: Callable[..., nn.Module],
        alpha: float = 0.25,
        gamma: float = 1.5,
    ) -> None:
        super().__init__(channels, num_anchors, num_classes, norm_layer=norm_layer)
        self.conv = conv_tower(channels, depth, norm_layer, activation)
        self.alpha, self.gamma = alpha, gamma

    def compute_loss(
        self,
        targets: list[dict[str, torch.Tensor]],
        head_outputs: dict[str, torch.Tensor],
        matched_idxs: list[torch.Tensor],
    ) -> torch.Tensor:
        losses = []
        for target, logits, matched in zip(
            targets, head_outputs["cls_logits"], matched_idxs, strict=True
        ):
            foreground = matched >= 0
            gt = torch.zeros_like(logits)
            gt[foreground, target["labels"][matched[foreground]]] = 1.0
            valid = matched != Matcher.BETWEEN_THRESHOLDS
            loss = sigmoid_focal_loss(
                logits[valid], gt[valid], self.alpha, self.gamma, reduction="sum"
            )
            losses.append(loss / foreground.sum().clamp(min=1))
        return torch.stack(losses).mean()


def retinanet_head(
    channels: int,
    num_anchors: int,
    num_classes: int,
    depth: int,
    norm_layer: Callable[[int], nn.Module],
    activation: Callable[..., nn.Module],
    focal_alpha: float,
    focal_gamma: float,
) -> RetinaNetHead:
    """torchvision's RetinaNetHead with SpineNet's tower depth, norm and focal loss."""
    head = RetinaNetHead(channels, num_anchors, num_classes, norm_layer=norm_layer)
    head.classification_head = FocalClassificationHead(
        channels, num_anchors, num_classes, depth, norm_layer, activation, focal_alpha, focal_gamma
    )
    regression: RetinaNetRegressionHead = head.regression_head
    regression.conv = conv_tower(channels, depth, norm_layer, activation)
    regression._loss_type = "smooth_l1"
    return head
