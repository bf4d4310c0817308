"""SpineNet backbone: a stem, a scale-permuted sequence of blocks, and 1x1 endpoint convs."""

from __future__ import annotations

import functools
import inspect
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ModelError
from .blocks import Resample, block_group
from .description import ModelDescription
from .layers import (
    BN_EPS,
    BN_MOMENTUM,
    DEFAULT_ACTIVATION,
    ConvNormAct,
    NormFactory,
    make_activation,
    make_norm,
    max_pool,
)
from .registry import FAMILIES, Family, register_family
from .specs import (
    BLOCK_EXPANSION,
    FILTER_SIZE_MAP,
    HEAD_DEFAULTS,
    NUM_STEM_BLOCKS,
    SCALING,
    SPINENET_BLOCK_SPECS,
    BlockSpec,
    parse_block_specs,
)

__all__ = ["SpineNet", "spinenet", "plan_blocks", "ScalePermutedBackbone"]


@dataclass(frozen=True)
class PlannedBlock:
    """A block as it is built: its spec plus every feature summed into its input."""

    index: int
    level: int
    block_type: str
    parents: tuple[int, int]
    extra_inputs: tuple[int, ...]  # earlier unconsumed blocks fused into an output block
    drop_rate: float
    is_output: bool


def plan_blocks(
    specs: Sequence[BlockSpec], min_level: int, max_level: int, stochastic_depth_rate: float
) -> list[PlannedBlock]:
    """Resolve the connections of the scale-permuted network and keep only the blocks the
    ``min_level..max_level`` outputs depend on.

    An output block also sums every earlier block of the same level and type that no block has
    consumed yet (Model Garden compares width and channels; equal level and type imply both).
    """
    levels = [2] * NUM_STEM_BLOCKS
    types = ["bottleneck"] * NUM_STEM_BLOCKS
    consumers = [0] * NUM_STEM_BLOCKS
    planned: list[PlannedBlock] = []
    for i, spec in enumerate(specs):
        for p in spec.parents:
            consumers[p] += 1
        extras: list[int] = []
        if spec.is_output:
            for j in range(len(levels)):
                same_shape = levels[j] == spec.level and types[j] == spec.block_type
                if consumers[j] == 0 and same_shape:
                    extras.append(j)
                    consumers[j] += 1
        planned.append(
            PlannedBlock(
                index=i + NUM_STEM_BLOCKS,
                level=spec.level,
                block_type=spec.block_type,
                parents=spec.parents,
                extra_inputs=tuple(extras),
                drop_rate=stochastic_depth_rate * (i + 1) / len(specs),
                is_output=spec.is_output,
            )
        )
        levels.append(spec.level)
        types.append(spec.block_type)
        consumers.append(0)

    outputs = {b.level: b.index for b in planned if b.is_output}
    missing = [lvl for lvl in range(min_level, max_level + 1) if lvl not in outputs]
    if missing:
        raise ModelError(
            f"block_specs have no output block for level(s) {missing}; "
            f"outputs exist for levels {sorted(outputs)}"
        )
    needed = {outputs[lvl] for lvl in range(min_level, max_level + 1)}
    for block in reversed(planned):
        if block.index in needed:
            needed.update(block.parents, block.extra_inputs)
    return [b for b in planned if b.index in needed]


