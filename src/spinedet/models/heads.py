"""Pieces torchvision's detectors need adapted to SpineNet: exact-stride anchors, deeper
RetinaNet towers with a configurable focal loss, and R-CNN heads laid out like Model Garden's
(a norm per pyramid level in the RPN, normalised FC and upsampling in the box and mask heads)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import partial
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.retinanet import (
    RetinaNetClassificationHead,
    RetinaNetHead,
    RetinaNetRegressionHead,
)
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign, roi_align, sigmoid_focal_loss
from torchvision.ops.misc import Conv2dNormActivation

from .host_data import device_tensor
from .separable_roi_align import separable_pays, separable_roi_align


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
    """AnchorGenerator with the true stride ``2**level`` of each feature map, centring anchors
    on their cells at ``(i + 0.5) * stride`` with unrounded corners, like Model Garden.

    torchvision derives strides as ``padded_image_size // feature_size``, which is wrong when the
    image is not a multiple of the coarsest stride (SpineNet level sizes are ``ceil(H / 2**l)``).
    Anchors depend only on the feature sizes, so they are computed once per input shape.
    """

    def __init__(
        self,
        strides: Sequence[int],
        sizes: Sequence[Sequence[float]],
        aspect_ratios: Sequence[Sequence[float]],
    ) -> None:
        super().__init__(tuple(map(tuple, sizes)), tuple(map(tuple, aspect_ratios)))
        self.strides = list(strides)
        self._cache: dict[tuple, torch.Tensor] = {}

    def generate_anchors(
        self,
        scales: list[int],
        aspect_ratios: list[float],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        # torchvision rounds anchor corners to whole pixels; Model Garden keeps them exact.
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        h_ratios = torch.as_tensor(aspect_ratios, dtype=dtype, device=device).sqrt()
        ws = (scales[None, :] / h_ratios[:, None]).view(-1)
        hs = (scales[None, :] * h_ratios[:, None]).view(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2

    def forward(
        self, image_list: ImageList, feature_maps: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        grid_sizes = [tuple(f.shape[-2:]) for f in feature_maps]
        key = (tuple(grid_sizes), dtype, device)
        anchors = self._cache.get(key)
        if anchors is None:
            anchors = self.pyramid_anchors(grid_sizes, dtype, device)
            self._cache = {key: anchors}  # one shape at a time: fixed-size inputs hit every call
        return [anchors] * len(image_list.image_sizes)

    def pyramid_anchors(
        self, grid_sizes: Sequence[Sequence[int]], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """The (A, 4) xyxy anchors of feature maps of ``grid_sizes`` (level, then y, x, anchor),
        uncached: traced sizes stay symbolic (export)."""
        strides = [[torch.tensor(s, device=device)] * 2 for s in self.strides]
        self.set_cell_anchors(dtype, device)
        per_level = self.grid_anchors([list(g) for g in grid_sizes], strides)
        return torch.cat([a + s / 2 for a, s in zip(per_level, self.strides, strict=True)])


def separable_conv(in_channels: int, out_channels: int, bias: bool = True) -> nn.Sequential:
    """A 3x3 depthwise then 1x1 pointwise convolution, as Keras' ``SeparableConv2D`` (the
    SpineNet-Mobile RetinaNet head's convs)."""
    return nn.Sequential(
        OrderedDict(
            depthwise=nn.Conv2d(
                in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False
            ),
            pointwise=nn.Conv2d(in_channels, out_channels, 1, bias=bias),
        )
    )


class LevelConvNormAct(nn.Sequential):
    """A 3x3 conv shared by all pyramid levels, a norm per level, and an activation.

    Model Garden's RetinaNet head shares the tower convs across levels but keeps a separate
    BatchNorm per level (feature statistics differ between P3 and P7).
    """

    def __init__(
        self,
        channels: int,
        num_levels: int,
        norm_layer: Callable[[int], nn.Module],
        activation: Callable[..., nn.Module],
        in_channels: int | None = None,
        separable: bool = False,
    ) -> None:
        norms = nn.ModuleList(norm_layer(channels) for _ in range(num_levels))
        if separable:
            conv = separable_conv(in_channels or channels, channels, bias=False)
        else:
            conv = nn.Conv2d(in_channels or channels, channels, 3, padding=1, bias=False)
        super().__init__(conv, norms, activation())

    def forward(self, x: torch.Tensor, level: int = 0) -> torch.Tensor:
        conv, norms, act = self
        return act(norms[level](conv(x)))


