"""What to look at beside ``metrics.json``: precision-recall curves, a confusion matrix and a
per-class table, as numbers (CSV) and plots (PNG)."""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from faster_coco_eval.extra import PreviewResults
from pycocotools.coco import COCO

from ..files import atomic_write
from .evaluate import Accumulated, accumulate, fast_coco, summarize
from .plots import plot_confusion, plot_pr_curves

__all__ = ["confusion_matrix", "pr_curves", "write_analysis"]

# PreviewResults warns about matplotlib-free extras it cannot use; its numbers are all we take.
logging.getLogger("faster_coco_eval.extra").setLevel(logging.ERROR)


def pr_curves(acc: Accumulated, names: dict[int, str]) -> list[dict[str, Any]]:
    """Interpolated precision at COCO's 101 recall points (area all, 100 detections): per
    class and averaged over classes ("all", whose mean is AP), at IoU 0.50 and averaged over
    0.50:0.95; ``score`` is the detection score reaching each recall point at IoU 0.50.
    Classes without ground truth have no curve."""
    recall = np.linspace(0, 1, acc.precision.shape[1])
    precision = acc.precision[:, :, :, 0, -1]  # [IoU, recall, class]
    defined = (precision > -1).all(axis=(0, 1))
    curves = []
    for label, p_iou in (("0.50", precision[0]), ("0.50:0.95", precision.mean(axis=0))):
        if defined.any():
            overall = p_iou[:, defined].mean(axis=1)
            curves.append({"class": "all", "category_id": None, "iou": label,
                           "recall": recall, "precision": overall, "score": None})  # fmt: skip
        for k, cat_id in enumerate(acc.cat_ids):
            if defined[k]:
                score = acc.scores[0, :, k, 0, -1] if label == "0.50" else None
                curves.append(
                    {"class": names[cat_id], "category_id": cat_id, "iou": label,
                     "recall": recall, "precision": p_iou[:, k], "score": score}
                )  # fmt: skip
    return curves


def confusion_matrix(
    coco_gt: COCO,
    results: list[dict[str, Any]],
    iou_type: str = "bbox",
    iou_threshold: float = 0.5,
    score_threshold: float = 0.5,
) -> tuple[np.ndarray, list[int]]:
    """Counts of [ground-truth class, predicted class], the last row and column being
    background: detections with ``score >= score_threshold`` are matched to ground truth of
    any class at ``iou_threshold`` (faster-coco-eval's class-agnostic COCO matching);
    unmatched detections land in the background row, unmatched objects in the background
    column. Returns the matrix and the category ids of its rows, ascending."""
    gt = fast_coco(coco_gt)
    dt = gt.loadRes([dict(r) for r in results])
    preview = PreviewResults(gt, dt, iou_type, min_score=score_threshold,
                             iou_tresh=iou_threshold, useCats=False)  # fmt: skip
    # faster-coco-eval: [gt class, predicted class | unmatched detections | unmatched objects],
    # classes in the json's order, unmatched detections counted in the row of their class.
    lib = preview.compute_confusion_matrix().astype(np.int64)
    lib_ids = list(preview.cocoGt.cats)
    order = [lib_ids.index(c) for c in sorted(lib_ids)]
    k = len(order)
    matrix = np.zeros((k + 1, k + 1), dtype=np.int64)
    matrix[:k, :k] = lib[np.ix_(order, order)]
    matrix[k, :k] = lib[order, k]
    matrix[:k, k] = lib[order, k + 1]
    return matrix, sorted(lib_ids)


def _write_csv(path: Path, header: list[str], rows: Iterable[list[Any]]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(header)
            out.writerows(rows)

    atomic_write(path, write)


def _id(value: int | None) -> int | str:
    return "" if value is None else value  # category id 0 exists in some data sets


def _number(value: float | None, digits: int = 6) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def write_analysis(
    coco_gt: COCO,
    results: list[dict[str, Any]],
    iou_types: Iterable[str],
    out_dir: str | Path,
    *,
    score_threshold: float = 0.5,
    iou_threshold: float = 0.5,
    accumulated: dict[str, Accumulated] | None = None,
) -> list[Path]:
    """Write, per IoU type, ``pr_curve_{type}.csv`` (the numbers of :func:`pr_curves`),
    ``pr_curve_{type}.png`` (all classes), ``pr_curve_{type}_per_class.png``,
    ``confusion_{type}.csv`` and ``.png`` (:func:`confusion_matrix`), and one
    ``per_class.csv`` (instances, AP, AP50, AR100 per type). ``accumulated`` reuses
    evaluations already run (:func:`~spinedet.engine.evaluate.accumulate`). Returns the paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gt = fast_coco(coco_gt)
    names = {c["id"]: c["name"] for c in gt.dataset["categories"]}
    accumulated = accumulated or {}
    written: list[Path] = []
    per_class: dict[str, dict[str, Any]] = {}
    for iou_type in iou_types:
        acc = accumulated.get(iou_type) or accumulate(gt, results, iou_type)
        per_class[iou_type] = summarize(gt, acc)["per_class"]
        curves = pr_curves(acc, names)
        path = out / f"pr_curve_{iou_type}.csv"
        rows = (
            [c["class"], _id(c["category_id"]), c["iou"], f"{r:.2f}", _number(p),
             "" if s is None else _number(float(s))]
            for c in curves
            for r, p, s in zip(c["recall"], c["precision"],
                               [None] * len(c["recall"]) if c["score"] is None else c["score"],
                               strict=True)
        )  # fmt: skip
        header = ["class", "category_id", "iou", "recall", "precision", "score"]
        _write_csv(path, header, rows)
        written += [path, *plot_pr_curves(curves, iou_type, out)]
        matrix, cat_ids = confusion_matrix(gt, results, iou_type, iou_threshold, score_threshold)
        labels = [names[c] for c in cat_ids] + ["background"]
        path = out / f"confusion_{iou_type}.csv"
        rows = ([label, *row] for label, row in zip(labels, matrix.tolist(), strict=True))
        _write_csv(path, ["ground truth \\ predicted", *labels], rows)
        written.append(path)
        title = f"{iou_type}: IoU >= {iou_threshold:g}, score >= {score_threshold:g}"
        written.append(out / f"confusion_{iou_type}.png")
        plot_confusion(matrix, labels, title, written[-1])
    types = list(per_class)
    if types:
        header = ["class", "category_id", "instances"]
        header += [f"{t}_{n}" for t in types for n in ("AP", "AP50", "AR100")]
        first = per_class[types[0]]
        rows = [
            [name, row["category_id"], row["instances"]]
            + [_number(per_class[t][name][n]) for t in types for n in ("AP", "AP50", "AR100")]
            for name, row in first.items()
        ]
        written.append(out / "per_class.csv")
        _write_csv(written[-1], header, rows)
    return written
