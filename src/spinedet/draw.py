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
    size = max(12, min(image.shape[-2:]) // 40)
    return draw_bounding_boxes(image, boxes, list(texts), colors=colors, width=2, font=font,
                               font_size=size if font else None)  # fmt: skip


def draw_masks(
    image: torch.Tensor, masks: MaskCrops, colors: Sequence[tuple[int, int, int]]
) -> torch.Tensor:
    """torchvision's ``draw_segmentation_masks(image, masks.full(), MASK_ALPHA, colors)`` for a
    uint8 ``image``, equal pixel for pixel, from the crops, blending only the masks' pixels:
    torchvision's loops over N full-size masks took 14 s and 10 GB for 100 on a 12-megapixel
    image (``benchmarks/mask_output.py``), its blend of every pixel 2-3 s more."""
    if not len(masks):
        return image
    windows = [masks.window(i) for i in range(len(masks))]
    top, left = min(r.start for r, _ in windows), min(c.start for _, c in windows)
    bottom, right = max(r.stop for r, _ in windows), max(c.stop for _, c in windows)
    owner = torch.zeros(bottom - top, right - left, dtype=torch.int32)  # 1 + a mask; 0: none
    count = torch.zeros_like(owner)  # how many masks hold the pixel
    for i, (crop, (rows, cols)) in enumerate(zip(masks.crops, windows, strict=True)):
        window = (slice(rows.start - top, rows.stop - top),
                  slice(cols.start - left, cols.stop - left))  # fmt: skip
        owner[window].masked_fill_(crop, i + 1)
        count[window] += crop
    # As torchvision: each mask's pixels in its colour, where masks overlap black (entry 0),
    # blended in float32 and truncated. A pixel outside the masks, blended with itself, keeps
    # its value at this alpha (test_masks checks it): those are left as they are.
    table = torch.tensor([(0, 0, 0), *colors], dtype=torch.uint8).T
    inside = count > 0
    colour = table[:, owner[inside].masked_fill_(count[inside] > 1, 0)]
    drawn = image.clone()
    region = drawn[:, top:bottom, left:right]
    region[:, inside] = (region[:, inside] * (1 - MASK_ALPHA) + colour * MASK_ALPHA).to(torch.uint8)
    return drawn
