"""Datasets: COCO loading, ImageFolder trees, transforms, checking, splitting and the synthetic
shapes set.

Checking, splitting and drawing the shapes set need no torch; the datasets, ``collate`` and
the transforms load it (about 5 s) on first use, so ``spinedet data check/split/shapes`` start
at once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from spinedet.data.check import (
    Problem,
    check_dataset,
    check_dataset_cached,
    format_report,
    inspect_dataset,
)
from spinedet.data.coco_files import load_image
from spinedet.data.errors import DataError, UnreadableImage
from spinedet.data.shapes import make_shape_classes, make_shapes
from spinedet.data.split import split_dataset

if TYPE_CHECKING:
    from spinedet.data.classification import ImageFolderDataset, check_image_folder
    from spinedet.data.coco import CocoDataset, collate
    from spinedet.data.transforms import eval_transforms, train_transforms

_WITH_TORCH = {
    "CocoDataset": "coco",
    "collate": "coco",
    "ImageFolderDataset": "classification",
    "check_image_folder": "classification",
    "eval_transforms": "transforms",
    "train_transforms": "transforms",
}


def __getattr__(name: str) -> Any:
    if name in _WITH_TORCH:
        return getattr(importlib.import_module(f"{__name__}.{_WITH_TORCH[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CocoDataset",
    "DataError",
    "ImageFolderDataset",
    "Problem",
    "UnreadableImage",
    "check_dataset",
    "check_dataset_cached",
    "check_image_folder",
    "collate",
    "eval_transforms",
    "format_report",
    "inspect_dataset",
    "load_image",
    "make_shape_classes",
    "make_shapes",
    "split_dataset",
    "train_transforms",
]
