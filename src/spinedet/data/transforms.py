"""Training and evaluation pipelines built from ``torchvision.transforms.v2``.

v2 transforms move ``BoundingBoxes`` and ``Mask`` tv_tensors together with the image, so the
geometry is torchvision's, not ours.
"""

from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms import v2


def _per_instance_fields(sample: Any) -> tuple[torch.Tensor, ...]:
    """Target fields that must be filtered with the boxes (masks are found automatically)."""
    target = sample[1]
    return tuple(target[key] for key in ("labels", "area", "iscrowd") if key in target)


def train_transforms(
    size: int, scale_range: tuple[float, float] = (0.5, 2.0), hflip: float = 0.5
) -> v2.Compose:
    """Large-scale jitter training pipeline producing ``size`` x ``size`` float images in [0, 1].

    ``ScaleJitter`` resizes by ``s * min(size / h, size / w)``, i.e. the long side becomes
    ``s * size`` with ``s`` drawn from ``scale_range``; the crop then pads or cuts to a square.
    """
    return v2.Compose(
        [
            v2.ScaleJitter((size, size), scale_range=scale_range),
            v2.RandomCrop(size, pad_if_needed=True, fill=0),
            v2.RandomHorizontalFlip(hflip),
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(labels_getter=_per_instance_fields),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


def eval_transforms() -> v2.Identity:
    """Nothing: a spinedet detector takes the uint8 image, which it scales to [0, 1] and shrinks
    antialiased to its size (``DetectionTransform``), a quarter of the bytes a float image
    would be from the loader, and no float pass over a large photo's every pixel."""
    return v2.Identity()


# What tensorflow/tpu's classification parser feeds its networks: RGB in [0, 1] normalised with
# ImageNet's mean and std; at evaluation the centre 224/256 of the short side, resized.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CENTER_CROP_FRACTION = 0.875


def classification_train_transforms(
    size: int, area: tuple[float, float] = (0.08, 1.0), hflip: float = 0.5
) -> v2.Compose:
    """A random crop of ``area`` (fraction of the image, aspect 3/4..4/3) resized to ``size`` x
    ``size``, a horizontal flip, then the classifiers' normalisation."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(size, scale=area, antialias=True),
            v2.RandomHorizontalFlip(hflip),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def classification_eval_transforms(size: int) -> v2.Compose:
    """The short side resized to ``size / 0.875``, the centre ``size`` x ``size`` crop, and the
    classifiers' normalisation: what a classifier is evaluated and predicts on."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(round(size / CENTER_CROP_FRACTION), antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
