"""COCO-format instance datasets for torchvision: the Dataset and its collate function."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from spinedet.data.coco_files import (
    AREA,
    NO_IMAGES,
    bad_areas,
    decode_segmentation,
    image_path,
    image_size_problem,
    leaves_directory,
    load_image,
    no_region,
    no_segmentation,
    read_json,
    repeated,
    shrunk_size,
    some_ids,
    unsegmented,
)
from spinedet.data.errors import DataError, UnreadableImage
from spinedet.data.index import AnnotationIndex
from spinedet.errors import shorten

log = logging.getLogger(__name__)

Target = dict[str, Any]


def _quiet_coco(dataset: dict[str, Any]) -> COCO:
    """Index a parsed COCO dict with pycocotools without its progress prints."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoDataset(Dataset):
    """Instances from a COCO json file, as ``(tv_tensors.Image, target)`` pairs for torchvision.

    Category ids may be arbitrary; they map to contiguous labels ``1..K`` (0 is background).
    Crowd annotations stay in ``coco`` for evaluation but are never training targets; with
    ``masks``, neither are annotations whose polygons give no region (logged once). Samples
    come from a compact :class:`AnnotationIndex`, so memory stays flat in loader workers.

    ``max_size``: an image whose long side is larger is loaded resized to that (antialiased),
    its boxes and masks with it, the masks decoded at that size: training's transforms never
    use more pixels than their largest scale, and a 12-megapixel photo's 30 masks at full size
    took seconds a sample. The targets' ``area`` stays the annotation's.
    """

    def __init__(
        self,
        annotations: str | Path,
        images: str | Path,
        transforms: Callable[[Any, Target], tuple[Any, Target]] | None = None,
        masks: bool = True,
        categories: Sequence[Mapping[str, Any]] | None = None,
        max_size: int | None = None,
    ) -> None:
        self.annotations = Path(annotations)
        self.max_size = max_size
        self.images = Path(images)
        self.transforms = transforms
        self.masks = masks
        dataset = read_json(self.annotations)
        self._validate(dataset)
        own = sorted(({"id": c["id"], "name": c["name"]} for c in dataset["categories"]),
                     key=lambda c: c["id"])  # fmt: skip
        self.categories = own if categories is None else self._among(own, categories)
        self.cat_id_to_label = {c["id"]: i + 1 for i, c in enumerate(self.categories)}
        self.label_to_cat_id = {label: cat_id for cat_id, label in self.cat_id_to_label.items()}
        self.class_names = [c["name"] for c in self.categories]
        self.num_classes = len(self.categories) + 1
        try:
            self.index = AnnotationIndex(dataset, self.cat_id_to_label, masks)
        except (KeyError, TypeError, ValueError) as e:
            hint = "(run `spinedet data check` for details)"
            raise DataError(f"malformed images or annotations {hint}", self.annotations) from e
        if masks and (ids := self.index.ann_ids[~self.index.regions].tolist()):
            log.warning("%s: %s", self.annotations, no_region(ids))
        self._coco: COCO | None = None
        self._unreadable: set[Any] = set()  # image ids skipped, so each is logged once

    def _among(
        self, own: list[dict[str, Any]], categories: Sequence[Mapping[str, Any]]
    ) -> list[dict[str, Any]]:
        """``categories`` (a model's), refusing a file category outside them: its labels would
        be another class's, or beyond the class head; and one the model names otherwise."""
        names = {c["id"]: str(c["name"]) for c in categories}
        unknown = sorted({c["id"] for c in own} - set(names))
        if unknown:
            ids = {name: i for i, name in names.items()}
            moved = [f"{c['name']!r} is {ids[str(c['name'])]}" for c in own
                     if c["id"] in unknown and str(c["name"]) in ids]  # fmt: skip
            hint = f"; the model numbers them otherwise ({shorten(moved)})" if moved else ""
            raise DataError(
                f"category ids {unknown[:10]} are not among the model's categories{hint}",
                self.annotations,
            )
        # The same id for another class would score one class's detections against another's
        # objects; a model's name that is only its id (an unnamed model's) says nothing.
        renamed = [
            f"{c['id']} is {c['name']!r} here but {names[c['id']]!r} in the model"
            for c in own
            if names[c["id"]] not in (str(c["name"]), str(c["id"]))
        ]
        if renamed:
            raise DataError(f"categories named otherwise than the model's: {shorten(renamed)}",
                            self.annotations)  # fmt: skip
        return [{"id": c["id"], "name": c["name"]} for c in categories]

    @property
    def coco(self) -> COCO:
        """The pycocotools index of the whole file (crowd annotations included), for evaluation.

        Built on first use from the file: training never needs it, and its millions of Python
        objects would be copied into every DataLoader worker that touched them.
        """
        if self._coco is None:
            dataset = read_json(self.annotations)
            dataset.setdefault("annotations", [])  # pycocotools expects the key
            self._coco = _quiet_coco(dataset)
        return self._coco

    @property
    def ids(self) -> list[Any]:
        """The image ids in file order (a new list; ``index.image_id(i)`` reads one)."""
        return self.index.ids.tolist()

    def __getstate__(self) -> dict[str, Any]:
        # Workers started by spawn receive a pickled copy: without the evaluation index.
        return {**self.__dict__, "_coco": None}

    def _validate(self, dataset: Any) -> None:
        """Fail fast on what would otherwise break mid-training; ``data check`` reports the same
        rules (``coco_files``), every instance of each."""
        hint = "(run `spinedet data check` for details)"
        if not isinstance(dataset, dict) or not all(
            isinstance(dataset.get(key), list) for key in ("images", "categories")
        ):
            raise DataError(f"needs 'images' and 'categories' lists {hint}", self.annotations)
        try:
            cat_ids = {c["id"] for c in dataset["categories"]}
            twice = repeated(c["id"] for c in dataset["categories"])
            anns = dataset.get("annotations", [])
            unknown = sorted({a["category_id"] for a in anns} - cat_ids)
            unusable = unsegmented(anns)
            areas = bad_areas(anns)
            names = repeated(c["name"] for c in dataset["categories"])
        except (KeyError, TypeError) as e:
            raise DataError(f"malformed categories or annotations {hint}", self.annotations) from e
        if twice:
            ids = shorten([str(i) for i in twice])
            raise DataError(f"category ids are not unique: {ids} {hint}", self.annotations)
        if names:
            # Names key the per-class metrics and the model's class list.
            twice = shorten(sorted(str(n) for n in names))
            raise DataError(f"category names are not unique: {twice} {hint}", self.annotations)
        if not dataset["images"]:
            raise DataError(NO_IMAGES, self.annotations)
        try:
            escaping = [im["id"] for im in dataset["images"] if leaves_directory(im["file_name"])]
            image_ids = repeated(im["id"] for im in dataset["images"])
            unsized = {im["id"]: image_size_problem(im) for im in dataset["images"]}
        except (KeyError, TypeError) as e:
            raise DataError(f"malformed images {hint}", self.annotations) from e
        if image_ids:
            # Evaluation would score such an image's detections twice.
            ids = shorten([str(i) for i in image_ids])
            raise DataError(f"image ids are not unique: {ids} {hint}", self.annotations)
        if escaping:
            raise DataError(
                f"{some_ids('images', escaping)} have file names outside the image directory "
                f"{self.images}; use paths relative to it",
                self.annotations,
            )
        if unsized := {i: problem for i, problem in unsized.items() if problem}:
            first, problem = next(iter(unsized.items()))
            raise DataError(
                f"{some_ids('images', list(unsized))} have no usable size "
                f"(image {first}: {problem})",
                self.annotations,
            )
        if unknown:
            raise DataError(
                f"annotations use unknown category ids {unknown[:10]}", self.annotations
            )
        if areas:
            raise DataError(f"{some_ids('annotations', areas)}: {AREA}", self.annotations)
        self.segmented = not unusable  # every annotation has a mask
        if self.masks and unusable:
            raise DataError(
                f"{no_segmentation(unusable)} (in Python: masks=False)", self.annotations
            )

    def __len__(self) -> int:
        return len(self.index)

    def missing_images(self) -> list[Any]:
        """The ids of the images whose files are not in the image directory."""
        return [self.index.image_id(i) for i in range(len(self))
                if not image_path(self.images, self.index.image(i)[0]).is_file()]  # fmt: skip

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, Target]:
        """The image and its targets. An image that is missing or cannot be decoded does not
        stop a run: it is logged (once per image and process) and stands as a black image with
        no objects, under its own id, its target marked ``"unreadable": True`` (evaluation
        leaves it out of the AP). (Substituting another image instead would, in evaluation,
        score that image's detections twice.)"""
        image_id = self.index.image_id(index)
        file_name, width, height = self.index.image(index)
        seen = self._seen(height, width)
        image = tv_tensors.Image(torch.zeros((3, *seen), dtype=torch.uint8))
        rows = slice(0, 0)
        if image_id not in self._unreadable:
            try:
                pil = load_image(image_path(self.images, file_name), (width, height), seen[::-1])
                image = tv_tensors.Image(F.pil_to_tensor(pil))
                rows = self.index.rows(index)
            except UnreadableImage as e:
                log.warning("skipping image %s (a blank image without objects in training, "
                            "left out of AP in evaluation): %s", image_id, e)  # fmt: skip
                self._unreadable.add(image_id)
        # Copies: the index's arrays are shared with the other workers and must stay unwritten.
        boxes = torch.tensor(self.index.boxes[rows])
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width) * (seen[1] / width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height) * (seen[0] / height)
        # Degenerate boxes would crash torchvision's detectors; `data check` reports them.
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if self.masks:  # an empty mask would teach the mask head that the object has no pixels
            keep &= torch.tensor(self.index.regions[rows])

        target: Target = {
            "boxes": tv_tensors.BoundingBoxes(
                boxes[keep], format=tv_tensors.BoundingBoxFormat.XYXY, canvas_size=seen
            ),
            "labels": torch.tensor(self.index.labels[rows])[keep],
            "image_id": image_id,
            "area": torch.tensor(self.index.areas[rows])[keep],
            "iscrowd": torch.zeros(int(keep.sum()), dtype=torch.int64),
        }
        if image_id in self._unreadable:
            target["unreadable"] = True
        if self.masks:
            kept = np.arange(rows.start, rows.stop)[keep.numpy()]
            target["masks"] = tv_tensors.Mask(self._decode_masks(kept, height, width, seen))
        if self.transforms is not None:
            return self.transforms(image, target)
        return image, target

    def _seen(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) an image of that size is loaded at (see ``max_size``)."""
        if self.max_size is None:
            return height, width
        return shrunk_size(height, width, self.max_size)

    def _decode_masks(
        self, rows: np.ndarray, height: int, width: int, seen: tuple[int, int]
    ) -> torch.Tensor:
        masks = np.zeros((len(rows), *seen), np.uint8)  # numpy: cheaper fills than torch
        size = None if seen == (height, width) else seen
        for i, row in enumerate(rows):
            try:
                decode_segmentation(self.index.segmentation(row), height, width, size, masks[i])
            except ValueError as e:
                ann_id = self.index.ann_ids[row]
                raise DataError(f"annotation {ann_id}: {e}", self.annotations) from e
        return torch.from_numpy(masks)


def collate(batch: list[tuple[Any, Target]]) -> tuple[list[Any], list[Target]]:
    """Batch detection samples as lists: images differ in size and targets in length."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)
