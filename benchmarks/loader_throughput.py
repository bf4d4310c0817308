"""How many images per second the training loader delivers, per process and per worker count.

The detection recipes' pipeline (640 x 640, scale jitter 0.5-2.0, random crop and flip, masks
for Mask R-CNN) on synthetic shapes images, decoded from PNG. A GPU trains a SpineNet-49S
detector at 90-330 images/s (``gpu_throughput.py``); this tells how many DataLoader processes
keep it fed, and what ``data.workers``' default (``engine.runtime.loader_workers``) picks here.

Then large photos (``--photo`` pixels wide, 4:3 JPEG, 30 polygon objects each), one sample at a
time in this process: the training set as the trainer builds it (loaded at the transforms'
largest scale, ``max_size``), the same without ``max_size``, and the reference, every mask
decoded by pycocotools at full size (as torchvision's detection references do) before the
same transforms.

    PYTHONPATH=src python benchmarks/loader_throughput.py [--size 640] [--images 64] [--photo 4000]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import compare, machine, ms, parse_args, table  # noqa: E402

from spinedet.data import CocoDataset, collate, make_shapes, train_transforms  # noqa: E402
from spinedet.engine.loop import SeededSamples  # noqa: E402
from spinedet.engine.runtime import cpu_budget, loader_workers  # noqa: E402


def images_per_s(dataset: SeededSamples, workers: int, batch: int, epochs: int) -> float:
    """Images/s of the trainer's kind of loader over ``epochs`` passes (a new one each, as the
    trainer builds them), the first batch of each included."""
    n = len(dataset.dataset) // batch * batch
    start = time.perf_counter()
    for epoch in range(epochs):
        loader = DataLoader(dataset, batch_size=batch, sampler=[(epoch, i) for i in range(n)],
                            num_workers=workers, collate_fn=collate)  # fmt: skip
        for _ in loader:
            pass
    return epochs * n / (time.perf_counter() - start)


def photos(folder: Path, count: int, width: int) -> Path:
    """``count`` 4:3 JPEG photos ``width`` pixels wide, each with 30 filled 24-gon objects of
    30-250 px radius scaled with the width (COCO polygons); returns the annotations' path."""
    rng = np.random.default_rng(0)
    height, grow = width * 3 // 4, width / 4000
    images, annotations = [], []
    for k in range(count):
        noise = (rng.random((height // 16, width // 16, 3)) * 255).astype(np.uint8)
        photo = Image.fromarray(noise).resize((width, height))
        draw = ImageDraw.Draw(photo)
        for j in range(30):
            r = rng.uniform(30, 250) * grow
            cx, cy = rng.uniform(r, width - r), rng.uniform(r, height - r)
            angles = np.linspace(0, 2 * math.pi, 24, endpoint=False)
            xy = np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], 1)
            draw.polygon(
                [tuple(p) for p in xy], fill=tuple(int(v) for v in rng.integers(0, 255, 3))
            )
            x0, y0 = xy.min(0)
            x1, y1 = xy.max(0)
            annotations.append({"id": len(annotations) + 1, "image_id": k + 1,
                                "category_id": 1 + j % 3, "bbox": [x0, y0, x1 - x0, y1 - y0],
                                "area": math.pi * r * r, "iscrowd": 0,
                                "segmentation": [xy.ravel().tolist()]})  # fmt: skip
        photo.save(folder / f"{k}.jpg", quality=90)
        images.append({"id": k + 1, "file_name": f"{k}.jpg", "width": width, "height": height})
    path = folder / "photos.json"
    categories = [{"id": i, "name": f"class{i}"} for i in (1, 2, 3)]
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": categories}))  # fmt: skip
    return path


class FullSizeMasks(CocoDataset):
    """The reference: every mask decoded by pycocotools at the image's full size."""

    def _decode_masks(self, rows, height, width, seen):  # noqa: ANN001, ANN202
        rles = [mask_utils.frPyObjects(self.index.segmentation(r), height, width) for r in rows]
        masks = [mask_utils.decode(mask_utils.merge(rle)) for rle in rles]
        return torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, height, width)


def large_photos(args: argparse.Namespace) -> None:
    """The large photos' table: ms per sample, and the ratio to the reference."""
    largest = math.ceil(args.size * 2.0)  # the recipes' scale jitter reaches 2.0
    with tempfile.TemporaryDirectory() as tmp:
        annotations = photos(Path(tmp), 4, args.photo)
        sets = {
            "pycocotools at full size (reference)": FullSizeMasks(
                annotations, tmp, train_transforms(args.size)
            ),
            "spinedet, at full size": CocoDataset(annotations, tmp, train_transforms(args.size)),
            f"spinedet as trained (loaded at {largest})": CocoDataset(
                annotations, tmp, train_transforms(args.size), max_size=largest
            ),
        }
        runs = {name: lambda d=d: [d[i] for i in range(len(d))] for name, d in sets.items()}
        timings = compare(runs, next(iter(runs)), args.repeats, 1)
    rows = [[name, ms(t.median_s / 4), f"{t.ratio:.2f}x"] for name, t in timings.items()]
    height = args.photo * 3 // 4
    print(f"\nLarge photos: {args.photo} x {height} JPEG, 30 polygon masks each, training "
          f"pipeline at {args.size}, one sample at a time in this process, median of "
          f"{args.repeats} rounds of 4\n")  # fmt: skip
    print(table(["loader", "ms per sample", "time vs reference"], rows))


def main() -> None:
    args = parse_args(
        __doc__.splitlines()[0],
        repeats=2,
        size={"type": int, "default": 640, "help": "training image side"},
        images={"type": int, "default": 64, "help": "synthetic images to load"},
        photo={"type": int, "default": 4000, "help": "large photos' width (0: skip)"},
    )
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_shapes(tmp, num_images=args.images, size=args.size)
        rows = []
        for masks in (True, False):
            coco = CocoDataset(paths["annotations"], paths["images"],
                               train_transforms(args.size), masks=masks)  # fmt: skip
            dataset = SeededSamples(coco, seed=0)
            for workers in sorted({0, 1, 2, loader_workers(None, torch.device("cuda"))}):
                rate = images_per_s(dataset, workers, batch=8, epochs=args.repeats)
                rows.append([
                    "Mask R-CNN (masks)" if masks else "RetinaNet / Faster R-CNN (boxes)",
                    str(workers),
                    f"{rate:.1f}",
                ])  # fmt: skip
    print(f"{machine()}; {args.images} PNG images of "
          f"{args.size} x {args.size}, batch 8, {args.repeats} passes per row\n")  # fmt: skip
    print(table(["pipeline", "loader processes", "images/s"], rows))
    cpu, gpu = (loader_workers(None, torch.device(d)) for d in ("cpu", "cuda"))
    print(f"\n`data.workers` by default here ({cpu_budget()} cores): {cpu} on the CPU, {gpu} "
          "with a GPU.")  # fmt: skip
    if args.photo:
        large_photos(args)


if __name__ == "__main__":
    main()
