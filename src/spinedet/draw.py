"""Drawing instances over images: one colour per class, masks under boxes, readable labels.

Used for predictions (``spinedet predict``) and for ground truth (``spinedet data show``), so
both look alike and can be compared side by side.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import torch
from torchvision.utils import draw_bounding_boxes

from .masks import MaskCrops

__all__ = ["draw_instances", "draw_masks", "palette"]

MASK_ALPHA = 0.45


@cache
def _font() -> str | None:
    """A TrueType font shipped with matplotlib, for labels larger than the bitmap default."""
    try:
        from matplotlib import font_manager

        return font_manager.findfont("DejaVu Sans", fallback_to_default=False)
    except (ImportError, ValueError):
        return None


@cache
def palette(num_classes: int) -> list[tuple[int, int, int]]:
    """``num_classes + 1`` RGB colours (index 0 is background), from matplotlib's tab20."""
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return [tuple(int(255 * c) for c in cmap(i % 20)[:3]) for i in range(num_classes + 1)]


def draw_instances(
    image: torch.Tensor,
    boxes: torch.Tensor,
    labels: Sequence[int],
    texts: Sequence[str],
    num_classes: int,
    masks: torch.Tensor | MaskCrops | None = None,
) -> torch.Tensor:
    """``image`` (uint8 CHW) with ``masks`` (N, H, W bool, or crops), xyxy ``boxes`` and
    ``texts``, coloured by ``labels`` (1..``num_classes``)."""
    if not len(boxes):
        return image
    colours = palette(num_classes)
    colors = [colours[int(label) % len(colours)] for label in labels]
    if masks is not None and len(masks):
        crops = masks if isinstance(masks, MaskCrops) else MaskCrops.from_masks(masks)
        image = draw_masks(image, crops, colors)
    font = _font()
    # A 40th of the image's short side, but no taller than half the typical box: on a large
    # photo of small objects the labels would cover their neighbours.
    sides = (boxes[:, 2:] - boxes[:, :2]).min(dim=1).values
    size = max(12, min(min(image.shape[-2:]) // 40, int(sides.median()) // 2))
    return draw_bounding_boxes(image, boxes, list(texts), colors=colors, width=2, font=font,
                               font_size=size if font else None)  # fmt: skip


def draw_masks(
    image: torch.Tensor, masks: MaskCrops, colors: Sequence[tuple[int, int, int]]
) -> torch.Tensor:
    """torchvision's ``draw_segmentation_masks(image, masks.full(), MASK_ALPHA, colors)`` for a
    uint8 ``image``, equal pixel for pixel, from the crops: torchvision's loops over N full-size
    masks took 14 s and 10 GB for 100 on a 12-megapixel image (``benchmarks/mask_output.py``)."""
    size = image.shape[-2:]
    owner = torch.zeros(size, dtype=torch.int32)  # 1 + a mask the pixel is in; 0: none
    count = torch.zeros(size, dtype=torch.int32)  # how many
    for i, crop in enumerate(masks.crops):
        rows, cols = masks.window(i)
        owner[rows, cols].masked_fill_(crop, i + 1)
        count[rows, cols] += crop
    # As torchvision: each mask's pixels in its colour, where masks overlap black (entry 0),
    # then every pixel blended.
    table = torch.tensor([(0, 0, 0), *colors], dtype=torch.uint8).T
    drawn = torch.where(count > 0, table[:, owner.masked_fill_(count > 1, 0)], image)
    return (image * (1 - MASK_ALPHA) + drawn * MASK_ALPHA).to(torch.uint8)