def conv_tower(
    channels: int,
    depth: int,
    norm_layer: Callable[[int], nn.Module],
    activation: Callable[..., nn.Module],
    num_levels: int | None = None,
    in_channels: int | None = None,
    init_std: float | None = 0.01,
    separable: bool = False,
) -> nn.Sequential:
    """``depth`` 3x3 conv + norm + activation layers (the first taking ``in_channels``).

    With ``num_levels`` each layer has one norm per level (:class:`LevelConvNormAct`, whose
    convs may be ``separable``); the tower is then applied with :func:`apply_tower`. Convs are
    initialised like RetinaNet's (normal, ``init_std``), or He fan-out like Model Garden's
    R-CNN heads when it is None.
    """
    ins = ([in_channels or channels] + [channels] * (depth - 1))[:depth]
    if num_levels is None:
        layers = [
            Conv2dNormActivation(c, channels, norm_layer=norm_layer, activation_layer=activation)
            for c in ins
        ]
    else:
        layers = [
            LevelConvNormAct(channels, num_levels, norm_layer, activation, c, separable)
            for c in ins
        ]
    tower = nn.Sequential(*layers)
    for m in tower.modules():
        if isinstance(m, nn.Conv2d):
            if init_std is None:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            else:
                nn.init.normal_(m.weight, std=init_std)
    return tower


def apply_tower(tower: nn.Sequential, x: torch.Tensor, level: int) -> torch.Tensor:
    """Run a tower on the features of pyramid level index ``level`` (0 = finest)."""
    for layer in tower:
        x = layer(x, level) if isinstance(layer, LevelConvNormAct) else layer(x)
    return x


def _per_anchor(outs: list[torch.Tensor], size: int) -> torch.Tensor:
    """Per-level (N, A * size, H, W) maps -> (N, sum(H * W) * A, size), torchvision's anchor
    order (level, then y, x, anchor). Concatenating the flattened maps first makes one copy
    where permuting each level makes one per level."""
    n = outs[0].shape[0]
    flat = torch.cat([o.flatten(2) for o in outs], dim=2)  # (N, A * size, sum(H * W))
    return flat.view(n, -1, size, flat.shape[-1]).permute(0, 3, 1, 2).reshape(n, -1, size)