class ScalePermutedBackbone(nn.Module):
    """What SpineNet and SpineNet-Mobile share: the output pyramid's attributes, weight
    initialisation, and the forward walk through the planned blocks.

    Subclasses build ``stem``, ``stem_blocks``, ``plan``, ``resamplers`` and ``blocks``, then
    call ``_finish``.

    A backbone built directly (``SpineNet(...)``) describes itself as its family's custom
    build with the options it was given, so its saved weights load with ``load_model``.
    """

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__init__
        signature = inspect.signature(init)

        @functools.wraps(init)
        def described_init(self, *args, **options) -> None:
            init(self, *args, **options)
            if type(self) is cls:
                given = signature.bind(self, *args, **options).arguments
                family = next(f for f in FAMILIES.values() if f.backbone_class is cls)
                given = {k: v for k, v in given.items() if k != "self"}
                self.description = ModelDescription(family.name, None, "backbone", given)

        cls.__init__ = described_init

    def _set_pyramid(
        self,
        lowest_level: int,
        min_level: int,
        max_level: int,
        endpoint_filters: int,
        stochastic_depth_rate: float,
        bn_momentum: float,
        bn_eps: float,
        activation: str,
        **numerics: str,
    ) -> None:
        """Validate the output levels and drop rate, and record the pyramid attributes and the
        options under which the same tensors would compute something else (``numerics``:
        the family's own, such as padding)."""
        if not lowest_level <= min_level <= max_level <= 7:
            raise ModelError(
                f"need {lowest_level} <= min_level <= max_level <= 7, got {min_level}..{max_level}"
            )
        if not 0.0 <= stochastic_depth_rate < 1.0:
            raise ModelError(
                f"stochastic_depth_rate must be in [0, 1), got {stochastic_depth_rate}"
            )
        self.min_level, self.max_level = min_level, max_level
        self.levels = list(range(min_level, max_level + 1))
        self.strides = [2**lvl for lvl in self.levels]
        self.out_channels = endpoint_filters  # torchvision detectors read this attribute
        self.activation = activation  # heads use the backbone's
        self.bn_momentum, self.bn_eps = bn_momentum, bn_eps  # heads normalise alike
        # Loading weights compares these with the file's: every shape is equal under each.
        self.numeric_options = {"activation": activation, "bn_eps": bn_eps, **numerics}

    def _finish(
        self,
        index_of: dict[int, int],
        channels: list[int],
        endpoint_filters: int,
        norm_layer: NormFactory,
        act: Callable[[], nn.Module],
        padding: str,
    ) -> None:
        """The output pyramid (a 1x1 conv + norm + activation per level, on the last block of
        that level, ``index_of``) and the initial weights."""
        self.act = act()
        self.endpoint_inputs = {lvl: index_of[lvl] for lvl in self.levels}
        self.endpoints = nn.ModuleDict(
            {
                f"p{lvl}": ConvNormAct(
                    channels[index_of[lvl]], endpoint_filters, 1, norm_layer, act, padding=padding
                )
                for lvl in self.levels
            }
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d | nn.SyncBatchNorm | nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Each residual branch starts at zero, so every block starts as its shortcut (as the
        # PyTorch ports do): from-scratch stem gradients then shrink ~15x, and training starts.
        for m in self.modules():
            last = getattr(m, "last_norm", None)
            if last is not None and hasattr(last, "weight"):
                nn.init.zeros_(last.weight)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        h, w = x.shape[-2:]
        sizes = {lvl: (-(-h // 2**lvl), -(-w // 2**lvl)) for lvl in range(1, 8)}
        x = self.stem(x)
        feats: dict[int, torch.Tensor] = {}
        for i, group in enumerate(self.stem_blocks):
            x = group(x)
            feats[i] = x
        for block in self.plan:
            key = str(block.index)
            size = sizes[block.level]
            first, second = self.resamplers[key]
            # In-place sums: ``sum()`` would start from 0 and allocate one more full tensor.
            x = first(feats[block.parents[0]], size)
            x += second(feats[block.parents[1]], size)
            for j in block.extra_inputs:
                x += feats[j]
            feats[block.index] = self.blocks[key](self.act(x))
        return OrderedDict(
            (f"p{lvl}", self.endpoints[f"p{lvl}"](feats[self.endpoint_inputs[lvl]]))
            for lvl in self.levels
        )


class SpineNet(ScalePermutedBackbone):
    """SpineNet backbone returning ``OrderedDict(p3=..., ..., p7=...)``.

    Level ``l`` of an ``H x W`` input has size ``ceil(H / 2**l) x ceil(W / 2**l)`` and
    ``endpoint_filters`` channels, for any input size.

    Args:
        block_specs: the block permutation (defaults to SpineNet-49's).
        endpoint_filters: channels of every output level.
        filter_scale: multiplier of the base widths (64 at level 2, 128 at 3, 256 above).
        resample_alpha: width multiplier of cross-scale resampling.
        block_repeats: blocks per block group.
        min_level, max_level: the output pyramid levels.
        activation: ``"relu"`` or ``"swish"``.
        stochastic_depth_rate: drop rate of the last block; block ``i`` of ``N`` uses
            ``rate * (i + 1) / N``.
        norm: ``"bn"``, ``"syncbn"``, ``"frozenbn"`` or ``"gn"``.
        bn_momentum, bn_eps: defaults equal TensorFlow Model Garden's (decay 0.99, eps 1e-3).
        padding: ``"same"`` reproduces TensorFlow's asymmetric padding of strided layers
            (needed for converted Model Garden weights); ``"symmetric"`` pads like
            torchvision; ``"fixed"`` pads convolutions symmetrically and max pools "same", as
            tensorflow/tpu does.
        downsample: ``"model_garden"`` (a strided conv then 3x3 stride-2 max pools) or
            ``"tpu"`` (tensorflow/tpu's single max pool of size 3 or 5, see
            :func:`~spinedet.models.blocks.tpu_downsample`).
        in_channels: input image channels.
    """

    def __init__(
        self,
        block_specs: Sequence[BlockSpec | Sequence] = SPINENET_BLOCK_SPECS,
        *,
        endpoint_filters: int = 256,
        filter_scale: float = 1.0,
        resample_alpha: float = 0.5,
        block_repeats: int = 1,
        min_level: int = 3,
        max_level: int = 7,
        activation: str = DEFAULT_ACTIVATION,
        stochastic_depth_rate: float = 0.0,
        norm: str = "bn",
        bn_momentum: float = BN_MOMENTUM,
        bn_eps: float = BN_EPS,
        padding: str = "same",
        downsample: str = "model_garden",
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.downsample = downsample
        _check_positive(endpoint_filters=endpoint_filters, filter_scale=filter_scale)
        _check_positive(resample_alpha=resample_alpha, block_repeats=block_repeats)
        self._set_pyramid(
            2,
            min_level,
            max_level,
            endpoint_filters,
            stochastic_depth_rate,
            bn_momentum,
            bn_eps,
            activation,
            padding=padding,
            downsample=downsample,
        )
        specs = parse_block_specs(block_specs)
        self.block_specs = specs

        norm_layer = make_norm(norm, bn_momentum, bn_eps)
        act = make_activation(activation)

        def width(level: int) -> int:
            return int(FILTER_SIZE_MAP[level] * filter_scale)

        stem_width = width(2)
        self.stem = nn.Sequential(
            ConvNormAct(in_channels, 64, 7, norm_layer, act, stride=2, padding=padding),
            max_pool(padding),
        )
        self.stem_blocks = nn.ModuleList(
            block_group(
                "bottleneck",
                64 if i == 0 else stem_width * 4,
                stem_width,
                block_repeats,
                norm_layer,
                act,
                padding=padding,
            )
            for i in range(NUM_STEM_BLOCKS)
        )
        # Per built block: level, channels and width (channels / expansion).
        levels = [2] * NUM_STEM_BLOCKS
        channels = [stem_width * 4] * NUM_STEM_BLOCKS
        widths = [stem_width] * NUM_STEM_BLOCKS
        index_of: dict[int, int] = {}

        self.plan = plan_blocks(specs, min_level, max_level, stochastic_depth_rate)
        planned_by_index = {b.index: b for b in self.plan}
        self.resamplers = nn.ModuleDict()
        self.blocks = nn.ModuleDict()
        for i, spec in enumerate(specs):
            index = i + NUM_STEM_BLOCKS
            target_width = width(spec.level)
            target_channels = target_width * BLOCK_EXPANSION[spec.block_type]
            levels.append(spec.level)
            channels.append(target_channels)
            widths.append(target_width)
            block = planned_by_index.get(index)
            if block is None:
                continue
            self.resamplers[str(index)] = nn.ModuleList(
                Resample(
                    channels[p],
                    widths[p],
                    levels[p],
                    spec.level,
                    target_channels,
                    resample_alpha,
                    norm_layer,
                    act,
                    padding,
                    downsample,
                )
                for p in block.parents
            )
            self.blocks[str(index)] = block_group(
                spec.block_type,
                target_channels,
                target_width,
                block_repeats,
                norm_layer,
                act,
                block.drop_rate,
                padding,
            )
            if spec.is_output:
                index_of[spec.level] = index
        self._finish(index_of, channels, endpoint_filters, norm_layer, act, padding)


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ModelError(f"{name} must be positive, got {value!r}")


SPINENET = register_family(Family("spinenet", SpineNet, SCALING, HEAD_DEFAULTS))


def spinenet(variant: str = "49", **kwargs) -> SpineNet:
    """Build SpineNet-``variant`` (``49s``, ``49``, ``96``, ``143`` or ``190``).

    Keyword arguments override the variant's scaling or any other :class:`SpineNet` option.
    """
    return build_variant(SPINENET, variant, kwargs)


def build_variant(family: Family, variant: str, kwargs: dict) -> nn.Module:
    """``family``'s backbone of ``variant``; unknown variants raise a ModelError listing them."""
    key = variant.lower()
    if key not in family.scaling:
        raise ModelError(
            f"unknown {family.title} variant {variant!r}; expected one of {list(family.scaling)}"
        )
    return family.build(key, **kwargs)
