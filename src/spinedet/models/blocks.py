"""Residual blocks, block groups and cross-scale resampling of SpineNet."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

from .layers import ConvNormAct, NormFactory, max_pool, same_max_pool
from .specs import BLOCK_EXPANSION


class _ResidualBlock(nn.Module):
    """``act(shortcut(x) + drop_path(branch(x)))``; the shortcut projects when channels change."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        branch: list[ConvNormAct],
        norm: NormFactory,
        act: Callable[[], nn.Module],
        drop_rate: float,
        padding: str,
    ) -> None:
        super().__init__()
        self.shortcut = (
            ConvNormAct(in_channels, out_channels, 1, norm, padding=padding)
            if in_channels != out_channels
            else nn.Identity()
        )
        # Registered as conv1..convN (the names weight conversion and BN folding rely on).
        self.branch_names = [f"conv{i}" for i in range(1, len(branch) + 1)]
        for name, layer in zip(self.branch_names, branch, strict=True):
            self.add_module(name, layer)
        self.drop_path = StochasticDepth(drop_rate, "row") if drop_rate > 0 else nn.Identity()
        self.act = act()

    @property
    def last_norm(self) -> nn.Module:
        """The branch's last norm, zero-initialised so the block starts as its shortcut."""
        return getattr(self, self.branch_names[-1]).norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for name in self.branch_names:
            out = getattr(self, name)(out)
        out = self.drop_path(out)
        out += self.shortcut(x)  # in place: a fresh full-size tensor costs page faults on CPU
        return self.act(out)


class Bottleneck(_ResidualBlock):
    """1x1 -> 3x3 -> 1x1 (x4 channels) residual block."""

    def __init__(
        self,
        in_channels: int,
        width: int,
        norm: NormFactory,
        act: Callable[[], nn.Module],
        drop_rate: float = 0.0,
        padding: str = "same",
    ) -> None:
        branch = [
            ConvNormAct(in_channels, width, 1, norm, act, padding=padding),
            ConvNormAct(width, width, 3, norm, act, padding=padding),
            ConvNormAct(width, width * 4, 1, norm, padding=padding),
        ]
        super().__init__(in_channels, width * 4, branch, norm, act, drop_rate, padding)


class Residual(_ResidualBlock):
    """3x3 -> 3x3 residual block."""

    def __init__(
        self,
        in_channels: int,
        width: int,
        norm: NormFactory,
        act: Callable[[], nn.Module],
        drop_rate: float = 0.0,
        padding: str = "same",
    ) -> None:
        branch = [
            ConvNormAct(in_channels, width, 3, norm, act, padding=padding),
            ConvNormAct(width, width, 3, norm, padding=padding),
        ]
        super().__init__(in_channels, width, branch, norm, act, drop_rate, padding)


def upsample_to(x: torch.Tensor, scale: int, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour upsampling by the exact power of two ``scale``, cropped to ``size``:
    level sizes are ceil(H / 2**l), so a coarser map may cover one extra row/column."""
    x = F.interpolate(x, scale_factor=scale, mode="nearest")
    return x[..., : size[0], : size[1]]


BLOCKS = {"bottleneck": Bottleneck, "residual": Residual}
DOWNSAMPLES = ("model_garden", "tpu")


def block_group(
    block_type: str,
    in_channels: int,
    width: int,
    repeats: int,
    norm: NormFactory,
    act: Callable[[], nn.Module],
    drop_rate: float = 0.0,
    padding: str = "same",
) -> nn.Sequential:
    """``repeats`` blocks; only the first may change the channel count (then it projects)."""
    block = BLOCKS[block_type]
    out_channels = width * BLOCK_EXPANSION[block_type]
    return nn.Sequential(
        *(
            block(in_channels if i == 0 else out_channels, width, norm, act, drop_rate, padding)
            for i in range(repeats)
        )
    )


class Resample(nn.Module):
    """Bring a parent block to a target level and channel count.

    1x1 conv to ``alpha`` times the parent's width, then a strided 3x3 conv plus max pools
    (downsampling) or nearest-neighbour upsampling, then a 1x1 conv + norm (no activation).

    ``downsample="model_garden"`` repeats 3x3 stride-2 pools; ``"tpu"`` is tensorflow/tpu's
    ``resample_with_alpha``: one pool (see :func:`tpu_downsample`) and nearest-neighbour
    resizing to the target size where the strides do not land on it.
    """

    def __init__(
        self,
        in_channels: int,
        in_width: int,
        in_level: int,
        out_level: int,
        out_channels: int,
        alpha: float,
        norm: NormFactory,
        act: Callable[[], nn.Module],
        padding: str = "same",
        downsample: str = "model_garden",
    ) -> None:
        super().__init__()
        if downsample not in DOWNSAMPLES:
            raise ValueError(f"unknown downsample {downsample!r}; expected one of {DOWNSAMPLES}")
        self.tpu = downsample == "tpu"
        mid = int(in_width * alpha)
        self.reduce = ConvNormAct(in_channels, mid, 1, norm, act, padding=padding)
        self.down = None
        if out_level > in_level:
            extra = 0 if self.tpu else out_level - in_level - 1  # tpu pools in forward
            pools = [max_pool(padding) for _ in range(extra)]
            self.down = nn.Sequential(
                ConvNormAct(mid, mid, 3, norm, act, stride=2, padding=padding), *pools
            )
        self.up_scale = 2 ** max(in_level - out_level, 0)
        self.expand = ConvNormAct(mid, out_channels, 1, norm, padding=padding)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        width = x.shape[-1]
        x = self.reduce(x)
        if self.down is not None:
            x = self.down(x)
            if self.tpu:
                x = tpu_downsample(x, width, size)
        elif self.up_scale > 1:
            # tensorflow/tpu resizes where the ratio is not an integer (legacy TF nearest, as
            # torch's "nearest"); where it is, both are the same repetition.
            x = (
                F.interpolate(x, size=size, mode="nearest")
                if self.tpu
                else upsample_to(x, self.up_scale, size)
            )
        return self.expand(x)


def tpu_downsample(x: torch.Tensor, width: int, size: tuple[int, int]) -> torch.Tensor:
    """The rest of tensorflow/tpu's downsampling after its stride-2 conv, from the parent's
    ``width`` to the target ``size``: for ratios above 2 one "same" max pool of size 3 (ratio
    up to 4) or 5 and stride ``ratio / 2`` (2 if the widths do not divide), then
    nearest-neighbour resizing if that misses the target size (e.g. 28 -> 4 at 224 pixels)."""
    ratio = width // size[1]
    if ratio > 2:
        stride = 2 if width % size[1] else ratio // 2
        x = same_max_pool(x, 3 if width / size[1] <= 4 else 5, stride)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="nearest")
    return x
