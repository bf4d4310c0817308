"""COCO evaluation: our wrapper reports exactly what pycocotools computes."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from pycocotools.cocoeval import COCOeval

from spinedet.data import CocoDataset
from spinedet.engine.evaluate import STAT_NAMES, coco_evaluate, format_metrics, to_coco_results


def _gt_as_results(dataset: CocoDataset, jitter: float, drop_every: int) -> list[dict]:
    rng = np.random.default_rng(0)
    results = []
    for i, ann in enumerate(dataset.coco.dataset["annotations"]):
        if i % drop_every == 0:
            continue
        x, y, w, h = ann["bbox"]
        dx, dy = rng.uniform(-jitter, jitter, 2) * [w, h]
        results.append(
            {
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "bbox": [x + dx, y + dy, w, h],
                "score": float(rng.uniform(0.3, 1)),
            }
        )
    return results


def test_ap_equals_pycocotools_exactly(shapes):
    dataset = CocoDataset(shapes["annotations"], shapes["images"])
    results = _gt_as_results(dataset, jitter=0.15, drop_every=4)
    metrics = coco_evaluate(dataset.coco, results, ["bbox"])
    with contextlib.redirect_stdout(io.StringIO()):
        reference = COCOeval(dataset.coco, dataset.coco.loadRes(results), "bbox")
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    assert [metrics["bbox"][n] for n in STAT_NAMES] == pytest.approx(list(reference.stats[:9]))
    assert 0.2 < metrics["bbox"]["AP"] < 0.95  # imperfect predictions, not a degenerate case
    assert set(metrics["bbox"]["per_class"]) == {"circle", "square", "triangle", "star"}


def test_perfect_masks_score_one_and_empty_results_score_zero(shapes):
    dataset = CocoDataset(shapes["annotations"], shapes["images"])
    results = []
    for index in range(len(dataset)):
        _, target = dataset[index]
        output = {
            "boxes": target["boxes"].as_subclass(torch.Tensor),
            "scores": torch.ones(len(target["labels"])),
            "labels": target["labels"],
            "masks": target["masks"][:, None].float(),
        }
        results += to_coco_results(output, target["image_id"], dataset.label_to_cat_id)
    assert {r["category_id"] for r in results} <= {3, 7, 11, 20}  # the user's ids, not labels
    json.dumps(results)  # RLE counts must be JSON-ready
    metrics = coco_evaluate(dataset.coco, results, ["bbox", "segm"])
    assert metrics["segm"]["AP"] == pytest.approx(1.0)
    assert metrics["bbox"]["AP50"] == pytest.approx(1.0)
    assert all(v == pytest.approx(1.0) for v in metrics["segm"]["per_class"].values())
    empty = coco_evaluate(dataset.coco, [], ["segm"])
    assert empty["segm"]["AP"] == 0.0
    table = format_metrics(metrics)
    assert "per-class segm AP" in table and "triangle" in table
