"""Mask R-CNN masks of a large image: resized, drawn and COCO-encoded from crops vs full-size.

What ``Predictor`` and ``spinedet predict`` do with a model's masks once it has run: 100 mask
probability maps pasted at the size the model saw (640 x 480, by torchvision's
``paste_masks_in_image``) are resized to the 4000 x 3000 image and thresholded, drawn over it
and encoded as COCO RLE. The reference is the full-size way (spinedet's until masks became
crops): each map resized whole by ``F.interpolate`` into a (100, H, W) bool tensor, torchvision's
``draw_segmentation_masks`` and pycocotools' ``encode`` of every full mask. The crops
(``spinedet.masks.resize_masks``, ``spinedet.draw.draw_masks``, ``MaskCrops.to_rle``) are checked to
give the identical masks, drawing and RLE strings before they are timed. Peak memory is each
way's rise of the peak resident size (Linux's VmHWM), run alone in a fresh process.
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

SEEN = (480, 640)  # the model's view of a 4:3 image at its size, 640


def inputs(size: tuple[int, int], n: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    """``n`` pasted mask probability maps at ``SEEN`` (boxes 3-25% of a side, blobs of 0.5 and
    above within them), an image of ``size`` and a colour per mask."""
    g = torch.Generator().manual_seed(0)
    height, width = SEEN
    centre = torch.rand(n, 2, generator=g) * torch.tensor([width, height])
    half = (torch.rand(n, 2, generator=g) * 0.11 + 0.015) * torch.tensor([width, height])
    boxes = torch.cat([centre - half, centre + half], 1)
    logits = F.interpolate(torch.randn(n, 1, 7, 7, generator=g) * 4, (28, 28), mode="bilinear")
    probs = paste_masks_in_image(logits.sigmoid(), boxes, SEEN)[:, 0]
    image = torch.randint(0, 256, (3, *size), dtype=torch.uint8, generator=g)
    colours = palette(n)[1:]
    return probs, image, colours


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
    """How far (GB) resizing, drawing and encoding ``way`` raise the resident size."""
    torch.set_num_threads(1)
    probs, image, colours = inputs(size, n)
    Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) back to the current size
    before = _status_gb("VmRSS")
    if way == "full":
        masks = full_size(probs, size)
        draw_segmentation_masks(image, masks, MASK_ALPHA, colours), encode(masks)
    else:
        crops = resize_masks(probs, size)
        draw_masks(image, crops, colours), crops.to_rle()
    return _status_gb("VmHWM") - before


def timed(size: tuple[int, int], n: int, repeats: int, warmup: int) -> list[list[str]]:
    """Check that both ways give the same, then time each stage: table rows."""
    probs, image, colours = inputs(size, n)
    full = full_size(probs, size)
    crops = resize_masks(probs, size)
    drawn = draw_segmentation_masks(image, full, MASK_ALPHA, colours)
    same = (
        torch.equal(crops.full(), full)
        and torch.equal(draw_masks(image, crops, colours), drawn)
        and [r["counts"] for r in crops.to_rle()] == encode(full)
    )
    print(f"identical masks, drawing and RLE: {'yes' if same else 'NO'}")
    print(f"mask pixels: {int(full.sum()) / full[0].numel():.2f} images' worth; crops "
          f"{sum(c.numel() for c in crops.crops) / full[0].numel():.2f}\n")  # fmt: skip
    stages = {
        "resize + threshold": (lambda: full_size(probs, size), lambda: resize_masks(probs, size)),
        "draw": (
            lambda: draw_segmentation_masks(image, full, MASK_ALPHA, colours),
            lambda: draw_masks(image, crops, colours),
        ),
        "COCO RLE": (lambda: encode(full), crops.to_rle),
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
    rows.append(["peak memory rise, all three (GB)", f"{full:.2f}", f"{crops:.2f}",
                 f"{crops / max(full, 1e-3):.3f}"])  # fmt: skip
    print(table(["stage", "full size ms", "crops ms", "ratio crops / full"], rows))
    print(
        "\nratio: median over interleaved rounds of crops time / full-size time in that round;"
        " memory in a fresh process per way (its peak resident size less that before the stage)."
    )


if __name__ == "__main__":
    main()
