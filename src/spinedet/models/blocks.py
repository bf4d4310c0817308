"""Residual blocks, block groups and cross-scale resampling of SpineNet."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

from .layers import ConvNormAct, NormFactory, max_pool
from .specs import BLOCK_EXPANSION


class Bottleneck(nn.Module):
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
        super().__init__()
        out_channels = width * 4
        self.shortcut = (
            ConvNormAct(in_channels, out_channels, 1, norm, padding=padding)
            if in_channels != out_channels
            else nn.Identity()
        )
        self.conv1 = ConvNormAct(in_channels, width, 1, norm, act, padding=padding)
        self.conv2 = ConvNormAct(width, width, 3, norm, act, padding=padding)
        self.conv3 = ConvNormAct(width, out_channels, 1, norm, padding=padding)
        self.drop_path = StochasticDepth(drop_rate, "row") if drop_rate > 0 else nn.Identity()
        self.act = act()

    @property
    def last_norm(self) -> nn.Module:
        return self.conv3.norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv3(self.conv2(self.conv1(x)))
        return self.act(self.shortcut(x) + self.drop_path(out))


class Residual(nn.Module):
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
        super().__init__()
        self.shortcut = (
            ConvNormAct(in_channels, width, 1, norm, padding=padding)
            if in_channels != width
            else nn.Identity()
        )
        self.conv1 = ConvNormAct(in_channels, width, 3, norm, act, padding=padding)
        self.conv2 = ConvNormAct(width, width, 3, norm, padding=padding)
        self.drop_path = StochasticDepth(drop_rate, "row") if drop_rate > 0 else nn.Identity()
        self.act = act()

    @property
    def last_norm(self) -> nn.Module:
        return self.conv2.norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        return self.act(self.shortcut(x) + self.drop_path(out))


BLOCKS = {"bottleneck": Bottleneck, "residual": Residual}


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
    ) -> None:
        super().__init__()
        mid = int(in_width * alpha)
        self.reduce = ConvNormAct(in_channels, mid, 1, norm, act, padding=padding)
        self.down = None
        if out_level > in_level:
            pools = [max_pool(padding) for _ in range(out_level - in_level - 1)]
            self.down = nn.Sequential(
                ConvNormAct(mid, mid, 3, norm, act, stride=2, padding=padding), *pools
            )
        self.up_scale = 2 ** max(in_level - out_level, 0)
        self.expand = ConvNormAct(mid, out_channels, 1, norm, padding=padding)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = self.reduce(x)
        if self.down is not None:
            x = self.down(x)
        elif self.up_scale > 1:
            # Upsample by the exact power of two, then crop: level sizes are ceil(H / 2**l),
            # so a coarser map may cover one extra row/column.
            x = F.interpolate(x, scale_factor=self.up_scale, mode="nearest")
            x = x[..., : size[0], : size[1]]
        return self.expand(x)
