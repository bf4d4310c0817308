"""Detection in tiles of large images (``Predictor(tile=...)``): COCO AP and time on mosaics of
the quickstart's test images, the whole image vs tiles.

A mosaic puts ``grid`` x ``grid`` of the trained quickstart's test images (192 x 192) side by
side: a 768 x 768 image (grid 4) whose shapes have as many pixels as in training. Resized to
the model's 192 for the whole-image pass they shrink 4x, to 5-15 pixels; in 192-pixel tiles
they keep theirs (tiles aligned with the cells would be the test images themselves; these are
offset from them, or larger, and cut shapes). Each mosaic detection goes back to the test
image whose cell holds its box's centre (box and mask cut to the cell), and COCO AP is that of
the test images, as ``make demo`` scores them; the test images scored one by one are the
ceiling. Needs a trained run (``make demo``):

    PYTHONPATH=src python benchmarks/tiled_predict.py [--run runs/demo] [--grid 4]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from faster_coco_eval import COCO
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine, parse_args, table  # noqa: E402

import spinedet  # noqa: E402
from spinedet.data.coco_files import read_json  # noqa: E402
from spinedet.engine.evaluate import coco_evaluate  # noqa: E402
from spinedet.masks import MaskCrops  # noqa: E402

Cell = tuple[dict, int, int]  # a test image and its cell's top-left corner in the mosaic


def mosaics(test: dict, images: Path, grid: int) -> tuple[list[np.ndarray], list[list[Cell]]]:
    """The test images ``grid`` x ``grid`` to a mosaic (those left over dropped), and each
    mosaic's cells."""
    cell = max(max(im["height"], im["width"]) for im in test["images"])
    per = grid * grid
    pixels, layouts = [], []
    for m in range(len(test["images"]) // per):
        canvas = np.zeros((grid * cell, grid * cell, 3), np.uint8)
        layout = []
        for k, im in enumerate(test["images"][m * per : (m + 1) * per]):
            top, left = (k // grid) * cell, (k % grid) * cell
            rgb = np.asarray(Image.open(images / im["file_name"]).convert("RGB"))
            canvas[top : top + rgb.shape[0], left : left + rgb.shape[1]] = rgb
            layout.append((im, top, left))
        pixels.append(canvas)
        layouts.append(layout)
    return pixels, layouts


def back_to_cells(found: spinedet.Detections, layout: list[Cell], grid: int) -> list[dict]:
    """COCO results of a mosaic's detections on the test images: each in the image whose cell
    holds its box's centre, its box and mask cut to the cell and moved with it."""
    results = []
    crops = found.mask_crops
    cell = found.image_size[0] // grid
    for j, box in enumerate(found.boxes.tolist()):
        row = min(int((box[1] + box[3]) / 2 // cell), grid - 1)
        col = min(int((box[0] + box[2]) / 2 // cell), grid - 1)
        im, top, left = layout[row * grid + col]
        h, w = im["height"], im["width"]
        x0, x1 = min(max(box[0] - left, 0), w), min(max(box[2] - left, 0), w)
        y0, y1 = min(max(box[1] - top, 0), h), min(max(box[3] - top, 0), h)
        (oy, ox), crop = crops.origins[j], crops.crops[j]
        ys, xs = max(oy, top), max(ox, left)
        ye, xe = min(oy + crop.shape[0], top + h), min(ox + crop.shape[1], left + w)
        cut = crop[max(ys - oy, 0) : max(ye - oy, 0), max(xs - ox, 0) : max(xe - ox, 0)]
        mask = MaskCrops([cut], [(max(ys - top, 0), max(xs - left, 0))], (h, w))
        results.append({"image_id": im["id"], "category_id": found.category_ids[j],
                        "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(found.scores[j]),
                        "segmentation": mask.to_rle()[0]})  # fmt: skip
    return results


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
    test = read_json(data / "test.json")
    pixels, layouts = mosaics(test, data / "images", args.grid)
    used = [im for layout in layouts for im, _, _ in layout]
    ids = {im["id"] for im in used}
    annotations = [a for a in test["annotations"] if a["image_id"] in ids]
    truth = test | {"images": used, "annotations": annotations}
    coco = COCO(truth, print_function=lambda *_args, **_kwargs: None)
    side = pixels[0].shape[0]
    print(f"# Tiles: {len(pixels)} mosaics of {args.grid} x {args.grid} test images "
          f"({side} x {side}), the quickstart model (192)\n")  # fmt: skip
    print(f"{machine()}\n")
    options = {"device": "cpu", "score_threshold": 0.05, "batch_size": 4}
    cell = side // args.grid
    runs = [  # name, tile, overlap, whole image too
        ("the test images one by one (the ceiling)", None, None, False),
        ("mosaics, whole (resized to 192)", None, None, False),
        (f"mosaics, tiles of {cell}, overlap 0.2", cell, 0.2, False),
        (f"mosaics, tiles of {cell}, overlap 0.4", cell, 0.4, False),
        (f"mosaics, tiles of {cell + cell // 3}, overlap 0.2", cell + cell // 3, 0.2, False),
        (f"mosaics, tiles of {cell}, overlap 0.2, and whole", cell, 0.2, True),
    ]
    rows = []
    for k, (name, tile, overlap, whole) in enumerate(runs):
        predictor = spinedet.Predictor(args.run, tile=tile, tile_overlap=overlap,
                                       tile_whole=whole, **options)  # fmt: skip
        predictor(pixels[0])  # warm-up: oneDNN's first calls
        start = time.perf_counter()
        if k == 0:
            found = predictor([data / "images" / im["file_name"] for im in used])
            results = [e for im, d in zip(used, found, strict=True) for e in d.to_coco(im["id"])]
        else:
            found = predictor(pixels)
            results = [r for d, lay in zip(found, layouts, strict=True)
                       for r in back_to_cells(d, lay, args.grid)]  # fmt: skip
        seconds = (time.perf_counter() - start) / len(pixels)
        metrics = coco_evaluate(coco, results, ("bbox", "segm"))
        rows.append([name, f"{metrics['bbox']['AP50']:.3f}", f"{metrics['segm']['AP50']:.3f}",
                     f"{metrics['segm']['AP']:.3f}", f"{seconds:.2f}"])  # fmt: skip
    print(table(["images", "box AP50", "mask AP50", "mask AP", "s per mosaic's worth"], rows))
    print("\nscore threshold 0.05; AP of the test images in the mosaics; s per mosaic's "
          "worth: one mosaic, or its test images one by one, batch 4, this machine's "
          "threads.")  # fmt: skip


if __name__ == "__main__":
    main()
