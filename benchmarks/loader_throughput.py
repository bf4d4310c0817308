"""How many images per second the training loader delivers, per process and per worker count.

The detection recipes' pipeline (640 x 640, scale jitter 0.5-2.0, random crop and flip, masks
for Mask R-CNN) on synthetic shapes images, decoded from PNG. A GPU trains a SpineNet-49S
detector at 90-330 images/s (``gpu_throughput.py``); this tells how many DataLoader processes
keep it fed, and what ``data.workers``' default (``engine.runtime.loader_workers``) picks here.

    PYTHONPATH=src python benchmarks/loader_throughput.py [--size 640] [--images 64]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, parse_args, table  # noqa: E402

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


def main() -> None:
    args = parse_args(
        __doc__.splitlines()[0],
        repeats=2,
        size={"type": int, "default": 640, "help": "training image side"},
        images={"type": int, "default": 64, "help": "synthetic images to load"},
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


if __name__ == "__main__":
    main()
