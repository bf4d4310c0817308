"""Detection post-processing for a whole batch at once, with shapes that do not depend on the
data.

torchvision's detectors select detections image by image and level by level: boolean masks
whose sizes the host must read, an NMS per image (on a GPU, past 25,000 candidates, one per
class: 90 for COCO), and a resize per pasted mask, each a few kernels and often a wait for the
device. At inference on a GPU those loops take longer than the network. The functions here
select the same detections for the batch: the eager detectors
(``rcnn.BatchedRoIHeads``, :class:`DetectionTransform`, ``detectors.BackgroundFreeRetinaNet``)
and the traced export graph (:mod:`spinedet.export.graph`) share them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder, _topk_min
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import batched_nms, nms
from torchvision.transforms.v2 import functional as TF

from ..masks import MaskCrops, cut_mask
from .host_data import cached_constant, device_tensor

__all__ = [
    "DetectionTransform",
    "best_detections",
    "first_survivors",
    "class_candidates",
    "level_candidates",
    "paste_mask_crops",
    "paste_masks",
    "pasting_crops",
    "retinanet_candidates",
    "select_detections",
    "selection_setting",
]


# What ``models.selecting`` sets for the calls in its block, per selection module (by id): a
# context's own (per thread and asyncio task), so that other callers of the same model at the
# same time keep the model's own settings.
SELECTION: ContextVar[dict[int, dict[str, Any]] | None] = ContextVar(
    "spinedet_selection", default=None
)


def selection_setting(module: torch.nn.Module, name: str) -> Any:
    """``module``'s ``name`` (``score_thresh``, ``nms_thresh``, ``detections_per_img`` or
    ``kept_labels``) as ``models.selecting`` set it for this context, else its own."""
    settings = (SELECTION.get() or {}).get(id(module), {})
    return settings.get(name, getattr(module, name))


def clip_to(boxes: Tensor, limits: Tensor) -> Tensor:
    """``clip_boxes_to_image`` against (w, h, w, h) limits broadcast over ``boxes`` (a traced
    size stays symbolic)."""
    return boxes.clamp(min=0).minimum(limits)


def image_limits(image_shapes: list[tuple[int, int]], like: Tensor) -> Tensor:
    """(N, 1, 4) clipping limits (w, h, w, h) of each image, ``like``'s dtype and device."""
    limits = [[[w, h, w, h]] for h, w in image_shapes]
    if torchvision._is_tracing():  # traced sizes are tensors: stay symbolic
        return like.new_tensor(limits)
    return device_tensor(limits, like.device, like.dtype)


def large_enough(boxes: Tensor, min_size: float) -> Tensor:
    """torchvision's ``remove_small_boxes`` as a mask."""
    sides = boxes[..., 2:] - boxes[..., :2]
    return (sides[..., 0] >= min_size) & (sides[..., 1] >= min_size)


def gather_rows(index: Tensor, *values: Tensor) -> list[Tensor]:
    """``values[i][n, index[n, k]]`` for (N, P) or (N, P, 4) tensors."""
    out = []
    for v in values:
        i = index[..., None].expand(-1, -1, v.shape[-1]) if v.dim() == 3 else index
        out.append(v.gather(1, i))
    return out


def level_candidates(
    logits: Tensor, deltas: Tensor, anchors: Tensor, box_coder: BoxCoder, k: int
) -> tuple[Tensor, Tensor, Tensor]:
    """One pyramid level's RetinaNet candidates, as torchvision's
    ``RetinaNet.postprocess_detections`` takes them image by image: the ``k`` best class
    probabilities of each image with their decoded boxes and labels. The background (class 0)
    never counts. ``logits`` (N, A, C), ``deltas`` (N, A, 4), ``anchors`` (A, 4) shared by the
    batch; returns boxes (N, k, 4), scores and labels (N, k)."""
    classes = logits.shape[-1]
    background = torch.zeros(1, dtype=torch.long, device=logits.device)
    scores = logits.index_fill(-1, background, float("-inf")).sigmoid().flatten(1)
    top, index = scores.topk(_topk_min(scores, k, 1), dim=1)
    anchor = torch.div(index, classes, rounding_mode="floor")
    delta = deltas.gather(1, anchor[..., None].expand(-1, -1, 4))
    boxes = box_coder.decode_single(delta.reshape(-1, 4), anchors[anchor.flatten()])
    return boxes.reshape(delta.shape), top, index % classes


