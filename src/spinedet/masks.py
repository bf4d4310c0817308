"""Binary instance masks kept as crops of their image.

A Mask R-CNN's mask is zero outside its box, so on a 12-megapixel photo nearly all of a full-size
mask is zeros: 100 of them are 1.2 GB as bool tensors (4.8 GB as the float probabilities they
are thresholded from), and resizing, drawing and encoding them touched every pixel of each.
:class:`MaskCrops` keeps each mask as the crop of the image that holds its pixels and where the
crop lies; :func:`resize_masks` computes only those crops, drawing and COCO RLE read them, and
:meth:`MaskCrops.full` makes the full tensors when asked for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.nn import functional as F

__all__ = ["MaskCrops", "cut_mask", "resize_masks"]

# Outputs up to this many pixels are resized by torch's 2D kernel itself: cheap there, and
# below 128 rows + columns that kernel takes a vectorised path whose rounding the 1D passes of
# resize_masks do not reproduce.
_SMALL = 128 * 128


@dataclass(frozen=True)
class MaskCrops:
    """N binary masks of an ``image_size`` (H, W) image: mask i is ``crops[i]`` ((h, w) bool)
    with its top-left pixel at ``origins[i]`` (row, column), and empty elsewhere."""

    crops: list[torch.Tensor]
    origins: list[tuple[int, int]]
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.crops)

    @classmethod
    def from_masks(cls, masks: torch.Tensor) -> MaskCrops:
        """(N, H, W) masks (bool or 0/1), each cut to the rows and columns it has pixels in."""
        cut = [cut_mask(mask.bool(), 0, 0) for mask in masks.cpu()]
        return cls([c for c, _ in cut], [o for _, o in cut], tuple(masks.shape[-2:]))

    def window(self, i: int) -> tuple[slice, slice]:
        """The rows and columns of the image that mask ``i``'s crop covers."""
        (top, left), (height, width) = self.origins[i], self.crops[i].shape
        return slice(top, top + height), slice(left, left + width)

    def full(self) -> torch.Tensor:
        """The (N, H, W) bool masks."""
        masks = torch.zeros((len(self), *self.image_size), dtype=torch.bool)
        for i, crop in enumerate(self.crops):
            masks[i][self.window(i)] = crop
        return masks

    def to_rle(self) -> list[dict[str, Any]]:
        """COCO RLE dicts (``counts`` a str), equal to pycocotools' ``encode`` of :meth:`full`."""
        height, width = self.image_size
        runs = [{"size": [height, width], "counts": self._runs(i)} for i in range(len(self))]
        rles = mask_utils.frPyObjects(runs, height, width) if runs else []
        return [{"size": [height, width], "counts": r["counts"].decode("ascii")} for r in rles]

    def _runs(self, i: int) -> list[int]:
        """Mask ``i``'s run lengths as pycocotools counts them: column by column, alternately
        unset and set, from an unset run (of 0 pixels if the first pixel is set). Only the
        image's columns the crop spans are looked at, whole; the others are unset."""
        height, width = self.image_size
        rows, cols = self.window(i)
        strip = np.zeros((cols.stop - cols.start, height), np.uint8)  # a column per row
        strip[:, rows] = self.crops[i].T.numpy()
        flat = strip.ravel()
        edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        runs = np.diff(edges, prepend=0, append=flat.size).tolist()
        if flat.size and flat[0]:
            runs.insert(0, 0)
        runs[0] += cols.start * height
        after = (width - cols.stop) * height
        if len(runs) % 2:  # ends unset
            runs[-1] += after
        elif after:
            runs.append(after)
        return runs


def cut_mask(mask: torch.Tensor, top: int, left: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``mask`` (a crop at ``(top, left)``) cut to the rows and columns it has pixels in."""
    rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
    if not len(rows):
        return mask[:0, :0], (0, 0)
    r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    # A copy: a view would keep the whole mask it was cut from.
    return mask[r0:r1, c0:c1].clone(), (top + r0, left + c0)


def _reach(first: int, last: int, size: int, out: int) -> tuple[int, int]:
    """The output pixels (start, stop) that bilinear resizing (``align_corners=False``) of a
    ``size``-pixel axis to ``out`` pixels reads from input pixels ``first..last``: pixel y reads
    ``floor(s)`` and the next, ``s = (y + 0.5) * size / out - 0.5``; one more each side for
    the kernel's float rounding of ``s``."""
    scale = out / size
    start = math.floor((first - 0.5) * scale - 0.5) - 1
    stop = math.ceil((last + 1.5) * scale - 0.5) + 1
    return max(0, start), min(out, stop)


def resize_masks(probs: torch.Tensor, size: tuple[int, int]) -> MaskCrops:
    """``F.interpolate(p[None, None], size, mode="bilinear")[0, 0] > 0.5`` for each (h, w) map
    ``p`` of ``probs`` (N, h, w), bit for bit, as crops on the CPU, computed only near each map's
    nonzero pixels (the rest of a resized map is 0).

    On the CPU, float32 and outputs over ``_SMALL`` pixels, torch's bilinear kernel computes
    each output as the linear resize, along the rows, of the linear resizes of the two input
    rows it reads, along the columns: the same float operations as its 1D kernel twice. The
    columns pass runs on the rows that have nonzero pixels and the rows pass on the crop's
    columns; each pass keeps the full output length, since the kernel's weights depend on the
    output pixel's index. Elsewhere (another device or dtype, small outputs) each map is
    resized whole by the 2D kernel, one at a time, and cropped.
    """
    height, width = size
    crops, origins = [], []
    separable = probs.device.type == "cpu" and probs.dtype == torch.float32
    separable = separable and height * width > _SMALL
    for prob in probs:
        h, w = prob.shape
        rows, cols = prob.ne(0).any(1).nonzero()[:, 0], prob.ne(0).any(0).nonzero()[:, 0]
        if not len(rows):  # resizes to all zeros
            crops.append(torch.zeros(0, 0, dtype=torch.bool))
            origins.append((0, 0))
            continue
        first, last = int(rows[0]), int(rows[-1])
        y0, y1 = _reach(first, last, h, height)
        x0, x1 = _reach(int(cols[0]), int(cols[-1]), w, width)
        if (h, w) == size:
            resized = prob[y0:y1, x0:x1]
        elif separable:
            across = F.interpolate(prob[None, first : last + 1], width, mode="linear")[0]
            columns = prob.new_zeros(x1 - x0, h)  # the crop's columns, over all input rows
            columns[:, first : last + 1] = across[:, x0:x1].T
            resized = F.interpolate(columns[None], height, mode="linear")[0, :, y0:y1].T
        else:
            resized = F.interpolate(prob[None, None], size, mode="bilinear")[0, 0, y0:y1, x0:x1]
        crop, origin = cut_mask((resized > 0.5).cpu(), y0, x0)
        crops.append(crop)
        origins.append(origin)
    return MaskCrops(crops, origins, (height, width))
