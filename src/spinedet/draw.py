"""Drawing instances over images: one colour per class, masks under boxes, readable labels.

Used for predictions (``spinedet predict``) and for ground truth (``spinedet data show``), so
both look alike and can be compared side by side.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import torch
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

__all__ = ["draw_instances", "palette"]


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
    masks: torch.Tensor | None = None,
) -> torch.Tensor:
    """``image`` (uint8 CHW) with ``masks`` (N, H, W bool), xyxy ``boxes`` and ``texts``,
    coloured by ``labels`` (1..``num_classes``)."""
    if not len(boxes):
        return image
    colours = palette(num_classes)
    colors = [colours[int(label) % len(colours)] for label in labels]
    if masks is not None and len(masks):
        image = draw_segmentation_masks(image, masks.bool(), alpha=0.45, colors=colors)
    font = _font()
    size = max(12, min(image.shape[-2:]) // 40)
    return draw_bounding_boxes(image, boxes, list(texts), colors=colors, width=2, font=font,
                               font_size=size if font else None)  # fmt: skip