def retinanet_candidates(
    levels: Iterable[tuple[Tensor, Tensor, Tensor]], box_coder: BoxCoder, k: int, limits: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`level_candidates` of every level's (logits, deltas, anchors), concatenated, the
    boxes clipped to the images' (w, h, w, h) ``limits``: boxes (N, P, 4), scores, labels."""
    boxes, scores, labels = zip(
        *(level_candidates(*level, box_coder, k) for level in levels), strict=True
    )
    return clip_to(torch.cat(boxes, 1), limits), torch.cat(scores, 1), torch.cat(labels, 1)


def class_candidates(
    logits: Tensor, regression: Tensor, proposals: Tensor, limits: Tensor, box_coder: BoxCoder
) -> tuple[Tensor, Tensor, Tensor]:
    """An R-CNN box head's candidates, as torchvision's ``RoIHeads.postprocess_detections``
    forms them: one box per proposal and object class, decoded and clipped, with its softmax
    score. ``logits`` (N * R, C), ``regression`` (N * R, C * 4), ``proposals`` (N, R, 4),
    ``limits`` (N, 1, 4); returns boxes (N, R * (C - 1), 4), scores and labels (N, R * (C - 1)),
    proposal by proposal."""
    n, r = proposals.shape[0], proposals.shape[1]
    classes = logits.shape[-1]
    boxes = box_coder.decode_single(regression, proposals.reshape(-1, 4))
    boxes = clip_to(boxes.reshape(n, r, classes, 4), limits[:, None])[:, :, 1:].reshape(n, -1, 4)
    scores = F.softmax(logits, -1).reshape(n, r, classes)[:, :, 1:].reshape(n, -1)
    labels = torch.arange(1, classes, device=logits.device).repeat(r).expand(n, -1)
    return boxes, scores, labels


def nms_by_group(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """Class-wise NMS: one NMS with the groups moved apart, as torchvision's ``batched_nms``
    does up to 1,000 boxes on a CPU (past them its per-group loop is the faster there, and
    taken here too). On a GPU always one (torchvision loops past 25,000 boxes, one NMS and one
    host wait per group); the shift is made on the device (torchvision copies its 1 there, a
    wait for the device)."""
    if not len(boxes):
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    if not boxes.is_cuda and len(boxes) > 1000 and not torchvision._is_tracing():
        return batched_nms(boxes, scores, groups, iou_threshold)
    offsets = groups.to(boxes.dtype) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def select_detections(
    boxes: Tensor,
    scores: Tensor,
    groups: Tensor,
    keep: Tensor,
    num_groups: int,
    iou_threshold: float,
    k: int,
) -> tuple[Tensor, Tensor]:
    """NMS within each image and group (class or level) of the candidates where ``keep``, and
    each image's best ``k`` survivors, as torchvision selects them image by image.

    ``boxes`` (N, P, 4), ``scores``, ``groups`` (in ``0..num_groups - 1``) and ``keep`` (N, P).
    Returns ``(index, found)``, both (N, k): the candidates' indices along P, best first, and
    whether the slot holds one (an image may have fewer than ``k``; its found slots come first).
    """
    n, p = scores.shape[0], scores.shape[1]
    flat = keep.flatten().nonzero()[:, 0]
    image = torch.div(flat, p, rounding_mode="floor")
    group = groups.flatten()[flat] + image * num_groups
    # One zero-area candidate of its own group, scored below every probability, keeps NMS
    # from an empty input (traced graphs cannot branch on it); it never suppresses anything.
    sentinel = flat.shape[0]
    kept = nms_by_group(
        torch.cat([boxes.reshape(-1, 4)[flat], boxes.new_zeros(1, 4)]),
        torch.cat([scores.flatten()[flat], scores.new_full((1,), -1.0)]),
        torch.cat([group, group.new_full((1,), -1)]),
        iou_threshold,
    )
    chosen = flat[kept[kept != sentinel]]  # best first over the whole batch
    image = torch.div(chosen, p, rounding_mode="floor")
    same = image[:, None] == torch.arange(n, device=image.device)[None]
    rank = same.long().cumsum(0).gather(1, image[:, None])[:, 0] - 1  # place in its image
    inside = (rank < k).nonzero()[:, 0]
    slots = (image * k + rank)[inside]
    table = torch.full_like(scores[:, :1], -1, dtype=torch.long).repeat(1, k).flatten()
    table = table.scatter(0, slots, chosen[inside]).reshape(-1, k)
    found = table >= 0
    offsets = torch.arange(n, device=table.device)[:, None] * p
    return torch.where(found, table - offsets, 0), found


def best_detections(
    boxes: Tensor,
    scores: Tensor,
    groups: Tensor,
    keep: Tensor,
    num_groups: int,
    iou_threshold: float,
    k: int,
) -> tuple[Tensor, Tensor]:
    """:func:`select_detections` for eager code, which may look at the result: NMS on each
    image's ``4 k`` best candidates first, on more only where that found fewer than ``k``.

    Greedy NMS keeps a candidate unless a better one of its group suppressed it, so the
    survivors among the best candidates are the survivors of all candidates that rank there;
    once ``k`` survive, they are the ``k`` best. (A Mask R-CNN has 90,000 candidates an image
    at a score threshold of 0, of which it keeps 100.)
    """
    total = scores.shape[1]
    if not total:  # no proposals in any image
        found = keep.new_zeros(len(keep), k)
        return found.long(), found
    width = 4 * k
    if width < total:  # equal scores in candidate order, as NMS sorts them
        best = torch.where(keep, scores, float("-inf")).sort(dim=1, descending=True, stable=True)
    while width < total:
        ranked = best.indices[:, :width].sort(dim=1).values  # the best, in candidate order
        subset = gather_rows(ranked, boxes, scores, groups, keep)
        index, found = select_detections(*subset, num_groups, iou_threshold, k)
        if not (~found[:, -1] & (keep.sum(1) > width)).any():
            return ranked.gather(1, index), found
        width *= 4
    return select_detections(boxes, scores, groups, keep, num_groups, iou_threshold, k)


def first_survivors(
    boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float, k: int
) -> Tensor:
    """The best ``k`` survivors of :func:`nms_by_group` on one image's (P, 4) ``boxes``, best
    first, from NMS on its ``2 k`` best candidates first (exact, as :func:`best_detections`).

    NMS compares every pair of its candidates and then keeps them one by one in a serial scan
    on the device (torchvision's ``gather_keep_from_mask``: 18 ms of an H100's Mask R-CNN
    training step for the RPN's 10,000 candidates an image, of which it keeps 2,000)."""
    width = 2 * k
    if width < len(scores):  # equal scores in candidate order, as NMS sorts them
        best = scores.sort(descending=True, stable=True).indices
    while width < len(scores):
        ranked = best[:width].sort().values  # the best, in candidate order
        kept = nms_by_group(boxes[ranked], scores[ranked], groups[ranked], iou_threshold)
        if len(kept) >= k:
            return ranked[kept[:k]]
        width *= 2
    return nms_by_group(boxes, scores, groups, iou_threshold)[:k]


def split_detections(index: Tensor, found: Tensor, **values: Tensor) -> list[dict[str, Tensor]]:
    """Per-image dicts of the ``values`` (N, P, ...) at :func:`select_detections`' choices."""
    counts = found.sum(1).tolist()
    index = index[:, : max(counts, default=0)]  # found slots come first
    chosen = dict(zip(values, gather_rows(index, *values.values()), strict=True))
    return [{key: v[i, :count] for key, v in chosen.items()} for i, count in enumerate(counts)]


class DetectionTransform(GeneralizedRCNNTransform):
    """torchvision's detector transform, which leaves images already at their size as they
    are, normalises with mean and std copied to the device once (not twice per image, each a
    wait for it) and pastes an image's masks with one batched product (:func:`paste_masks`)
    instead of one resize and copy per mask.

    At inference it also takes uint8 images (as ``ToDtype(float32, scale=True)`` would give
    them) and shrinks a larger image antialiased, in its own dtype, before normalising it: as
    training's scale jitter and :class:`~spinedet.Predictor` do, where torchvision's bilinear
    reads 4 pixels of every (1 / scale)^2 and the objects' edges alias; and a 12-megapixel
    photo is normalised at the model's size, not its own (0.4 s a photo on a CPU core), and
    reaches the model from the loader as a quarter of the bytes.
    """

    def normalize(self, image: Tensor) -> Tensor:
        if self._scale(image) < 1:
            return image  # resize() normalises it, once shrunk
        return self._normalized(image)

    def resize(
        self, image: Tensor, target: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        scale = self._scale(image)
        # At scale 1 torchvision's bilinear (image), nearest (masks) and box resizing copy
        # their input: a dozen kernels an image, for batches the data pipeline already sized.
        if scale == 1.0:
            return image, target
        if scale < 1:
            if target is None:  # torchvision's size: the floor of each side x scale
                size = [math.floor(side * scale) for side in image.shape[-2:]]
                return self._normalized(TF.resize(image, size, antialias=True)), None
            image = self._normalized(image)  # with targets, in torchvision's order
        return super().resize(image, target)

    def _scale(self, image: Tensor) -> float:
        """The scale torchvision's resize takes ``image`` by; inf where it is not known
        beforehand (while tracing or scripting, several or fixed sizes)."""
        tracing = torchvision._is_tracing() or torch.jit.is_scripting()
        if len(self.min_size) != 1 or self.fixed_size is not None or tracing:
            return math.inf
        short, long = sorted(image.shape[-2:])
        return min(self.min_size[0] / short, self.max_size / long)

    def _normalized(self, image: Tensor) -> Tensor:
        """``image`` in [0, 1] (uint8 scaled as torchvision's ``to_dtype`` scales it), less the
        mean, over the std."""
        if not image.is_floating_point():
            if image.dtype != torch.uint8:
                return super().normalize(image)  # torchvision's error
            image = TF.to_dtype(image, torch.float32, scale=True)
        mean = cached_constant(self, "mean", self.image_mean, image)[:, None, None]
        std = cached_constant(self, "std", self.image_std, image)[:, None, None]
        return (image - mean) / std

    def postprocess(
        self,
        result: list[dict[str, Tensor]],
        image_shapes: list[tuple[int, int]],
        original_image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        if self.training:
            return result
        for pred, size, original in zip(result, image_shapes, original_image_sizes, strict=True):
            pred["boxes"] = resize_boxes(pred["boxes"], size, original)
            if "masks" in pred:
                probs = pred["masks"]
                # In float32 whatever the autocast: these are output probabilities.
                with torch.autocast(probs.device.type, enabled=False):
                    args = probs[:, 0].float(), pred["boxes"].float(), *original
                    if _CROPS.get():
                        pred["masks"] = paste_mask_crops(*args, dtype=probs.dtype)
                    else:
                        pred["masks"] = paste_masks(*args).to(probs.dtype)[:, None]
        return result


# Whether DetectionTransform gives masks as MaskCrops: a context's setting (per thread and
# asyncio task), so that a model shared with other callers keeps torchvision's output for them.
_CROPS: ContextVar[bool] = ContextVar("spinedet_mask_crops", default=False)


@contextmanager
def pasting_crops(crops: bool = True) -> Iterator[None]:
    """Within the block, spinedet's Mask R-CNNs give each image's ``masks`` as the binary
    :class:`~spinedet.masks.MaskCrops` of their pasted probabilities above 0.5
    (:func:`paste_mask_crops`) rather than torchvision's (N, 1, H, W) probabilities: memory
    and time that grow with the masks' boxes rather than with the image's size times their
    count (4.8 GB for 100 masks of a 12-megapixel image). ``crops`` False: torchvision's, also
    where the caller's context asked for crops."""
    token = _CROPS.set(crops)
    try:
        yield
    finally:
        _CROPS.reset(token)


def paste_masks(probs: Tensor, boxes: Tensor, height: int, width: int) -> Tensor:
    """torchvision's ``paste_masks_in_image`` for (R, M, M) mask probabilities and (R, 4)
    boxes, as one batched product: (R, height, width).

    torchvision pads each mask by one pixel, widens its box by (M + 2) / M, truncates the box
    to whole pixels and resizes the mask bilinearly (``align_corners=False``) onto it. Bilinear
    resizing is separable, so each pasted mask is ``rows @ mask @ cols.T`` with the (H, M + 2)
    and (W, M + 2) interpolation weights of its box (zero outside it): the same values up to
    float rounding, with shapes that do not depend on the boxes.
    """
    padded, low, high = _pasting(probs, boxes)
    size = padded.shape[-1]
    rows = _resize_weights(low[:, 1], high[:, 1], height, size)
    cols = _resize_weights(low[:, 0], high[:, 0], width, size)
    return rows @ padded @ cols.transpose(1, 2)


# Elements of float32 products one batch of paste_mask_crops computes at most (128 MB): a batch
# is as tall and wide as its largest window, which on a 12-megapixel image may be all of it.
CROP_BUDGET = 1 << 25


def paste_mask_crops(
    probs: Tensor, boxes: Tensor, height: int, width: int, dtype: torch.dtype | None = None
) -> MaskCrops:
    """``paste_masks(probs, boxes, height, width).to(dtype) > 0.5`` as :class:`MaskCrops`: the
    products only over each box's pixels (clipped to the image), in batches of masks of
    similar window size. (``dtype``: the probabilities' own, as the model returns them.)"""
    padded, low, high = _pasting(probs, boxes)
    size = padded.shape[-1]
    start = low.clamp(min=0)
    stop = torch.minimum(high + 1, high.new_tensor([width, height]))
    windows = torch.cat([start, (stop - start).clamp(min=0)], 1).tolist()  # x, y, w, h
    cut: list[tuple[Tensor, tuple[int, int]]] = [None] * len(windows)  # type: ignore[list-item]
    for batch in _window_batches(windows):
        index = torch.tensor(batch, device=probs.device)
        tall = max(windows[i][3] for i in batch)
        wide = max(windows[i][2] for i in batch)
        rows = _resize_weights(low[index, 1], high[index, 1], tall, size, start[index, 1])
        cols = _resize_weights(low[index, 0], high[index, 0], wide, size, start[index, 0])
        pasted = rows @ padded[index] @ cols.transpose(1, 2)
        binary = (pasted.to(dtype or probs.dtype) > 0.5).cpu()
        for i, mask in zip(batch, binary, strict=True):
            x, y, w, h = windows[i]
            cut[i] = cut_mask(mask[:h, :w], y, x)
    return MaskCrops([c for c, _ in cut], [o for _, o in cut], (height, width))


def _window_batches(windows: list[list[int]]) -> list[list[int]]:
    """The masks' indices in batches, largest window first, each batch's (count, tallest,
    widest) product within ``CROP_BUDGET`` (a mask larger than that alone)."""
    order = sorted(range(len(windows)), key=lambda i: -windows[i][2] * windows[i][3])
    batches: list[list[int]] = []
    tall = wide = 0
    for i in order:
        w, h = windows[i][2:]
        grown = (max(tall, h), max(wide, w))
        if batches and (len(batches[-1]) + 1) * grown[0] * grown[1] <= CROP_BUDGET:
            batches[-1].append(i)
            tall, wide = grown
        else:
            batches.append([i])
            tall, wide = h, w
    return batches


def _pasting(probs: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The (R, M + 2, M + 2) padded masks and the first and last pixels (x, y) of their boxes
    widened as torchvision's ``expand_boxes`` does, truncated as it does."""
    size = probs.shape[-1]
    scale = (size + 2) / size
    half = (boxes[:, 2:] - boxes[:, :2]) * 0.5 * scale
    centre = (boxes[:, 2:] + boxes[:, :2]) * 0.5
    return F.pad(probs, (1, 1, 1, 1)), (centre - half).long(), (centre + half).long()


def _resize_weights(
    start: Tensor, end: Tensor, length: int, size: int, offset: Tensor | None = None
) -> Tensor:
    """(R, length, size) weights of bilinear resizing (``align_corners=False``) of ``size``
    samples onto pixels ``start..end`` (inclusive) of an axis, for its ``length`` pixels from
    ``offset`` (default 0)."""
    extent = (end - start + 1).clamp(min=1)
    pixel = torch.arange(length, device=start.device)[None] - start[:, None]  # (R, length)
    if offset is not None:
        pixel = pixel + offset[:, None]
    inside = (pixel >= 0) & (pixel <= (end - start)[:, None])
    scale = size / extent.float()
    source = ((pixel.float() + 0.5) * scale[:, None] - 0.5).clamp(min=0)
    first = source.floor()
    weight = (source - first).clamp(0, 1)
    first = first.long()
    second = (first + 1).clamp(max=size - 1)
    grid = torch.arange(size, device=start.device)
    weights = (grid == first[..., None]) * (1 - weight)[..., None] + (
        grid == second[..., None]
    ) * weight[..., None]
    return weights * inside[..., None]
