"""SpineNet architectures as data: block permutations and scaling tables.

The block list and the scaling table follow the SpineNet paper (Du et al., CVPR 2020) and
TensorFlow Model Garden, so a variant is fully described by a scaling entry plus a block list.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ModelError

BLOCK_TYPES = ("bottleneck", "residual")

# Base block width (before `filter_scale`) of each level.
FILTER_SIZE_MAP = {1: 32, 2: 64, 3: 128, 4: 256, 5: 256, 6: 256, 7: 256}

# Bottleneck blocks output 4x their width; residual blocks output their width.
BLOCK_EXPANSION = {"bottleneck": 4, "residual": 1}


@dataclass(frozen=True)
class BlockSpec:
    """One block of the scale-permuted network.

    Args:
        level: feature level of the block output (stride ``2**level``).
        block_type: ``"bottleneck"`` or ``"residual"``.
        parents: indices of the two input blocks; 0 and 1 are the two stem blocks.
        is_output: whether the block feeds the output pyramid.
    """

    level: int
    block_type: str
    parents: tuple[int, int]
    is_output: bool = False


@dataclass(frozen=True)
class Scaling:
    """How a SpineNet variant scales the shared block permutation."""

    endpoint_filters: int
    filter_scale: float
    resample_alpha: float
    block_repeats: int


# The SpineNet-49 permutation found by NAS, shared by 49S/49/96/143/190. The last (level 2)
# block is never built for min_level >= 3, but it counts in the stochastic-depth schedule,
# exactly as in Model Garden.
SPINENET_BLOCK_SPECS: tuple[BlockSpec, ...] = tuple(
    BlockSpec(level, block_type, parents, is_output)
    for level, block_type, parents, is_output in [
        (2, "bottleneck", (0, 1), False),
        (4, "residual", (0, 1), False),
        (3, "bottleneck", (2, 3), False),
        (4, "bottleneck", (2, 4), False),
        (6, "residual", (3, 5), False),
        (4, "bottleneck", (3, 5), False),
        (5, "residual", (6, 7), False),
        (7, "residual", (6, 8), False),
        (5, "bottleneck", (8, 9), False),
        (5, "bottleneck", (8, 10), False),
        (4, "bottleneck", (5, 10), True),
        (3, "bottleneck", (4, 10), True),
        (5, "bottleneck", (7, 12), True),
        (7, "bottleneck", (5, 14), True),
        (6, "bottleneck", (12, 14), True),
        (2, "bottleneck", (2, 13), True),
    ]
)

SCALING: dict[str, Scaling] = {
    "49s": Scaling(endpoint_filters=128, filter_scale=0.65, resample_alpha=0.5, block_repeats=1),
    "49": Scaling(endpoint_filters=256, filter_scale=1.0, resample_alpha=0.5, block_repeats=1),
    "96": Scaling(endpoint_filters=256, filter_scale=1.0, resample_alpha=0.5, block_repeats=2),
    "143": Scaling(endpoint_filters=256, filter_scale=1.0, resample_alpha=1.0, block_repeats=3),
    "190": Scaling(endpoint_filters=512, filter_scale=1.3, resample_alpha=1.0, block_repeats=4),
}

# Paper heads per variant: RetinaNet tower depth, anchor size, R-CNN box-head FC width, and
# RPN anchor scales per location (Model Garden's 143 R-CNN configs use 3, 49 and 96 one).
HEAD_DEFAULTS: dict[str, dict] = {
    "49s": {"head_depth": 4, "anchor_size": 3.0, "fc_dim": 512, "rpn_scales": 1},
    "49": {"head_depth": 4, "anchor_size": 3.0, "fc_dim": 1024, "rpn_scales": 1},
    "96": {"head_depth": 4, "anchor_size": 3.0, "fc_dim": 1024, "rpn_scales": 1},
    "143": {"head_depth": 4, "anchor_size": 4.0, "fc_dim": 1024, "rpn_scales": 3},
    "190": {"head_depth": 7, "anchor_size": 4.0, "fc_dim": 1024, "rpn_scales": 3},
}

NUM_STEM_BLOCKS = 2

# SpineNet-Mobile (Du et al. 2020, "Efficient Scale-Permuted Backbone with Learned Resource
# Distribution"), as in Model Garden's ``spinenet_mobile.py``: MBConv blocks everywhere.
MOBILE_BLOCK_TYPES = ("mbconv",)

# Base block width (before `filter_scale`) of each level; level 0 is the stem conv.
MOBILE_FILTER_SIZE_MAP = {0: 8, 1: 16, 2: 24, 3: 40, 4: 80, 5: 112, 6: 112, 7: 112}

# The Mobile permutation found by NAS, shared by Mobile-49/49S/49XS. Blocks 0 (level 1) and
# 1 (level 2) are the stem blocks.
SPINENET_MOBILE_BLOCK_SPECS: tuple[BlockSpec, ...] = tuple(
    BlockSpec(level, "mbconv", parents, is_output)
    for level, parents, is_output in [
        (2, (0, 1), False),
        (2, (1, 2), False),
        (4, (1, 2), False),
        (3, (3, 4), False),
        (4, (3, 5), False),
        (6, (4, 6), False),
        (4, (4, 6), False),
        (5, (7, 8), False),
        (7, (7, 9), False),
        (5, (9, 10), False),
        (5, (9, 11), False),
        (4, (6, 11), True),
        (3, (5, 11), True),
        (5, (8, 13), True),
        (7, (6, 15), True),
        (6, (13, 15), True),
    ]
)


@dataclass(frozen=True)
class MobileScaling:
    """How a SpineNet-Mobile variant scales the shared Mobile permutation."""

    endpoint_filters: int
    filter_scale: float
    block_repeats: int
    expand_ratio: int = 6
    se_ratio: float = 0.2


MOBILE_SCALING: dict[str, MobileScaling] = {
    "49": MobileScaling(endpoint_filters=48, filter_scale=1.0, block_repeats=1),
    "49s": MobileScaling(endpoint_filters=40, filter_scale=0.65, block_repeats=1),
    "49xs": MobileScaling(endpoint_filters=24, filter_scale=0.6, block_repeats=1),
}


# Model Garden's mobile RetinaNet has 4-deep towers of depthwise-separable convs as wide as the
# endpoints, and separable predictors.
MOBILE_HEAD_DEFAULTS: dict[str, dict] = {
    v: {"head_depth": 4, "anchor_size": 3.0, "fc_dim": 256, "rpn_scales": 1, "separable": True}
    for v in MOBILE_SCALING
}


def parse_block_specs(
    specs: Sequence[BlockSpec | Sequence], block_types: Sequence[str] = BLOCK_TYPES
) -> tuple[BlockSpec, ...]:
    """Validate block specs given as ``BlockSpec`` objects or ``(level, type, parents, is_output)``.

    ``block_types`` are the accepted block types (SpineNet-Mobile passes ``MOBILE_BLOCK_TYPES``).

    Raises:
        ModelError: naming the offending block when a spec is malformed.
    """
    if not specs:
        raise ModelError("block_specs is empty: SpineNet needs at least one block")
    parsed: list[BlockSpec] = []
    outputs: set[int] = set()
    for i, spec in enumerate(specs):
        index = i + NUM_STEM_BLOCKS
        where = f"block spec {i} (block index {index})"
        if not isinstance(spec, BlockSpec):
            if isinstance(spec, str) or not isinstance(spec, Sequence) or len(spec) != 4:
                raise ModelError(
                    f"{where}: expected (level, block_type, (parent0, parent1), is_output), "
                    f"got {spec!r}"
                )
            level, block_type, parents, is_output = spec
            if isinstance(parents, str) or not isinstance(parents, Sequence) or len(parents) != 2:
                raise ModelError(f"{where}: parents must be two block indices, got {parents!r}")
            spec = BlockSpec(level, block_type, tuple(parents), bool(is_output))
        if not isinstance(spec.level, int) or not 1 <= spec.level <= 7:
            raise ModelError(f"{where}: level must be an integer in 1..7, got {spec.level!r}")
        if spec.block_type not in block_types:
            raise ModelError(
                f"{where}: block_type must be one of {tuple(block_types)}, got {spec.block_type!r}"
            )
        for p in spec.parents:
            if not isinstance(p, int) or not 0 <= p < index:
                raise ModelError(
                    f"{where}: parent {p!r} must be an earlier block index in 0..{index - 1}"
                )
        if spec.is_output:
            if spec.level in outputs:
                raise ModelError(f"{where}: a second output block for level {spec.level}")
            outputs.add(spec.level)
        parsed.append(spec)
    return tuple(parsed)
