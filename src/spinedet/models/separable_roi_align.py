"""RoIAlign as two matrix products, for training on a CPU.

torchvision's CPU RoIAlign backward scatters every output gradient into the features one
element at a time on one thread: in the quickstart's Mask R-CNN step it took a fifth of the
time. Bilinear sampling is separable, so each roi's crop is ``Ry @ F @ Rx.T`` with a sparse
interpolation matrix per axis; as dense GEMMs over each image's rois, forward and backward run
multi-threaded and 2.2-4.9x faster than torchvision's at the quickstart's sizes; the dense
products grow with the feature map, so large maps keep torchvision's (:func:`separable_pays`,
``benchmarks/roi_align_cpu.py``).
"""

from __future__ import annotations

import torch

__all__ = ["separable_pays", "separable_roi_align"]

# The dense products grow with the feature map (and their outputs with the boxes per image);
# torchvision's cost per output element does not. Measured on 2 cores (roi_align_cpu.py): 24 x 24
# 2.2-4.9x faster, 48 x 48 with 64 boxes per image 2x, 40 x 40 with 512 boxes per image 1.0x,
# 80 x 80 0.7x.
MAX_PIXELS = 32 * 32


def separable_pays(features: torch.Tensor) -> bool:
    """Whether :func:`separable_roi_align` beats torchvision's backward on these features."""
    return features.shape[-2] * features.shape[-1] <= MAX_PIXELS


def _axis_weights(
    start: torch.Tensor, end: torch.Tensor, size: int, output_size: int, sampling_ratio: int
) -> torch.Tensor:
    """(K, output_size, size): each output cell's mean bilinear weight over ``size`` feature
    cells, following torchvision's ``roi_align(aligned=True)`` sample for sample."""
    bin_size = (end - start) / output_size
    cells = torch.arange(output_size, dtype=start.dtype, device=start.device)[:, None]
    offsets = torch.arange(sampling_ratio, dtype=start.dtype, device=start.device) + 0.5
    pos = start[:, None, None] + (cells + offsets / sampling_ratio) * bin_size[:, None, None]
    inside = (pos >= -1) & (pos <= size)  # farther out, a sample is zero
    pos = pos.clamp(min=0)
    low = pos.floor().clamp(max=size - 1)
    pos = torch.where(low >= size - 1, low, pos)  # at the last cell, sample it exactly
    high = (low + 1).clamp(max=size - 1)
    frac = pos - low
    index = torch.arange(size, dtype=start.dtype, device=start.device)
    weights = (1 - frac)[..., None] * (index == low[..., None]) + frac[..., None] * (
        index == high[..., None]
    )
    return (weights * inside[..., None]).sum(2) / sampling_ratio


def separable_roi_align(
    features: torch.Tensor,
    rois: torch.Tensor,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
) -> torch.Tensor:
    """``torchvision.ops.roi_align(..., aligned=True)`` for ``sampling_ratio > 0``, equal up to
    float rounding. ``rois`` are ``(batch_index, x0, y0, x1, y1)``; the ``(K, C, h, w)`` result
    is laid out channels-last, which the convolutions after it take as it is."""
    n, channels, height, width = features.shape
    out_h, out_w = output_size
    x0, y0, x1, y1 = (rois[:, 1:] * spatial_scale - 0.5).unbind(1)
    rows = _axis_weights(y0, y1, height, out_h, sampling_ratio).to(features.dtype)
    cols = _axis_weights(x0, x1, width, out_w, sampling_ratio).to(features.dtype)
    image = rois[:, 0].long()
    order = torch.argsort(image, stable=True)
    crops = []
    for i, index in enumerate(order.split(torch.bincount(image, minlength=n).tolist())):
        k = len(index)
        if not k:
            continue
        # (k * h, H) @ (H, C * W): each roi's rows, for every channel and column at once.
        by_row = rows[index].reshape(k * out_h, height) @ features[i].transpose(0, 1).reshape(
            height, channels * width
        )
        # Then its columns: (k * h) products of (w, W) @ (W, C) give (k, h, w, C).
        col = cols[index][:, None].expand(k, out_h, out_w, width).reshape(k * out_h, out_w, width)
        crop = torch.bmm(col, by_row.view(k * out_h, channels, width).transpose(1, 2))
        crops.append(crop.view(k, out_h, out_w, channels))
    if not crops:
        return features.new_zeros((0, channels, out_h, out_w))
    crops = torch.cat(crops)
    return torch.empty_like(crops).index_copy_(0, order, crops).permute(0, 3, 1, 2)
