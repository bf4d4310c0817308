"""The three jobs as Python functions: ``train``, ``evaluate`` and ``predict``."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import CocoDataset, ImageFolderDataset
from ..data.coco_files import some_ids
from ..data.errors import DataError
from ..data.transforms import classification_eval_transforms, eval_transforms
from ..errors import SpinedetError, shorten
from ..files import atomic_write, refuse_existing, writable_folder
from ..models import describe, detection_selection, load_model
from ..models.registry import task_of
from ..models.weights import resolve_checkpoint
from ..optimize import optimize_for_inference
from ..predictor import Predictor, check_positive, tile_settings
from . import distributed
from .analysis import write_analysis
from .classification import evaluate_classifier
from .distributed import flush_denormals
from .evaluate import evaluate_distributed, without_images
from .predict import InputItem, PredictionReport, collect_inputs, predict_images
from .runtime import loader_workers
from .trainer import train

log = logging.getLogger(__name__)

__all__ = ["train", "evaluate", "predict", "resolve_checkpoint", "load_checkpoint"]


def load_checkpoint(path: str | Path, **overrides) -> tuple[nn.Module, list[dict[str, Any]]]:
    """The model saved in ``path`` and its categories (user ids and names)."""
    flush_denormals()
    path = resolve_checkpoint(path)
    model = load_model(path, **overrides)
    categories = [{"id": c.id, "name": c.name} for c in describe(model).categories]
    return model, categories


def evaluate(
    checkpoint: str | Path,
    annotations: str | Path | None,
    images: str | Path,
    out_dir: str | Path | None = None,
    batch_size: int = 2,
    device: str | None = None,
    workers: int | None = None,
    optimize: bool = True,
    by_order: bool = False,
    overwrite: bool = False,
    confusion_score: float = 0.5,
    image_size: int | None = None,
    tile: int | None = None,
    tile_overlap: float | None = None,
    tile_whole: bool = False,
) -> dict[str, dict[str, Any]]:
    """COCO AP (box, and mask for Mask R-CNN) of a checkpoint on a COCO json data set; for a
    classifier (``annotations`` None), top-1/top-5 and per-class accuracy on the ImageFolder
    tree ``images`` (see :func:`~spinedet.engine.classification.classification_metrics`).

    With ``out_dir``, writes ``metrics.json``, the COCO results file ``results.json`` and the
    analysis (precision-recall curves, confusion matrix of the detections scoring at least
    ``confusion_score``, ``per_class.csv``). Under ``torchrun`` every process takes a share
    of the images and of the classes; rank 0 writes the files.
    ``device`` defaults to CUDA when present, ``workers`` (DataLoader processes) to
    :func:`~spinedet.engine.runtime.loader_workers`'s choice for it; ``optimize`` runs the
    model optimised for inference (BatchNorm folded, channels-last, oneDNN on CPU), equal to
    the plain model up to float rounding (on CPUs with AMX, bfloat16 convolutional parts:
    close, not equal). ``by_order``: a classifier's class folders are its classes in sorted
    order, whatever their names (see :class:`~spinedet.data.ImageFolderDataset`).
    ``overwrite``: replace an earlier evaluation's ``metrics.json`` in ``out_dir`` (else
    refused before evaluating). ``image_size``: run the model at this size instead of the one
    it was trained at (a detector's long side, a classifier's crop). ``tile``, ``tile_overlap``
    and ``tile_whole``: a detector detects in tiles of the larger images, as
    :class:`~spinedet.predictor.Predictor` does, its detections merged and capped at its own
    count per image.
    """
    tile_settings(tile, tile_overlap, tile_whole)  # refused before anything is loaded
    check_positive("batch_size", batch_size)
    if out_dir is not None:  # before the pass, which may take hours, not after it
        refuse_existing(writable_folder(out_dir) / "metrics.json", overwrite)
    info = distributed.setup(device)
    workers = loader_workers(workers, info.device)
    try:
        sized = {} if image_size is None else {"image_size": image_size}
        model, categories = load_checkpoint(checkpoint, **sized)
        task = task_of(model)
        if task is None:
            raise SpinedetError(f"{checkpoint} holds a backbone: evaluate a detector")
        if task.name == "classifier":
            if tile is not None:
                raise SpinedetError("tile (--tile): a classifier sees each image whole")
            return _evaluate_classifier(model, images, out_dir, batch_size, info, workers,
                                        optimize, by_order)  # fmt: skip
        if by_order:
            raise SpinedetError("by_order (--by-order) applies to classifiers only")
        if annotations is None:
            raise SpinedetError(f"{checkpoint} holds a detector: give --annotations (COCO json)")
        # COCO's evaluation reads the ground truth from the json: the images are all it needs.
        dataset = CocoDataset(annotations, images, eval_transforms(), False, categories)
        # Training's loader stands a missing image in as blank; here that would report an AP
        # lowered by its missed objects (every one of them, for a wrong --images).
        if missing := dataset.missing_images():
            raise DataError(
                f"{some_ids('images', missing)} of {len(dataset)} have no file in {images}",
                annotations,
            )
        iou_types = ("bbox", "segm") if task.masks and dataset.segmented else ("bbox",)
        if task.masks and not dataset.segmented:
            log.warning("%s has annotations without segmentation: box AP only", annotations)
        label_to_cat = describe(model).label_to_category_id()
        model = model.eval().to(info.device)
        if optimize:
            model = optimize_for_inference(model)
        if tile is not None:
            model = _InTiles(model, info.device, batch_size, tile, tile_overlap, tile_whole)
        metrics, results = evaluate_distributed(
            model, dataset, label_to_cat, info.device, info, iou_types,
            batch_size, workers, progress=distributed.is_main(info),
        )  # fmt: skip
        if out_dir is not None and distributed.is_main(info):
            out = Path(out_dir)
            text = json.dumps(metrics, indent=1, allow_nan=False)
            atomic_write(out / "results.json", lambda t: Path(t).write_text(json.dumps(results)))
            # Without the unreadable images, as the AP: their objects were never looked for.
            scored = without_images(dataset.coco, metrics["bbox"].get("unreadable_images", ()))
            write_analysis(scored, results, iou_types, out, score_threshold=confusion_score)
            # Last: it marks a finished evaluation, which a second one into out_dir refuses.
            atomic_write(out / "metrics.json", lambda t: Path(t).write_text(text))
        return metrics
    finally:
        distributed.teardown()


class _InTiles(nn.Module):
    """A detector run in tiles by a :class:`~spinedet.predictor.Predictor` that keeps what the
    detector keeps (its score threshold, its count per image, once merged), giving what the
    detector gives: per image a dict of boxes, scores, labels and masks (as crops)."""

    def __init__(self, detector: nn.Module, device: torch.device, batch_size: int, tile: int,
                 overlap: float, whole: bool) -> None:  # fmt: skip
        super().__init__()
        heads = detection_selection(detector)
        self.predictor = Predictor(detector, device, float(heads.score_thresh), optimize=False,
                                   batch_size=batch_size,
                                   max_detections=int(heads.detections_per_img), tile=tile,
                                   tile_overlap=overlap, tile_whole=whole)  # fmt: skip
        self.detector = detector  # a submodule: eval() and train() reach it

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, Any]]:
        outputs = []
        for found in self.predictor.predict_batch(images):
            crops = found.mask_crops
            masks = {} if crops is None else {"masks": crops}
            outputs.append({"boxes": found.boxes, "scores": found.scores,
                            "labels": found.labels} | masks)  # fmt: skip
        return outputs


def _evaluate_classifier(model: nn.Module, images: str | Path, out_dir: str | Path | None,
                         batch_size: int, info: distributed.DistInfo, workers: int,
                         optimize: bool, by_order: bool) -> dict[str, Any]:  # fmt: skip
    """Top-1/top-5 and per-class accuracy on an ImageFolder tree whose class folders are named
    as the model's classes, or are them in order (``metrics.json`` in ``out_dir``)."""
    names = describe(model).class_names
    transform = classification_eval_transforms(model.image_size)
    dataset = ImageFolderDataset(images, transform, names, by_order)
    model = model.eval().to(info.device)
    if optimize:
        model = optimize_for_inference(model)
    metrics = evaluate_classifier(model, dataset, info.device, info, batch_size, workers,
                                  progress=distributed.is_main(info))  # fmt: skip
    if out_dir is not None and distributed.is_main(info):
        text = json.dumps(metrics, indent=1, allow_nan=False)
        atomic_write(Path(out_dir) / "metrics.json", lambda t: Path(t).write_text(text))
    return metrics


