"""Check an exported detector against PyTorch: the same detections on real images.

The exported graph and the PyTorch model see the same uint8 images, at the model's size (the
longer side) so its transform does not resize them; each exported detection must match a
PyTorch one of the same category with boxes and scores within tolerance and masks of high
IoU, and the other way round. Detections whose score is within tolerance of a cut-off (the
score threshold, or the K-th score of a full list) may differ: float rounding decides them.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.transforms.v2 import functional as F

from ..data import load_image, make_shapes
from ..models import describe, detection_selection
from .dense import ExportError

__all__ = ["check_detector", "check_sizes", "load_check_images"]

BOX_TOLERANCE = 0.05  # pixels
SCORE_TOLERANCE = 1e-3
MASK_IOU = 0.95

Runner = Callable[[torch.Tensor], dict[str, np.ndarray]]


def check_sizes(image_size: int) -> list[tuple[int, int]]:
    """Two (H, W) check sizes with the model's longer side: landscape, and an odd-height
    portrait that is no multiple of the strides."""
    return [(image_size, image_size * 3 // 4), (image_size * 5 // 8 + 1, image_size)]


def load_check_images(paths: Sequence[str | Path] | None, count: int = 2) -> list[torch.Tensor]:
    """(3, H, W) uint8 images: ``paths``, or ``count`` images of the synthetic shapes set."""
    with tempfile.TemporaryDirectory() as tmp:
        if not paths:
            paths = sorted(make_shapes(tmp, num_images=count, size=(320, 240))["images"].iterdir())
        return [F.pil_to_tensor(load_image(p)) for p in paths]


@torch.no_grad()
def check_detector(
    run: Runner,
    model: nn.Module,
    images: Sequence[torch.Tensor],
    sizes: Sequence[tuple[int, int]],
    max_detections: int,
    float_input: bool = False,
) -> dict:
    """Run ``run`` (the exported graph on an (N, 3, H, W) batch) and ``model`` on ``images``
    resized to each of ``sizes``, two at a time; raise :class:`ExportError` (one line) on the
    first disagreement. Returns the largest differences and the detection counts."""
    label_to_category = describe(model).label_to_category_id()
    stats = {"images": 0, "detections": 0, "box": 0.0, "score": 0.0, "mask_iou": 1.0}
    threshold = _score_threshold(model)
    for h, w in sizes:
        batch = torch.stack([F.resize(im, [h, w], antialias=True) for im in images])
        for start in range(0, len(batch), 2):
            part = batch[start : start + 2]
            floats = part.float() / 255
            got = run(floats if float_input else part)
            expected = model(list(floats))
            for i, ref in enumerate(expected):
                where = f"image {start + i} at {h}x{w}"
                _compare(ref, got, i, label_to_category, threshold, max_detections, where, stats)
                stats["images"] += 1
    return stats


def _score_threshold(model: nn.Module) -> float:
    return float(detection_selection(model).score_thresh)


def _compare(
    ref: dict[str, torch.Tensor],
    got: dict[str, np.ndarray],
    i: int,
    label_to_category: dict[int, int],
    threshold: float,
    max_detections: int,
    where: str,
    stats: dict,
) -> None:
    n = int(got["num_detections"][i])
    boxes, scores = got["boxes"][i, :n], got["scores"][i, :n]
    labels = got["labels"][i, :n]
    ref_boxes, ref_scores = ref["boxes"].numpy(), ref["scores"].numpy()
    ref_labels = np.array([label_to_category.get(int(x), -1) for x in ref["labels"]])
    # Scores this close to a cut-off may fall on either side of it.
    cutoff = max(threshold, float(ref_scores[-1]) if len(ref_scores) == max_detections else 0)
    unsure = cutoff + SCORE_TOLERANCE
    pairs = _match(ref_boxes, ref_scores, ref_labels, boxes, scores, labels)
    matched_ref = {a for a, _ in pairs}
    matched_got = {b for _, b in pairs}
    missing = [j for j in range(len(ref_scores)) if j not in matched_ref and ref_scores[j] > unsure]
    extra = [j for j in range(n) if j not in matched_got and scores[j] > unsure]
    if missing or extra:
        what = (
            f"PyTorch's detection {missing[0]} (category {ref_labels[missing[0]]}, score "
            f"{ref_scores[missing[0]]:.4f}, box {np.round(ref_boxes[missing[0]], 1).tolist()})"
            if missing
            else f"exported detection {extra[0]} (category {labels[extra[0]]}, score "
            f"{scores[extra[0]]:.4f}, box {np.round(boxes[extra[0]], 1).tolist()})"
        )
        raise ExportError(
            f"exported model disagrees with PyTorch on {where}: {what} has no counterpart "
            f"({len(missing)} missing, {len(extra)} extra of {len(ref_scores)})"
        )
    stats["detections"] += len(pairs)
    for a, b in pairs:
        stats["box"] = max(stats["box"], float(np.abs(ref_boxes[a] - boxes[b]).max()))
        stats["score"] = max(stats["score"], float(abs(ref_scores[a] - scores[b])))
        if "masks" in got:
            ours, theirs = got["masks"][i, b] > 0, ref["masks"][a, 0].numpy() > 0.5
            union = np.logical_or(ours, theirs).sum()
            iou = np.logical_and(ours, theirs).sum() / union if union else 1.0
            stats["mask_iou"] = min(stats["mask_iou"], float(iou))
            if iou < MASK_IOU and union > 20:
                raise ExportError(
                    f"exported model disagrees with PyTorch on {where}: mask of detection {a} "
                    f"has IoU {iou:.3f} with PyTorch's (< {MASK_IOU})"
                )


def _match(
    ref_boxes: np.ndarray,
    ref_scores: np.ndarray,
    ref_labels: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
) -> list[tuple[int, int]]:
    """Pairs (PyTorch index, exported index) of the same category, boxes within
    ``BOX_TOLERANCE`` and scores within ``SCORE_TOLERANCE``, closest boxes first."""
    pairs, used = [], set()
    for a in range(len(ref_scores)):
        diff = np.abs(boxes - ref_boxes[a]).max(axis=1) if len(boxes) else np.zeros(0)
        ok = (
            (labels == ref_labels[a])
            & (diff <= BOX_TOLERANCE)
            & (np.abs(scores - ref_scores[a]) <= SCORE_TOLERANCE)
        )
        for b in np.argsort(diff):
            if ok[b] and b not in used:
                pairs.append((a, int(b)))
                used.add(int(b))
                break
    return pairs
