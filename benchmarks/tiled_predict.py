"""Detection in tiles of large images (``Predictor(tile=...)``): COCO AP and time on mosaics of
the quickstart's test images, the whole image vs tiles.

A mosaic puts ``grid`` x ``grid`` of the trained quickstart's test images (192 x 192) side by
side, with their annotations moved along: a 768 x 768 image (grid 4) whose shapes have as many
pixels as in training. Resized to the model's 192 for the whole-image pass they shrink 4x, to
5-15 pixels; in 192-pixel tiles they keep theirs. The test images scored one by one, as ``make
demo`` scores them, are the ceiling. Needs a trained run (``make demo``):

    PYTHONPATH=src python benchmarks/tiled_predict.py [--run runs/demo] [--grid 4]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from faster_coco_eval import COCO
from PIL import Image
from pycocotools import mask as mask_utils

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine, parse_args, table  # noqa: E402

import spinedet  # noqa: E402
from spinedet.data.coco_files import decode_segmentation, read_json  # noqa: E402
from spinedet.engine.evaluate import coco_evaluate  # noqa: E402


def mosaics(annotations: Path, images: Path, grid: int) -> tuple[dict, list[np.ndarray]]:
    """The test images ``grid`` x ``grid`` to a mosaic (those left over dropped), and the
    mosaics' COCO ground truth: boxes moved, masks moved and encoded again."""
    data = read_json(annotations)
    by_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    cell = max(max(im["height"], im["width"]) for im in data["images"])
    side = grid * cell
    per = grid * grid
    out_images, out_anns, pixels = [], [], []
    for m in range(len(data["images"]) // per):
        canvas = np.zeros((side, side, 3), np.uint8)
        for k, im in enumerate(data["images"][m * per : (m + 1) * per]):
            top, left = (k // grid) * cell, (k % grid) * cell
            rgb = np.asarray(Image.open(images / im["file_name"]).convert("RGB"))
            canvas[top : top + rgb.shape[0], left : left + rgb.shape[1]] = rgb
            for ann in by_image.get(im["id"], []):
                mask = np.zeros((side, side), np.uint8, order="F")
                seg = decode_segmentation(ann["segmentation"], im["height"], im["width"])
                mask[top : top + im["height"], left : left + im["width"]] = seg
                rle = mask_utils.encode(mask)
                x, y, w, h = ann["bbox"]
                out_anns.append({**ann, "id": len(out_anns) + 1, "image_id": m,
                                 "bbox": [x + left, y + top, w, h],
                                 "segmentation": {"size": rle["size"],
                                                  "counts": rle["counts"].decode()}})  # fmt: skip
        out_images.append({"id": m, "file_name": f"mosaic_{m}.png", "height": side, "width": side})
        pixels.append(canvas)
    gt = {"images": out_images, "annotations": out_anns, "categories": data["categories"]}
    return gt, pixels


def scored(predictor: spinedet.Predictor, images: list, gt: dict) -> tuple[dict, float]:
    """Box and mask metrics of ``predictor`` on ``images`` (gt's in order), and s per image."""
    start = time.perf_counter()
    found = predictor(images)
    seconds = (time.perf_counter() - start) / len(images)
    results = [e for im, d in zip(gt["images"], found, strict=True) for e in d.to_coco(im["id"])]
    coco = COCO(gt, print_function=lambda *_args, **_kwargs: None)
    return coco_evaluate(coco, results, ("bbox", "segm")), seconds


def main() -> None:
    args = parse_args(
        __doc__.splitlines()[0],
        run={"type": Path, "default": ROOT / "runs/demo", "help": "a trained quickstart run"},
        grid={"type": int, "default": 4, "help": "test images per mosaic side"},
    )
    data = args.run / "data"
    if not (args.run / "best.safetensors").exists():
        print(f"skipped: no trained run in {args.run} (`make demo` first)")
        return
    gt, pixels = mosaics(data / "test.json", data / "images", args.grid)
    side = gt["images"][0]["width"]
    print(f"# Tiles: {len(pixels)} mosaics of {args.grid} x {args.grid} test images "
          f"({side} x {side}), the quickstart model (192)\n")  # fmt: skip
    print(f"{machine()}\n")
    options = {"device": "cpu", "score_threshold": 0.05, "batch_size": 4}
    test = read_json(data / "test.json")
    singles = test | {"images": test["images"][: len(pixels) * args.grid**2]}
    kept = {im["id"] for im in singles["images"]}
    singles["annotations"] = [a for a in test["annotations"] if a["image_id"] in kept]
    files = [data / "images" / im["file_name"] for im in singles["images"]]
    cell = side // args.grid
    runs = [
        ("the test images one by one (the ceiling)", None, 0.2, files, singles),
        ("mosaics, whole (resized to 192)", None, 0.2, pixels, gt),
        (f"mosaics, tiles of {cell}, overlap 0.2", cell, 0.2, pixels, gt),
        (f"mosaics, tiles of {cell}, no overlap", cell, 0.0, pixels, gt),
    ]
    rows = []
    for name, tile, overlap, images, truth in runs:
        predictor = spinedet.Predictor(args.run, tile=tile, tile_overlap=overlap, **options)
        metrics, seconds = scored(predictor, images, truth)
        per_mosaic = seconds * (args.grid**2 if truth is singles else 1)
        rows.append([name, f"{metrics['bbox']['AP50']:.3f}", f"{metrics['segm']['AP50']:.3f}",
                     f"{metrics['segm']['AP']:.3f}", f"{per_mosaic:.2f}"])  # fmt: skip
    print(table(["images", "box AP50", "mask AP50", "mask AP", "s per mosaic's worth"], rows))
    print("\nscore threshold 0.05; s per mosaic's worth: one mosaic, or its test images one by "
          "one, batch 4, this machine's threads.")  # fmt: skip


if __name__ == "__main__":
    main()