class PredictError(SpinedetError):
    """Some inputs could not be read (the others were predicted)."""


def predict(
    checkpoint: str | Path,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    score_threshold: float = 0.5,
    device: str | None = None,
    *,
    batch_size: int = 4,
    every: int = 1,
    draw: bool = True,
    save_masks: str | None = None,
    annotations: str | Path | None = None,
    overwrite: bool = False,
    optimize: bool = True,
    top_k: int | None = None,
    max_detections: int | None = None,
    classes: Sequence[str | int] | None = None,
    nms_threshold: float | None = None,
    image_size: int | None = None,
    tile: int | None = None,
    tile_overlap: float | None = None,
    tile_whole: bool = False,
) -> PredictionReport:
    """Predict on images, directories, globs and videos (every ``every``-th frame) into
    ``out_dir`` (see :func:`~spinedet.engine.predict.predict_images`); returns the report.

    A classifier's records hold its ``top_k`` classes and probabilities instead of detections
    (no drawings); ``max_detections`` caps a detector's detections per image, ``classes`` keeps
    only those categories (names or ids), ``nms_threshold`` replaces the detector's NMS IoU
    threshold, ``image_size`` the size the model runs at, ``tile``, ``tile_overlap`` and
    ``tile_whole`` detect in tiles of large images (see :class:`~spinedet.predictor.Predictor`).
    Raises :class:`PredictError` after writing everything else when inputs were unreadable,
    naming them; with ``annotations`` (a COCO file), image ids are that file's (see
    :func:`_image_ids`), and the others' are above all of them.
    """
    flush_denormals()
    predictor = Predictor(checkpoint, device, score_threshold, optimize, batch_size, "binary",
                          top_k, max_detections=max_detections, classes=classes,
                          nms_threshold=nms_threshold, image_size=image_size, tile=tile,
                          tile_overlap=tile_overlap, tile_whole=tile_whole)  # fmt: skip
    items, skipped = collect_inputs(inputs, exclude=out_dir)
    if not items and not skipped:
        raise SpinedetError(f"no images or videos found in {', '.join(map(str, inputs))}")
    image_ids, sizes, first_id = (
        _image_ids(annotations, items) if annotations is not None else ({}, {}, 0)
    )
    report = predict_images(predictor, items, out_dir, image_ids=image_ids, image_sizes=sizes,
                            first_id=first_id, every=every, draw=draw, save_masks=save_masks,
                            overwrite=overwrite)  # fmt: skip
    report.skipped[:0] = skipped
    if report.skipped:
        listed = "; ".join(f"{path} ({why})" for path, why in report.skipped)
        raise PredictError(
            f"{len(report.skipped)} input(s) skipped: {listed}; "
            f"the {report.images} readable image(s) are in {report.path}"
        )
    return report


