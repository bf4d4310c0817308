"""Training targets for a whole batch at once: boxes matched to ground truth, and the balanced
samples of them that the losses see.

torchvision matches and samples image by image (``Matcher``, ``BalancedPositiveNegativeSampler``),
with boolean indexing and ``torch.where`` whose sizes the host must read from the device, and a
``randperm`` per image and kind. On a GPU, where the network itself replays as CUDA graphs, those
loops are most of a two-stage detector's step. The functions here give the same matches (the same
IoU arithmetic, thresholds and low-quality rule) for the batch with fixed shapes, and samples
drawn uniformly as torchvision's: the same counts per image and kind, from another random stream.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torchvision.models.detection._utils import Matcher

from .host_data import device_tensor

__all__ = [
    "balanced_sample",
    "match",
    "pad_boxes",
    "pad_rows",
    "pairwise_intersection",
    "pairwise_iou",
]


def pad_rows(rows: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-image (N_i, ...) tensors as (B, N, ...), zero-padded to at least one row, and which
    rows are real, (B, N)."""
    lengths = [len(r) for r in rows]
    width = max([*lengths, 1])  # from Python ints: no host read of a tensor
    padded = pad_sequence(rows, batch_first=True)
    padded = torch.nn.functional.pad(
        padded, (0, 0) * (padded.dim() - 2) + (0, width - padded.shape[1])
    )
    counts = device_tensor(lengths, padded.device)
    return padded, torch.arange(width, device=padded.device) < counts[:, None]


def pad_boxes(boxes: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-image (G_i, 4) boxes as (B, G, 4) and which rows are real, as :func:`pad_rows`."""
    return pad_rows([b.reshape(-1, 4) for b in boxes])


def pairwise_intersection(a: Tensor, b: Tensor) -> Tensor:
    """The area every (..., G, 4) xyxy box of ``a`` shares with every (..., N, 4) box of ``b``:
    (..., G, N), torchvision's ``box_iou`` arithmetic."""
    lt = torch.max(a[..., :, None, :2], b[..., None, :, :2])
    rb = torch.min(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def pairwise_iou(gt: Tensor, boxes: Tensor) -> Tensor:
    """IoU of every (B, G, 4) ground-truth box with every (B, N, 4) box of its image: (B, G, N),
    torchvision's ``box_iou`` arithmetic."""
    area_gt = (gt[..., 2] - gt[..., 0]) * (gt[..., 3] - gt[..., 1])
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    inter = pairwise_intersection(gt, boxes)
    return inter / (area_gt[:, :, None] + area[:, None] - inter)


def match(matcher: Matcher, quality: Tensor, real: Tensor) -> Tensor:
    """``matcher`` applied to each image's (G, N) slice of ``quality`` (B, G, N) restricted to its
    ``real`` ground truth (B, G): (B, N) matched indices, ``Matcher.BELOW_LOW_THRESHOLD`` (-1) or
    ``Matcher.BETWEEN_THRESHOLDS`` (-2). An image without ground truth matches nothing (-1), as
    torchvision's detectors treat it."""
    quality = quality.masked_fill(~real[..., None], -1.0)  # below any IoU
    best, matches = quality.max(dim=1)
    out = torch.where(best < matcher.low_threshold, matcher.BELOW_LOW_THRESHOLD, matches)
    between = (best >= matcher.low_threshold) & (best < matcher.high_threshold)
    out = torch.where(between, matcher.BETWEEN_THRESHOLDS, out)
    if matcher.allow_low_quality_matches:
        # Each ground truth's best boxes (ties included) keep their best match.
        highest = quality.amax(dim=2, keepdim=True)
        chosen = ((quality == highest) & real[..., None]).any(dim=1)
        out = torch.where(chosen, matches, out)
    return out


def balanced_sample(labels: Tensor, size: int, positive_fraction: float) -> tuple[Tensor, Tensor]:
    """torchvision's ``BalancedPositiveNegativeSampler`` for a batch of (B, N) labels (>= 1
    positive, 0 negative, < 0 ignored): per image up to ``size * positive_fraction`` positives and
    the rest of ``size`` negatives, each a uniform random subset. Returns (B, N) masks of the
    sampled positives and negatives."""
    keys = torch.rand(labels.shape, device=labels.device)
    outside = torch.full_like(keys, 2.0)  # above every key: never sampled
    positive = _smallest(torch.where(labels >= 1, keys, outside), int(size * positive_fraction))
    quota = size - positive.sum(1, keepdim=True)
    negative = _smallest(torch.where(labels == 0, keys, outside), size, quota)
    return positive, negative


def _smallest(keys: Tensor, k: int, quota: Tensor | None = None) -> Tensor:
    """(B, N) mask of each row's ``k`` (or ``quota``, (B, 1)) smallest keys below 2."""
    k = min(k, keys.shape[1])
    values, index = keys.topk(k, dim=1, largest=False)  # ascending
    take = values < 2
    if quota is not None:
        take &= torch.arange(k, device=keys.device) < quota
    return torch.zeros_like(keys, dtype=torch.bool).scatter(1, index, take)
