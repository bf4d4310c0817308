"""COCO evaluation time: pycocotools' COCOeval vs faster-coco-eval (what spinedet uses).

A synthetic validation set (default 5,000 images of 640 x 480, 80 classes, ~7 objects with
polygon masks per image) and 30 detections per image (jittered copies of the objects, some
with the wrong class, and random boxes; RLE masks). Each round times, back to back: loading
the results, ``evaluate``, ``accumulate`` and ``summarize`` with pycocotools, the same through
``spinedet.engine.evaluate.coco_evaluate`` (faster-coco-eval), and one rank's share of that
work when the categories are split over 4 ranks (``coco_evaluate(..., info=...)``).
"""

from __future__ import annotations

import contextlib
import io
import time
from collections import Counter

import numpy as np
from _common import compare, machine, parse_args, table
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from spinedet.engine.evaluate import (
    STAT_NAMES,
    accumulate,
    category_owners,
    coco_evaluate,
    fast_coco,
)

WIDTH, HEIGHT = 640, 480


def _polygon(rng: np.random.Generator, x: float, y: float, w: float, h: float) -> list[float]:
    """An irregular 12-gon inside the box, so masks differ from boxes."""
    angles = np.sort(rng.uniform(0, 2 * np.pi, 12))
    radius = rng.uniform(0.6, 1.0, 12)
    xs = x + w / 2 + np.cos(angles) * radius * w / 2
    ys = y + h / 2 + np.sin(angles) * radius * h / 2
    return np.stack([xs, ys], 1).ravel().round(1).tolist()


def make_set(images: int, classes: int, dets: int, seed: int = 0) -> tuple[COCO, list[dict]]:
    rng = np.random.default_rng(seed)
    gt = {
        "images": [
            {"id": i + 1, "width": WIDTH, "height": HEIGHT, "file_name": f"{i}.jpg"}
            for i in range(images)
        ],  # fmt: skip
        "categories": [{"id": c + 1, "name": f"class{c}"} for c in range(classes)],
        "annotations": [],
    }
    results = []
    for image in gt["images"]:
        objects = []
        for _ in range(rng.integers(3, 12)):
            w, h = rng.uniform(8, 300, 2)
            x, y = rng.uniform(0, WIDTH - w), rng.uniform(0, HEIGHT - h)
            cat = int(rng.integers(1, classes + 1))
            objects.append((x, y, w, h, cat))
            gt["annotations"].append({
                "id": len(gt["annotations"]) + 1, "image_id": image["id"], "category_id": cat,
                "bbox": [x, y, w, h], "area": w * h * 0.7, "iscrowd": 0,
                "segmentation": [_polygon(rng, x, y, w, h)],
            })  # fmt: skip
        for d in range(dets):
            if d < 2 * len(objects):
                x, y, w, h, cat = objects[d % len(objects)]
                x, y = x + rng.normal(0, 0.1) * w, y + rng.normal(0, 0.1) * h
                w, h = w * rng.uniform(0.8, 1.2), h * rng.uniform(0.8, 1.2)
                if rng.random() < 0.2:
                    cat = int(rng.integers(1, classes + 1))
            else:
                w, h = rng.uniform(8, 200, 2)
                x, y = rng.uniform(0, WIDTH - w), rng.uniform(0, HEIGHT - h)
                cat = int(rng.integers(1, classes + 1))
            rle = mask_utils.frPyObjects([_polygon(rng, x, y, w, h)], HEIGHT, WIDTH)[0]
            results.append({
                "image_id": image["id"], "category_id": cat, "score": float(rng.random()),
                "bbox": [x, y, w, h],
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
            })  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
    return coco, results


def pycocotools_stats(coco: COCO, results: list[dict], iou_type: str) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco, coco.loadRes([dict(r) for r in results]), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats]


def main() -> None:
    args = parse_args(
        __doc__.splitlines()[0], repeats=2,
        images={"type": int, "default": 5000}, classes={"type": int, "default": 80},
        dets={"type": int, "default": 30}, shares={"type": int, "default": 4},
    )  # fmt: skip
    start = time.perf_counter()
    coco, results = make_set(args.images, args.classes, args.dets)
    built = time.perf_counter() - start
    print(f"# COCO evaluation: pycocotools vs faster-coco-eval\n\n{machine()}\n")
    print(
        f"{args.images} images, {args.classes} classes, {len(coco.dataset['annotations'])} "
        f"objects, {len(results)} detections (built in {built:.0f} s); median of "
        f"{args.repeats} interleaved rounds. Times vary with the machine and its load: read "
        "the ratios.\n"
    )
    fast = fast_coco(coco)
    owners = category_owners(fast, Counter(r["category_id"] for r in results), args.shares)
    rank0 = [cat_id for cat_id, rank in owners.items() if rank == 0]
    rows = []
    for iou_type in ("bbox", "segm"):
        reference = pycocotools_stats(coco, results, iou_type)
        ours = coco_evaluate(coco, results, [iou_type])[iou_type]
        worst = max(abs(ours[n] - r) for n, r in zip(STAT_NAMES, reference, strict=True))
        timings = compare(
            {
                "pycocotools": lambda t=iou_type: pycocotools_stats(coco, results, t),
                "faster-coco-eval": lambda t=iou_type: coco_evaluate(coco, results, [t]),
                f"rank 0 of {args.shares}": lambda t=iou_type: accumulate(fast, results, t, rank0),
            },
            "pycocotools",
            args.repeats,
            warmup=0,  # every call evaluates from scratch: nothing to warm up
        )
        for name, timing in timings.items():
            rows.append([iou_type, name, f"{timing.median_s:.1f}", f"{timing.ratio:.2f}x",
                         f"{worst:.1e}" if name == "faster-coco-eval" else ""])  # fmt: skip
    print(
        table(
            ["IoU type", "evaluator", "seconds", "vs pycocotools", "max stat diff vs pycocotools"],
            rows,
        )
    )
    print(
        f"\n`rank 0 of {args.shares}`: the evaluate + accumulate one rank does when "
        f"`coco_evaluate(..., info=...)` splits the {args.classes} categories over "
        f"{args.shares} ranks (the arrays are then gathered; every rank gets the same numbers)."
    )


if __name__ == "__main__":
    main()