def _image_ids(
    annotations: str | Path, items: Sequence[InputItem]
) -> tuple[dict[Path, int], dict[Path, tuple[int, int]], int]:
    """The COCO image id and (width, height) of each input image found in ``annotations`` (by
    its path), and the first id above all of the file's, from which the others are numbered.

    An entry's ``file_name`` is relative to the data set's image directory, so a file matches
    the entry whose whole ``file_name`` ends its path (the longest, when several do); failing
    that, by base name, only where one entry has it: a base name that several share and no path
    tells apart is an error (any of them could be meant).
    """
    try:
        images = json.loads(Path(annotations).read_text())["images"]
        ids = {Path(os.path.normpath(str(im["file_name"]))).parts: int(im["id"]) for im in images}
        sizes = {int(im["id"]): (int(im["width"]), int(im["height"]))
                 for im in images if "width" in im and "height" in im}  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SpinedetError(f"{annotations}: not a COCO annotation file ({e})") from None
    by_base: dict[str, list[tuple[str, ...]]] = {}
    for parts in filter(None, ids):  # an empty file_name names no file
        by_base.setdefault(parts[-1], []).append(parts)
    found: dict[Path, int] = {}
    unmatched = 0
    for item in items:
        parts = Path(os.path.abspath(item.path)).parts
        path_match = next((parts[-n:] for n in range(len(parts), 0, -1) if parts[-n:] in ids), None)
        same_base = by_base.get(parts[-1], [])
        if item.is_video:
            unmatched += 1  # its frames are not the json's images
        elif path_match is not None:
            found[item.path] = ids[path_match]
        elif len(same_base) == 1:
            found[item.path] = ids[same_base[0]]
        elif same_base:
            names = shorten(sorted("/".join(c) for c in same_base))
            raise SpinedetError(
                f"{item.path}: its base name matches {len(same_base)} images of {annotations} "
                f"({names}) but its path none: give the folder their file names are relative to"
            )
        else:
            unmatched += 1
    first = max(ids.values(), default=-1) + 1
    if unmatched:
        log.warning("%d of %d input(s) not in %s: numbered from image id %d",
                    unmatched, len(items), annotations, first)  # fmt: skip
    return found, {path: sizes[i] for path, i in found.items() if i in sizes}, first
