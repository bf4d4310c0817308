"""COCO evaluation: faster-coco-eval through our wrapper reports exactly what pycocotools
computes, as strict JSON."""

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from spinedet.data import CocoDataset
from spinedet.engine.evaluate import (
    STAT_NAMES,
    coco_evaluate,
    flat_metrics,
    format_metrics,
    to_coco_results,
)


def gt_as_results(coco, jitter: float, drop_every: int, masks: bool = False) -> list[dict]:
    """Ground truth as imperfect detections: shifted boxes (and masks), random scores, a
    wrong class now and then, every ``drop_every``-th object missed."""
    rng = np.random.default_rng(0)
    cat_ids = sorted(coco.getCatIds())
    results = []
    for i, ann in enumerate(coco.dataset["annotations"]):
        if i % drop_every == 0:
            continue
        x, y, w, h = ann["bbox"]
        dx, dy = rng.uniform(-jitter, jitter, 2) * [w, h]
        entry = {
            "image_id": ann["image_id"],
            "category_id": ann["category_id"] if i % 7 else cat_ids[i % len(cat_ids)],
            "bbox": [x + dx, y + dy, w, h],
            "score": float(rng.uniform(0.3, 1)),
        }
        if masks:
            shifted = np.roll(coco.annToMask(ann), (round(dy), round(dx)), axis=(0, 1))
            rle = mask_utils.encode(np.asfortranarray(shifted))
            entry["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
        results.append(entry)
    return results


def test_all_twelve_numbers_equal_pycocotools_for_boxes_and_masks(shapes):
    dataset = CocoDataset(shapes["annotations"], shapes["images"], masks=True)
    results = gt_as_results(dataset.coco, jitter=0.15, drop_every=4, masks=True)
    metrics = coco_evaluate(dataset.coco, results, ["bbox", "segm"])
    json.dumps(metrics, allow_nan=False)
    for iou_type in ("bbox", "segm"):
        with contextlib.redirect_stdout(io.StringIO()):
            loaded = dataset.coco.loadRes([dict(r) for r in results])
            reference = COCOeval(dataset.coco, loaded, iou_type)
            reference.evaluate()
            reference.accumulate()
            reference.summarize()
        # the same matches and the same means, up to the order of float additions
        ours = [metrics[iou_type][n] for n in STAT_NAMES]
        assert ours == pytest.approx(list(reference.stats), rel=0, abs=1e-12)
        # per class: COCO's precision [IoU, recall, class, area, max dets], recall [IoU, ...]
        precision = reference.eval["precision"][:, :, :, 0, -1]
        recall = reference.eval["recall"][:, :, 0, -1]
        for k, cat_id in enumerate(reference.params.catIds):
            row = next(r for r in metrics[iou_type]["per_class"].values()
                       if r["category_id"] == cat_id)  # fmt: skip
            assert row["AP"] == pytest.approx(precision[:, :, k].mean(), abs=1e-12)
            assert row["AP50"] == pytest.approx(precision[0, :, k].mean(), abs=1e-12)
            assert row["AR100"] == pytest.approx(recall[:, k].mean(), abs=1e-12)
    assert 0.2 < metrics["bbox"]["AP"] < 0.95  # imperfect predictions, not a degenerate case
    assert 0.1 < metrics["segm"]["AP"] < metrics["bbox"]["AP"]
    assert set(metrics["bbox"]["per_class"]) == {"circle", "square", "triangle", "star"}
    instances = {n: r["instances"] for n, r in metrics["bbox"]["per_class"].items()}
    counts = {c["name"]: len(dataset.coco.getAnnIds(catIds=[c["id"]])) for c in dataset.categories}
    assert instances == counts


def test_classes_without_ground_truth_are_null_and_worst_classes_print_first(shapes):
    dataset = CocoDataset(shapes["val"], shapes["images"])
    missing = {"id": 99, "name": "unicorn"}  # a category with no annotation at all
    dataset.coco.dataset["categories"].append(missing)
    dataset.coco.createIndex()
    try:
        results = gt_as_results(dataset.coco, jitter=0.2, drop_every=3)
        results.append({"image_id": results[0]["image_id"], "category_id": 99,
                        "bbox": [1, 1, 9, 9], "score": 0.9})  # fmt: skip
        metrics = coco_evaluate(dataset.coco, results, ["bbox"])
    finally:
        dataset.coco.dataset["categories"].remove(missing)
        dataset.coco.createIndex()
    text = json.dumps(metrics, allow_nan=False)
    assert json.loads(text)["bbox"]["per_class"]["unicorn"] == {
        "category_id": 99, "instances": 0, "AP": None, "AP50": None, "AR100": None
    }  # fmt: skip
    table = format_metrics(metrics)
    rows = table.split("per-class bbox AP (IoU 0.50:0.95), worst first")[1].splitlines()[2:]
    names = [row.split()[0] for row in rows]
    aps = [metrics["bbox"]["per_class"][n]["AP"] for n in names[:-1]]
    assert names[-1] == "unicorn" and aps == sorted(aps) and len(set(aps)) > 1
    assert format_metrics(metrics, worst=2).count("\n") == table.count("\n") - 3
    flat = flat_metrics(metrics)
    assert flat["bbox/ARl"] == metrics["bbox"]["ARl"] and flat["bbox_AP_per_class/unicorn"] is None
    assert len(flat) == 12 + 5


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
    assert all(r["AP"] == pytest.approx(1.0) for r in metrics["segm"]["per_class"].values())
    empty = coco_evaluate(dataset.coco, [], ["segm"])
    assert empty["segm"]["AP"] == 0.0
    assert all(r["AP"] == 0.0 for r in empty["segm"]["per_class"].values())
    table = format_metrics(metrics)
    assert "per-class segm AP (IoU 0.50:0.95), worst first" in table and "triangle" in table
