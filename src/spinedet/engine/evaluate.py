"""COCO evaluation with pycocotools: box and mask AP, overall and per class."""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from ..data import collate
from .distributed import DistInfo, gather_objects

__all__ = ["STAT_NAMES", "to_coco_results", "coco_evaluate", "run_inference", "format_metrics"]

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100")


def to_coco_results(
    output: dict[str, torch.Tensor], image_id: int, label_to_cat_id: dict[int, int]
) -> list[dict[str, Any]]:
    """One image's detections as COCO result entries (xywh boxes, RLE masks, user category ids)."""
    boxes = output["boxes"].detach().cpu().float()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = output["scores"].tolist()
    labels = output["labels"].tolist()
    rles = None
    if "masks" in output:
        binary = (output["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
        rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    results = []
    for i, (box, score, label) in enumerate(zip(xywh, scores, labels, strict=True)):
        entry = {
            "image_id": image_id,
            "category_id": label_to_cat_id[label],
            "bbox": [round(v, 2) for v in box],
            "score": round(score, 5),
        }
        if rles is not None:
            entry["segmentation"] = {
                "size": [int(s) for s in rles[i]["size"]],
                "counts": rles[i]["counts"].decode("ascii"),
            }
        results.append(entry)
    return results


@torch.no_grad()
def run_inference(
    model: nn.Module,
    dataset: Dataset,
    label_to_cat_id: dict[int, int],
    device: torch.device,
    info: DistInfo | None = None,
    batch_size: int = 2,
    workers: int = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """COCO results of ``model`` on every image of ``dataset`` (sharded across ranks)."""
    info = info or DistInfo()
    shard = Subset(dataset, range(info.rank, len(dataset), info.world_size))
    loader = DataLoader(shard, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    was_training = model.training
    model.eval()
    results: list[dict[str, Any]] = []
    bar = tqdm(loader, desc="evaluate", unit="batch", disable=not progress or info.rank != 0)
    for images, targets in bar:
        outputs = model([img.to(device) for img in images])
        for out, target in zip(outputs, targets, strict=True):
            results.extend(to_coco_results(out, int(target["image_id"]), label_to_cat_id))
    model.train(was_training)
    return [r for part in gather_objects(results, info) for r in part]


def coco_evaluate(
    coco_gt: COCO, results: list[dict[str, Any]], iou_types: Iterable[str] = ("bbox",)
) -> dict[str, dict[str, Any]]:
    """AP metrics per IoU type: the 12 COCO numbers (as ``STAT_NAMES``) and AP per class."""
    metrics: dict[str, dict[str, Any]] = {}
    names = {c["id"]: c["name"] for c in coco_gt.dataset["categories"]}
    for iou_type in iou_types:
        if not results:  # pycocotools cannot load an empty result list
            metrics[iou_type] = {
                **dict.fromkeys(STAT_NAMES, 0.0),
                "per_class": dict.fromkeys(names.values(), 0.0),
            }
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes(results)
            evaluator = COCOeval(coco_gt, coco_dt, iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        stats = {name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats, strict=False)}
        # precision: [IoU thresholds, recall points, classes, area ranges, max dets]
        precision = evaluator.eval["precision"][:, :, :, 0, -1]
        per_class = {}
        for k, cat_id in enumerate(evaluator.params.catIds):
            p = precision[:, :, k]
            per_class[names[cat_id]] = float(p[p > -1].mean()) if (p > -1).any() else math.nan
        metrics[iou_type] = {**stats, "per_class": per_class}
    return metrics


def format_metrics(metrics: dict[str, dict[str, Any]]) -> str:
    """A summary table, then per-class AP in columns that stay readable for 178 classes."""
    lines = ["type  " + " ".join(f"{n:>6}" for n in STAT_NAMES[:6])]
    for iou_type, m in metrics.items():
        lines.append(f"{iou_type:<5} " + " ".join(f"{m[n]:6.3f}" for n in STAT_NAMES[:6]))
    for iou_type, m in metrics.items():
        lines.append(f"\nper-class {iou_type} AP (IoU 0.50:0.95)")
        cells = [f"{name[:18]:<18} {ap:6.3f}" for name, ap in m["per_class"].items()]
        for i in range(0, len(cells), 3):
            lines.append("   ".join(cells[i : i + 3]))
    return "\n".join(lines)
