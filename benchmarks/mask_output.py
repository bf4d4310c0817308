"""Mask R-CNN masks of a large image: pasted, resized, drawn and COCO-encoded, crops vs full size.

What ``Predictor`` and ``spinedet predict`` do with a model's masks once it has run: 100 mask
probability maps pasted at the size the model saw (640 x 480, by torchvision's
``paste_masks_in_image``) are resized to the 4000 x 3000 image and thresholded, drawn over it
and encoded as COCO RLE. The reference is the full-size way (spinedet's until masks became
crops): each map resized whole by ``F.interpolate`` into a (100, H, W) bool tensor, torchvision's
``draw_segmentation_masks`` and pycocotools' ``encode`` of every full mask. The crops
(``spinedet.masks.resize_masks``, ``spinedet.draw.draw_masks``, ``MaskCrops.to_rle``) are checked to
give the identical masks, drawing and RLE strings before they are timed. And what evaluation
(``spinedet eval``, validation in training) does: the model's 28 x 28 maps pasted into their
boxes at the image's full size (``paste_masks``, as the detector's transform does outside
``pasting_crops``), thresholded and encoded, vs ``paste_mask_crops`` + ``MaskCrops.to_rle``.
Peak memory is each way's rise of the peak resident size (Linux's VmHWM), run alone in a fresh
process.
"""

from __future__ import annotations

import multiprocessing
import sys
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.nn import functional as F
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.utils import draw_segmentation_masks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import compare, machine, ms, parse_args, table  # noqa: E402

from spinedet.draw import MASK_ALPHA, draw_masks, palette  # noqa: E402
from spinedet.masks import resize_masks  # noqa: E402
from spinedet.models.postprocess import paste_mask_crops, paste_masks  # noqa: E402

SEEN = (480, 640)  # the model's view of a 4:3 image at its size, 640


def inputs(size: tuple[int, int], n: int) -> tuple[torch.Tensor, ...]:
    """``n`` mask probability maps of 28 x 28 and their boxes at ``SEEN`` (3-25% of a side,
    blobs of 0.5 and above within them), the maps pasted at ``SEEN``, the boxes scaled to the
    image of ``size`` as the detector's transform scales them, that image and a colour each."""
    g = torch.Generator().manual_seed(0)
    height, width = SEEN
    centre = torch.rand(n, 2, generator=g) * torch.tensor([width, height])
    half = (torch.rand(n, 2, generator=g) * 0.11 + 0.015) * torch.tensor([width, height])
    boxes = torch.cat([centre - half, centre + half], 1)
    logits = F.interpolate(torch.randn(n, 1, 7, 7, generator=g) * 4, (28, 28), mode="bilinear")
    probs = paste_masks_in_image(logits.sigmoid(), boxes, SEEN)[:, 0]
    image = torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=g)
    colours = palette(n)[1:]
    scaled = boxes * torch.tensor([size[1] / width, size[0] / height] * 2)
    return logits[:, 0].sigmoid(), scaled, probs, image, colours


