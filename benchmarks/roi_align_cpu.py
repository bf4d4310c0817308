"""RoIAlign forward + backward on the CPU: torchvision's ``roi_align`` (aligned, one sample per
bin, as ``PyramidRoIAlign`` calls it) vs spinedet's ``separable_roi_align``, which training on
a CPU uses on feature maps up to 32 x 32 (``separable_pays``: not on the 640 px levels below).

Shapes: the quickstart's box and mask heads (8 images of 192 px, P3 24 x 24 with 64 channels,
64 sampled boxes per image, 32 of them positives for the mask head) and two 640 px levels of a
SpineNet-49S batch of 2 (128 channels; P4 40 x 40, P3 80 x 80, 512 boxes per image). Boxes
are random, inside the image, 8-64 px.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch
from torchvision.ops import roi_align

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import compare, machine, ms, parse_args, table  # noqa: E402

from spinedet.models.separable_roi_align import separable_roi_align  # noqa: E402

# (label, images, channels, feature side, boxes per image, output side, image side)
CASES = [
    ("quickstart box head", 8, 64, 24, 64, 7, 192),
    ("quickstart mask head", 8, 64, 24, 32, 14, 192),
    ("640 px box head, P4", 2, 128, 40, 512, 7, 640),
    ("640 px box head, P3", 2, 128, 80, 512, 7, 640),
]


def inputs(images: int, channels: int, side: int, per_image: int, image: int):
    g = torch.Generator().manual_seed(0)
    features = torch.randn(images, channels, side, side, generator=g).requires_grad_()
    n = images * per_image
    wh = torch.rand(n, 2, generator=g) * 56 + 8
    xy = torch.rand(n, 2, generator=g) * (image - wh)
    index = torch.arange(images).repeat_interleave(per_image)[:, None].float()
    return features, torch.cat([index, xy, xy + wh], 1)


def forward_backward(align, features, rois):
    def run() -> None:
        out = align(features, rois)
        out.backward(torch.ones_like(out))
        features.grad = None

    return run


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    print(f"# RoIAlign forward + backward on the CPU\n\n{machine()}\n")
    rows = []
    for label, images, channels, side, per_image, size, image in CASES:
        features, rois = inputs(images, channels, side, per_image, image)
        crop = {"output_size": (size, size), "spatial_scale": side / image, "sampling_ratio": 1}
        timings = compare(
            {
                "torchvision": forward_backward(
                    partial(roi_align, aligned=True, **crop), features, rois
                ),
                "separable": forward_backward(partial(separable_roi_align, **crop), features, rois),
            },
            "torchvision",
            args.repeats,
            args.warmup,
        )
        rows.append(
            [
                label,
                len(rois),
                f"{size} x {size}",
                ms(timings["torchvision"].median_s),
                ms(timings["separable"].median_s),
                f"{1 / timings['separable'].ratio:.2f}x",
            ]
        )
    headers = ["case", "boxes", "crop", "torchvision ms", "separable ms", "speed-up"]
    print(table(headers, rows))
    print(
        f"\nMedian of {args.repeats} interleaved rounds; speed-up is the median of per-round"
        " ratios. Outputs and gradients are tested equal (tests/test_fast_paths.py)."
    )


if __name__ == "__main__":
    main()
