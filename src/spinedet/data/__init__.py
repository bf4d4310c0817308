"""Datasets: COCO loading, ImageFolder trees, transforms, checking, splitting and the synthetic
shapes set."""

from spinedet.data.check import (
    Problem,
    check_dataset,
    check_dataset_cached,
    format_report,
    inspect_dataset,
)
from spinedet.data.classification import ImageFolderDataset, check_image_folder
from spinedet.data.coco import CocoDataset, collate, load_image
from spinedet.data.errors import DataError, UnreadableImage
from spinedet.data.shapes import make_shape_classes, make_shapes
from spinedet.data.split import split_dataset
from spinedet.data.transforms import eval_transforms, train_transforms

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