def _per_anchor_targets(
    targets: list[dict[str, torch.Tensor]],
    matched_idxs: list[torch.Tensor],
    key: str,
    filler: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(matched, values)``: the matched-target indices of every image's anchors stacked to
    (N, A), and ``targets[i][key]`` of each anchor's matched target, stacked to (N, A, ...);
    anchors without a target (index < 0) get ``filler``.

    One gather over the batch's concatenated targets replaces a boolean selection per image,
    which waits for the device to count the selected anchors.
    """
    matched = torch.stack(matched_idxs)
    values = [t[key] for t in targets]
    starts = [0, *accumulate(len(v) for v in values)]
    pool = torch.cat([*values, filler[None].to(values[0].dtype)])
    offsets = device_tensor(starts[:-1], matched.device)[:, None]
    index = torch.where(matched >= 0, matched + offsets, starts[-1])
    return matched, pool[index]


def _separable_like(conv: nn.Conv2d) -> nn.Sequential:
    """A separable replacement for a 3x3 predictor conv, keeping its init (e.g. the prior
    probability bias of the class logits)."""
    sep = separable_conv(conv.in_channels, conv.out_channels)
    for m in sep:
        nn.init.normal_(m.weight, std=0.01)
    with torch.no_grad():
        sep.pointwise.bias.copy_(conv.bias)
    return sep


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
        num_levels: int | None = None,
        separable: bool = False,
    ) -> None:
        super().__init__(channels, num_anchors, num_classes, norm_layer=norm_layer)
        self.conv = conv_tower(
            channels, depth, norm_layer, activation, num_levels, separable=separable
        )
        if separable:
            self.cls_logits = _separable_like(self.cls_logits)
        self.alpha, self.gamma = alpha, gamma

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        outs = [self.cls_logits(apply_tower(self.conv, f, i)) for i, f in enumerate(x)]
        return _per_anchor(outs, self.num_classes)

    def compute_loss(
        self,
        targets: list[dict[str, torch.Tensor]],
        head_outputs: dict[str, torch.Tensor],
        matched_idxs: list[torch.Tensor],
    ) -> torch.Tensor:
        """Focal loss summed over each image's anchors that are not between the matching
        thresholds, over its number of foreground anchors (at least 1); mean over images.
        Computed for the whole batch at once."""
        logits = head_outputs["cls_logits"]
        filler = torch.zeros((), dtype=torch.int64, device=logits.device)
        matched, labels = _per_anchor_targets(targets, matched_idxs, "labels", filler)
        foreground = matched >= 0
        gt = torch.zeros_like(logits).scatter_(
            2, labels[..., None], foreground[..., None].to(logits.dtype)
        )
        loss = sigmoid_focal_loss(logits, gt, self.alpha, self.gamma, reduction="none")
        valid = (matched != Matcher.BETWEEN_THRESHOLDS)[..., None]
        per_image = torch.where(valid, loss, 0).sum(dim=(1, 2))
        return (per_image / foreground.sum(1).clamp(min=1)).mean()


class TowerRegressionHead(RetinaNetRegressionHead):
    """RetinaNet box head with a ``depth``-conv tower (optionally a norm per level)."""

    def __init__(
        self,
        channels: int,
        num_anchors: int,
        depth: int,
        norm_layer: Callable[[int], nn.Module],
        activation: Callable[..., nn.Module],
        num_levels: int | None = None,
        separable: bool = False,
    ) -> None:
        super().__init__(channels, num_anchors, norm_layer=norm_layer)
        self.conv = conv_tower(
            channels, depth, norm_layer, activation, num_levels, separable=separable
        )
        if separable:
            self.bbox_reg = _separable_like(self.bbox_reg)
        self._loss_type = "smooth_l1"

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        return _per_anchor(
            [self.bbox_reg(apply_tower(self.conv, f, i)) for i, f in enumerate(x)], 4
        )

    def compute_loss(
        self,
        targets: list[dict[str, torch.Tensor]],
        head_outputs: dict[str, torch.Tensor],
        anchors: list[torch.Tensor],
        matched_idxs: list[torch.Tensor],
    ) -> torch.Tensor:
        """torchvision's smooth-L1 box loss (summed over each image's foreground anchors, over
        their number, mean over images), computed for the whole batch at once."""
        if self._loss_type != "smooth_l1":
            return super().compute_loss(targets, head_outputs, anchors, matched_idxs)
        regression = head_outputs["bbox_regression"]
        # Anchors without a target are encoded against a unit box (finite, then masked out).
        unit = device_tensor([0.0, 0.0, 1.0, 1.0], regression.device)
        matched, boxes = _per_anchor_targets(targets, matched_idxs, "boxes", unit)
        n, a = matched.shape
        target_regression = self.box_coder.encode_single(
            boxes.view(-1, 4), torch.stack(anchors).view(-1, 4)
        ).view(n, a, 4)
        loss = F.smooth_l1_loss(regression, target_regression, reduction="none", beta=1.0)
        foreground = matched >= 0
        per_image = torch.where(foreground[..., None], loss, 0).sum(dim=(1, 2))
        return (per_image / foreground.sum(1).clamp(min=1)).mean()


def retinanet_head(
    channels: int,
    num_anchors: int,
    num_classes: int,
    depth: int,
    norm_layer: Callable[[int], nn.Module],
    activation: Callable[..., nn.Module],
    focal_alpha: float,
    focal_gamma: float,
    num_levels: int | None = 5,
    separable: bool = False,
) -> RetinaNetHead:
    """torchvision's RetinaNetHead with SpineNet's tower depth, norm and focal loss.

    The tower convs are shared across the ``num_levels`` pyramid levels and each level has its
    own norm, as in Model Garden (so its checkpoints convert exactly); ``num_levels=None``
    shares the norms too, like torchvision. ``separable`` makes every tower and predictor conv
    depthwise-separable, as Model Garden's SpineNet-Mobile RetinaNet.
    """
    head = RetinaNetHead(channels, num_anchors, num_classes, norm_layer=norm_layer)
    head.classification_head = FocalClassificationHead(
        channels,
        num_anchors,
        num_classes,
        depth,
        norm_layer,
        activation,
        focal_alpha,
        focal_gamma,
        num_levels,
        separable,
    )
    head.regression_head = TowerRegressionHead(
        channels, num_anchors, depth, norm_layer, activation, num_levels, separable
    )
    return head


class PyramidRoIAlign(MultiScaleRoIAlign):
    """RoIAlign on the pyramid level Model Garden picks for each box, sampling as it does.

    A box of side ``sqrt(area)`` is read from level ``floor(log2(sqrt(area) / 224)) + 4``
    (clamped to the pyramid), like torchvision's ``MultiScaleRoIAlign``. The difference is small
    boxes: torchvision's default RoIAlign stretches a box smaller than one feature cell to a
    cell, Model Garden samples its true extent. ``aligned=True`` RoIAlign does not stretch but
    samples half a cell up-left; shifting the boxes half a cell back gives Model Garden's grid.

    Args:
        levels: pyramid levels of the features, named ``p{level}``.
        output_size: side of the output crop.
        sampling_ratio: samples per bin side (Model Garden: 1, at the bin centre).
    """

    def __init__(self, levels: Sequence[int], output_size: int, sampling_ratio: int = 1) -> None:
        super().__init__([f"p{lvl}" for lvl in levels], output_size, sampling_ratio)
        self.levels = list(levels)

    def forward(
        self,
        x: dict[str, torch.Tensor],
        boxes: list[torch.Tensor],
        image_shapes: list[tuple[int, int]],
    ) -> torch.Tensor:
        rois = torch.cat(
            [torch.cat([b.new_full((len(b), 1), i), b], 1) for i, b in enumerate(boxes)]
        )
        target, rois = self.assign_levels(rois)
        # Read the boxes of each level as one run of the level-sorted boxes: one host read of
        # the run lengths instead of a nonzero (a wait for the device) and a copy per level.
        target, order = target.sort(stable=True)
        levels = torch.arange(self.levels[0], self.levels[-1] + 1, device=target.device)
        counts = (target[:, None] == levels).sum(0).tolist()
        first = x[self.featmap_names[0]]
        # Training on a CPU: torchvision's RoIAlign backward is single-threaded and slow there.
        training_on_cpu = (first.device.type == "cpu" and first.requires_grad
                           and torch.is_grad_enabled() and self.sampling_ratio > 0)  # fmt: skip
        crops = [
            (
                separable_roi_align
                if training_on_cpu and separable_pays(x[name])
                else partial(roi_align, aligned=True)
            )(x[name], part, self.output_size, 2.0**-level, self.sampling_ratio)
            for level, name, part, count in zip(
                self.levels, self.featmap_names, rois[order].split(counts), counts, strict=True
            )
            if count
        ]
        if not crops:
            return first.new_zeros((0, first.shape[1], *self.output_size))
        crops = torch.cat(crops).to(first.dtype)
        return torch.empty_like(crops).index_copy_(0, order, crops)

    def assign_levels(self, rois: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each ``(batch_index, x0, y0, x1, y1)`` roi's pyramid level, and the roi shifted half
        a cell of that level (in image pixels) for ``aligned=True`` RoIAlign."""
        # A box inverted along one axis (a tensorflow/tpu box under a pixel wide) has a
        # negative area; TensorFlow's NaN level becomes the lowest, as a zero area's does.
        area = (rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])
        sides = area.clamp(min=0).sqrt()
        target = (torch.log2(sides / 224).floor() + 4).clamp(self.levels[0], self.levels[-1])
        shift = (2.0 ** (target - 1))[:, None]  # exact: the exponents are integers
        return target, torch.cat([rois[:, :1], rois[:, 1:] + shift], dim=1)

    def pool_every_level(self, x: dict[str, torch.Tensor], rois: torch.Tensor) -> torch.Tensor:
        """The same crops as :meth:`forward` for ``(batch_index, x0, y0, x1, y1)`` rois, with
        shapes that do not depend on the data (for tracing and export): every roi is read from
        every level and keeps its own level's crop."""
        target, rois = self.assign_levels(rois)
        out = None
        for level, name in zip(self.levels, self.featmap_names, strict=True):
            crops = roi_align(
                x[name], rois, self.output_size, 2.0**-level, self.sampling_ratio, True
            )
            out = (
                crops
                if out is None
                else torch.where((target == level)[:, None, None, None], crops, out)
            )
        return out


