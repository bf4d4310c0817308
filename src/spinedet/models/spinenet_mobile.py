"""SpineNet-Mobile backbone: MBConv blocks in the Mobile scale permutation.

Follows Model Garden's ``SpineNetMobile`` (Du et al. 2020, "Efficient Scale-Permuted Backbone
with Learned Resource Distribution"): a 3x3 stride-2 stem conv, two MBConv stem blocks (level 1,
then level 2), scale-permuted MBConv blocks fed by depthwise-conv resampling, and 1x1 endpoint
convs. Parameter counts and outputs equal Model Garden's for Mobile-49/49S/49XS (its
checkpoints convert with ``spinedet convert-tf``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torchvision.ops import SqueezeExcitation, StochasticDepth

from ..errors import ModelError
from .blocks import upsample_to
from .layers import (
    BN_EPS,
    BN_MOMENTUM,
    DEFAULT_ACTIVATION,
    PADDINGS,
    ConvNormAct,
    NormFactory,
    SameConv2d,
    make_activation,
    make_norm,
)
from .registry import Family, register_family
from .specs import (
    MOBILE_BLOCK_TYPES,
    MOBILE_FILTER_SIZE_MAP,
    MOBILE_HEAD_DEFAULTS,
    MOBILE_SCALING,
    NUM_STEM_BLOCKS,
    SPINENET_MOBILE_BLOCK_SPECS,
    BlockSpec,
    parse_block_specs,
)
from .spinenet import ScalePermutedBackbone, _check_positive, build_variant, plan_blocks

__all__ = ["DepthwiseConvNormAct", "MBConv", "SpineNetMobile", "make_divisible", "spinenet_mobile"]

# Levels of the two stem blocks: the first keeps the stem conv's stride 2, the second halves it.
STEM_LEVELS = (1, 2)

# Squeeze-excitation activations (squeeze, gate): Model Garden's InvertedBottleneckBlock, and
# tensorflow/tpu's nn_ops.squeeze_excitation (swish whatever the network's activation).
SQUEEZE_EXCITE = {
    "model_garden": (nn.ReLU, nn.Hardsigmoid),
    "tpu": (nn.SiLU, nn.Sigmoid),
}


def make_divisible(value: float, divisor: int = 1) -> int:
    """Model Garden's ``make_divisible`` (with its default round-down protection)."""
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:  # never round down by more than 10%
        new_value += divisor
    return int(new_value)


class DepthwiseConvNormAct(nn.Sequential):
    """3x3 depthwise convolution (output ``ceil(input / stride)``), norm and activation."""

    def __init__(
        self,
        channels: int,
        stride: int,
        norm: NormFactory,
        act: Callable[[], nn.Module],
        padding: str,
    ) -> None:
        if padding not in PADDINGS:
            raise ModelError(f"unknown padding {padding!r}; expected one of {PADDINGS}")
        if stride > 1 and padding == "same":
            conv = SameConv2d(channels, channels, 3, stride, padding=0, groups=channels, bias=False)
        else:
            conv = nn.Conv2d(channels, channels, 3, stride, padding=1, groups=channels, bias=False)
        super().__init__(OrderedDict(conv=conv, norm=norm(channels), act=act()))