def evaluation_full(maps: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> list[str]:
    """Evaluation's masks as spinedet had them: pasted at full size, thresholded, encoded."""
    return encode(paste_masks(maps, boxes, *size) > 0.5)


def evaluation_crops(maps: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> list:
    return paste_mask_crops(maps, boxes, *size).to_rle()


def full_size(probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Every map resized whole and thresholded, one at a time: (N, H, W) bool."""
    return torch.stack(
        [F.interpolate(p[None, None], size, mode="bilinear")[0, 0] > 0.5 for p in probs]
    )


def encode(masks: torch.Tensor) -> list[str]:
    return [
        mask_utils.encode(np.asfortranarray(m.numpy().astype(np.uint8)))["counts"].decode()
        for m in masks
    ]


def _status_gb(field: str) -> float:
    """A size from /proc/self/status (Linux), in GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1e6
    raise KeyError(field)


def run_all(way: str, size: tuple[int, int], n: int) -> float:
    """How far (GB) resizing, drawing and encoding ``way`` raise the resident size, and how far
    evaluation's pasting and encoding do."""
    torch.set_num_threads(1)
    maps, boxes, probs, image, colours = inputs(size, n)
    rises = []
    for stage in ("predict", "evaluate"):
        Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) back to the current size
        before = _status_gb("VmRSS")
        if stage == "evaluate":
            (evaluation_full if way == "full" else evaluation_crops)(maps, boxes, size)
        elif way == "full":
            masks = full_size(probs, size)
            draw_segmentation_masks(image, masks, MASK_ALPHA, colours), encode(masks)
            del masks
        else:
            crops = resize_masks(probs, size)
            draw_masks(image, crops, colours), crops.to_rle()
            del crops
        rises.append(_status_gb("VmHWM") - before)
    return rises


def timed(size: tuple[int, int], n: int, repeats: int, warmup: int) -> list[list[str]]:
    """Check that both ways give the same, then time each stage: table rows."""
    maps, boxes, probs, image, colours = inputs(size, n)
    full = full_size(probs, size)
    crops = resize_masks(probs, size)
    drawn = draw_segmentation_masks(image, full, MASK_ALPHA, colours)
    same = (
        torch.equal(crops.full(), full)
        and torch.equal(draw_masks(image, crops, colours), drawn)
        and [r["counts"] for r in crops.to_rle()] == encode(full)
    )
    print(f"identical masks, drawing and RLE: {'yes' if same else 'NO'}")
    rles = evaluation_crops(maps, boxes, size)
    same = [r["counts"] for r in rles] == evaluation_full(maps, boxes, size)
    print(f"identical evaluation RLE: {'yes' if same else 'NO'}")
    print(f"mask pixels: {int(full.sum()) / full[0].numel():.2f} images' worth; crops "
          f"{sum(c.numel() for c in crops.crops) / full[0].numel():.2f}\n")  # fmt: skip
    stages = {
        "resize + threshold": (lambda: full_size(probs, size), lambda: resize_masks(probs, size)),
        "draw": (
            lambda: draw_segmentation_masks(image, full, MASK_ALPHA, colours),
            lambda: draw_masks(image, crops, colours),
        ),
        "COCO RLE": (lambda: encode(full), crops.to_rle),
        "evaluation: paste, threshold, RLE": (
            lambda: evaluation_full(maps, boxes, size),
            lambda: evaluation_crops(maps, boxes, size),
        ),
    }
    rows = []
    for stage, (reference, candidate) in stages.items():
        times = compare({"full": reference, "crops": candidate}, "full", repeats, warmup)
        full_t, crops_t = times["full"], times["crops"]
        rows.append([stage, ms(full_t.median_s), ms(crops_t.median_s), f"{crops_t.ratio:.3f}"])
    return rows


def main() -> None:
    args = parse_args(
        __doc__.splitlines()[0],
        repeats=3,
        size={"type": int, "nargs": 2, "default": [3000, 4000], "help": "image height, width"},
        masks={"type": int, "default": 100, "help": "masks per image"},
    )
    size = tuple(args.size)
    print(f"# {args.masks} masks of a {size[1]} x {size[0]} image: crops vs full size\n")
    print(f"{machine()}\n")
    rows = timed(size, args.masks, args.repeats, args.warmup)
    context = multiprocessing.get_context("spawn")  # a fresh process per way: its own peak
    with context.Pool(1, maxtasksperchild=1) as pool:
        full, crops = (pool.apply(run_all, (way, size, args.masks)) for way in ("full", "crops"))
    for stage, f, c in zip(("resize, draw, RLE", "evaluation"), full, crops, strict=True):
        rows.append([f"peak memory rise, {stage} (GB)", f"{f:.2f}", f"{c:.2f}",
                     f"{c / max(f, 1e-3):.3f}"])  # fmt: skip
    print(table(["stage", "full size ms", "crops ms", "ratio crops / full"], rows))
    print(
        "\nratio: median over interleaved rounds of crops time / full-size time in that round;"
        " memory in a fresh process per way (its peak resident size less that before the stage)."
    )


if __name__ == "__main__":
    main()