class LevelRPNHead(RPNHead):
    """torchvision's RPN head laid out like Model Garden's: ``depth`` 3x3 convs shared by the
    pyramid levels, each followed by a norm per level and an activation, then the 1x1
    objectness and box convs."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_anchors: int,
        depth: int,
        norm_layer: Callable[[int], nn.Module],
        activation: Callable[..., nn.Module],
        num_levels: int,
    ) -> None:
        super().__init__(channels, num_anchors)
        self.conv = conv_tower(channels, depth, norm_layer, activation, num_levels, in_channels)

    def forward(self, x: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        features = [apply_tower(self.conv, f, i) for i, f in enumerate(x)]
        return [self.cls_logits(f) for f in features], [self.bbox_pred(f) for f in features]


def rcnn_box_head(
    in_channels: int,
    channels: int,
    depth: int,
    fc_dim: int,
    norm_layer: Callable[[int], nn.Module],
    fc_norm_layer: Callable[[int], nn.Module] | None,
    activation: Callable[..., nn.Module],
    roi_size: int = 7,
) -> nn.Sequential:
    """R-CNN box head: ``depth`` (0 or more) 3x3 conv + norm + activation on the
    ``roi_size``-square RoI features, then flatten and one FC + norm (``fc_norm_layer``, e.g.
    BatchNorm1d) + activation, as Model Garden's ``DetectionHead`` with one FC."""
    tower = conv_tower(
        channels, depth, norm_layer, activation, in_channels=in_channels, init_std=None
    )
    fc_norm = fc_norm_layer(fc_dim) if fc_norm_layer is not None else nn.Identity()
    return nn.Sequential(
        *tower,
        nn.Flatten(),
        nn.Linear((channels if depth else in_channels) * roi_size**2, fc_dim),
        fc_norm,
        activation(),
    )


def rcnn_mask_predictor(
    channels: int,
    num_classes: int,
    norm_layer: Callable[[int], nn.Module],
    activation: Callable[..., nn.Module],
) -> nn.Sequential:
    """2x upsampling by a stride-2 transposed conv + norm + activation, then per-class mask
    logits; torchvision's MaskRCNNPredictor with the norm Model Garden puts after upsampling."""
    predictor = nn.Sequential(
        OrderedDict(
            conv5_mask=nn.ConvTranspose2d(channels, channels, 2, stride=2, bias=False),
            norm=norm_layer(channels),
            act=activation(),
            mask_fcn_logits=nn.Conv2d(channels, num_classes, 1),
        )
    )
    for m in (predictor.conv5_mask, predictor.mask_fcn_logits):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(predictor.mask_fcn_logits.bias)
    return predictor