class MBConv(nn.Module):
    """Inverted bottleneck with squeeze-excitation, as Model Garden's InvertedBottleneckBlock.

    1x1 expand (x ``expand_ratio``) -> 3x3 depthwise (``stride``) -> SE -> 1x1 project + norm,
    plus the input when the shape is kept. The SE squeezes to ``in_channels * se_ratio`` (not
    the expanded width) channels, truncated, and gates with hard-sigmoid (``squeeze_excite=
    "model_garden"``: ReLU between its convs) or, ``"tpu"``, swish and sigmoid.

    The SE width ``max(1, int(in_channels * se_ratio))`` truncates, as Model Garden's
    ``SqueezeExcitation`` does (tf-models-official 2.20, checked numerically in the parity
    tests); rounding instead (4.8 -> 5) would add 675 parameters to Mobile-49.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        expand_ratio: int,
        se_ratio: float,
        norm: NormFactory,
        act: Callable[[], nn.Module],
        drop_rate: float = 0.0,
        padding: str = "same",
        squeeze_excite: str = "model_garden",
    ) -> None:
        super().__init__()
        mid = make_divisible(in_channels * expand_ratio)
        squeeze, gate = SQUEEZE_EXCITE[squeeze_excite]
        self.expand = (
            ConvNormAct(in_channels, mid, 1, norm, act, padding=padding)
            if expand_ratio > 1
            else nn.Identity()
        )
        self.depthwise = DepthwiseConvNormAct(mid, stride, norm, act, padding)
        self.se = (
            SqueezeExcitation(mid, max(1, int(in_channels * se_ratio)), squeeze, gate)
            if 0 < se_ratio <= 1
            else nn.Identity()
        )
        self.project = ConvNormAct(mid, out_channels, 1, norm, padding=padding)
        self.use_residual = stride == 1 and in_channels == out_channels
        self.drop_path = (
            StochasticDepth(drop_rate, "row")
            if drop_rate > 0 and self.use_residual
            else nn.Identity()
        )

    @property
    def last_norm(self) -> nn.Module | None:
        """The projection norm of a residual block, zero-initialised (block starts as identity)."""
        return self.project.norm if self.use_residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.se(self.depthwise(self.expand(x))))
        if self.use_residual:
            out = self.drop_path(out) + x
        return out


def _mbconv_group(
    in_channels: int, out_channels: int, stride: int, repeats: int, **options
) -> nn.Sequential:
    """``repeats`` MBConv blocks; only the first may change width or resolution."""
    return nn.Sequential(
        *(
            MBConv(
                in_channels if i == 0 else out_channels,
                out_channels,
                stride if i == 0 else 1,
                **options,
            )
            for i in range(repeats)
        )
    )


class MobileResample(nn.Module):
    """Bring a parent block to a target level and width.

    Downsampling: one 3x3 stride-2 depthwise conv + norm + activation per level. Upsampling:
    nearest neighbour (then cropped to the target size). Then a 1x1 conv + norm (no activation).
    """

    def __init__(
        self,
        in_channels: int,
        in_level: int,
        out_level: int,
        out_channels: int,
        norm: NormFactory,
        act: Callable[[], nn.Module],
        padding: str = "same",
    ) -> None:
        super().__init__()
        self.down = None
        if out_level > in_level:
            self.down = nn.Sequential(
                *(
                    DepthwiseConvNormAct(in_channels, 2, norm, act, padding)
                    for _ in range(out_level - in_level)
                )
            )
        self.up_scale = 2 ** max(in_level - out_level, 0)
        self.project = ConvNormAct(in_channels, out_channels, 1, norm, padding=padding)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if self.down is not None:
            x = self.down(x)
        elif self.up_scale > 1:
            x = upsample_to(x, self.up_scale, size)
        return self.project(x)


class SpineNetMobile(ScalePermutedBackbone):
    """SpineNet-Mobile backbone returning ``OrderedDict(p3=..., ..., p7=...)``.

    Level ``l`` of an ``H x W`` input has size ``ceil(H / 2**l) x ceil(W / 2**l)`` and
    ``endpoint_filters`` channels, for any input size.

    Args:
        block_specs: the block permutation (defaults to the Mobile one), block type ``"mbconv"``.
        endpoint_filters: channels of every output level.
        filter_scale: multiplier of the base widths (8 stem, 16, 24, 40, 80, then 112).
        block_repeats: MBConv blocks per block group.
        expand_ratio: MBConv expansion.
        se_ratio: squeeze-excitation ratio (of the block's input channels); 0 disables SE.
        squeeze_excite: ``"model_garden"`` (ReLU, hard-sigmoid gate) or ``"tpu"`` (swish,
            sigmoid gate: tensorflow/tpu's ``SpineNetMBConv``, the zoo's SpineNetMB-49).
        min_level, max_level: the output pyramid levels (3..7 at most).
        activation: ``"relu"`` (Model Garden's default) or ``"swish"`` (its COCO configs).
        stochastic_depth_rate: drop rate of the last block; block ``i`` of ``N`` uses
            ``rate * (i + 1) / N``.
        norm, bn_momentum, bn_eps, padding, in_channels: as for
            :class:`~spinedet.models.spinenet.SpineNet`.
    """

    def __init__(
        self,
        block_specs: Sequence[BlockSpec | Sequence] = SPINENET_MOBILE_BLOCK_SPECS,
        *,
        endpoint_filters: int = 48,
        filter_scale: float = 1.0,
        block_repeats: int = 1,
        expand_ratio: int = 6,
        se_ratio: float = 0.2,
        squeeze_excite: str = "model_garden",
        min_level: int = 3,
        max_level: int = 7,
        activation: str = DEFAULT_ACTIVATION,
        stochastic_depth_rate: float = 0.0,
        norm: str = "bn",
        bn_momentum: float = BN_MOMENTUM,
        bn_eps: float = BN_EPS,
        padding: str = "same",
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        _check_positive(endpoint_filters=endpoint_filters, filter_scale=filter_scale)
        _check_positive(block_repeats=block_repeats, expand_ratio=expand_ratio)
        if not 0 <= se_ratio <= 1:
            raise ModelError(f"se_ratio must be in [0, 1], got {se_ratio}")
        if squeeze_excite not in SQUEEZE_EXCITE:
            raise ModelError(
                f"unknown squeeze_excite {squeeze_excite!r}; expected one of {list(SQUEEZE_EXCITE)}"
            )
        self._set_pyramid(
            3,
            min_level,
            max_level,
            endpoint_filters,
            stochastic_depth_rate,
            bn_momentum,
            bn_eps,
            activation,
            padding=padding,
            squeeze_excite=squeeze_excite,
        )
        specs = parse_block_specs(block_specs, MOBILE_BLOCK_TYPES)
        self.block_specs = specs

        norm_layer = make_norm(norm, bn_momentum, bn_eps)
        act = make_activation(activation)
        options = dict(
            expand_ratio=expand_ratio,
            se_ratio=se_ratio,
            squeeze_excite=squeeze_excite,
            norm=norm_layer,
            act=act,
            padding=padding,
        )

        def width(level: int) -> int:
            return int(MOBILE_FILTER_SIZE_MAP[level] * filter_scale)

        self.stem = ConvNormAct(
            in_channels, width(0), 3, norm_layer, act, stride=2, padding=padding
        )
        self.stem_blocks = nn.ModuleList(
            _mbconv_group(width(lvl - 1), width(lvl), 1 if i == 0 else 2, block_repeats, **options)
            for i, lvl in enumerate(STEM_LEVELS)
        )
        levels = list(STEM_LEVELS)
        channels = [width(lvl) for lvl in STEM_LEVELS]
        index_of: dict[int, int] = {}

        # Model Garden fuses an unconsumed earlier block into an output block when width and
        # channels match; with one block type, equal levels imply both (as plan_blocks checks).
        self.plan = plan_blocks(specs, min_level, max_level, stochastic_depth_rate)
        planned_by_index = {b.index: b for b in self.plan}
        self.resamplers = nn.ModuleDict()
        self.blocks = nn.ModuleDict()
        for i, spec in enumerate(specs):
            index = i + NUM_STEM_BLOCKS
            target = width(spec.level)
            levels.append(spec.level)
            channels.append(target)
            block = planned_by_index.get(index)
            if block is None:
                continue
            self.resamplers[str(index)] = nn.ModuleList(
                MobileResample(channels[p], levels[p], spec.level, target, norm_layer, act, padding)
                for p in block.parents
            )
            self.blocks[str(index)] = _mbconv_group(
                target, target, 1, block_repeats, drop_rate=block.drop_rate, **options
            )
            if spec.is_output:
                index_of[spec.level] = index
        self._finish(index_of, channels, endpoint_filters, norm_layer, act, padding)


SPINENET_MOBILE = register_family(
    Family(
        "spinenet_mobile",
        SpineNetMobile,
        MOBILE_SCALING,
        MOBILE_HEAD_DEFAULTS,
        variant_prefix="mobile",
        title="SpineNet-Mobile",
    )
)


def spinenet_mobile(variant: str = "49", **kwargs) -> SpineNetMobile:
    """Build SpineNet-Mobile-``variant`` (``49``, ``49s`` or ``49xs``).

    Keyword arguments override the variant's scaling or any other :class:`SpineNetMobile` option.
    """
    return build_variant(SPINENET_MOBILE, variant, kwargs)
