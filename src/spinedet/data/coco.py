"""COCO-format instance datasets: robust image loading, segmentation decoding, the Dataset."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from spinedet.data.errors import DataError, UnreadableImage
from spinedet.data.index import AnnotationIndex
from spinedet.errors import shorten
from spinedet.models.weights import atomic_write

log = logging.getLogger(__name__)

EXIF_ORIENTATION = 0x0112
ROTATING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width and height

Target = dict[str, Any]


def read_json(path: str | Path) -> Any:
    """Parse a JSON file, turning every failure into a one-line ``DataError``."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}", path) from e
    except UnicodeDecodeError as e:
        raise DataError(f"not UTF-8 text ({e.reason} at byte {e.start})", path) from e
    except OSError as e:
        raise DataError(f"cannot read file: {e.strerror or e}", path) from e


def write_json(path: str | Path, content: Any) -> None:
    """Write ``content`` as JSON atomically (temp file, fsync, rename): never half a file."""

    def dump(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(content, f)

    atomic_write(path, dump)


def is_number(value: Any) -> bool:
    """True for finite ints and floats (JSON booleans excluded)."""
    return type(value) in (int, float) and math.isfinite(value)  # exact types: bool is an int


def size_mismatch(
    stored: tuple[int, int], oriented: tuple[int, int], expected: tuple[int, int]
) -> str | None:
    """Why an image of ``stored`` (w, h) pixels, ``oriented`` after EXIF, fails ``expected``.

    Annotations may have been drawn on the EXIF-rotated image or on the stored pixels; either is
    accepted, anything else is a mismatch.
    """
    if expected in (oriented, stored):
        return None
    rotated = "" if oriented == stored else f" ({oriented[0]}x{oriented[1]} after EXIF rotation)"
    return (
        f"image is {stored[0]}x{stored[1]}{rotated} "
        f"but the annotations say {expected[0]}x{expected[1]}"
    )


def _high_bit_depth_to_8bit(image: Image.Image) -> Image.Image:
    """Map 16/32-bit grey images to 8 bit by scaling; Pillow's ``convert('L')`` would clip."""
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16"):
        scaled = values / 257.0  # 65535 -> 255 exactly
    else:  # "I" (int32) or "F" (float): no fixed range, so stretch what is there
        low, high = float(values.min()), float(values.max())
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _high_bit_depth_to_8bit(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        # Transparent pixels hold arbitrary colours; composite on black, the same as padding.
        black = Image.new("RGBA", image.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def load_image(path: str | Path, size: tuple[int, int] | None = None) -> Image.Image:
    """Load any image a camera or tool writes as 8-bit RGB, upright according to its EXIF tag.

    ``size`` is the (width, height) the annotations assume: if it matches the stored pixels but
    not the EXIF-rotated image, the stored orientation is kept so the annotations still fit (a
    square image cannot tell, so EXIF wins); if it matches neither, a ``DataError`` is raised.
    """
    try:
        with Image.open(path) as stored:
            stored.load()
            image = ImageOps.exif_transpose(stored)
            if size is not None:
                problem = size_mismatch(stored.size, image.size, tuple(size))
                if problem:
                    raise DataError(problem, path)
                if image.size != tuple(size):
                    image = stored.copy()
            return _to_rgb(image)
    except DataError:
        raise
    except FileNotFoundError as e:
        raise UnreadableImage("image file not found", path) from e
    except Exception as e:  # Pillow raises many types (OSError, SyntaxError, struct.error, ...)
        raise UnreadableImage(f"cannot decode image: {e}", path) from e


def leaves_directory(file_name: str) -> bool:
    """Whether an image ``file_name`` names a file outside the image directory: absolute, or
    climbing out with ``..``. Decided on the name alone, so symlinks the user placed inside the
    directory still work."""
    normalised = os.path.normpath(file_name)
    return os.path.isabs(normalised) or normalised.split(os.sep, 1)[0] == os.pardir


def image_path(images: str | Path, file_name: str) -> Path:
    """``images / file_name``, refusing names that leave ``images``: a data set must never make
    training read other files (``../../etc/passwd``)."""
    if leaves_directory(file_name):
        raise DataError(f"image file name {file_name!r} points outside the image directory", images)
    return Path(images) / file_name


def polygon_problem(polygon: Any) -> str | None:
    """Why a COCO polygon ``[x0, y0, x1, y1, ...]`` is unusable, or None if it is fine."""
    if not isinstance(polygon, list) or not all(is_number(v) for v in polygon):
        return "polygon must be a list of numbers"
    if len(polygon) % 2:
        return f"polygon has an odd number of coordinates ({len(polygon)})"
    if len(polygon) < 6:
        return f"polygon has {len(polygon) // 2} points, at least 3 are needed"
    x, y = polygon[0::2], polygon[1::2]
    # Shoelace formula; plain Python beats numpy on typical polygons of a few dozen points.
    if sum(x[i - 1] * y[i] - x[i] * y[i - 1] for i in range(len(x))) == 0:
        return "polygon has zero area"
    return None


def _rle_string_counts(counts: str) -> list[int]:
    """Decode COCO's compressed RLE string (the format of pycocotools' ``rleFrString``).

    pycocotools trusts these strings (its C decoder has no bounds checks), so they are validated
    here. Each value is stored in 5-bit groups (chars '0' + group, 0x20 = more groups follow,
    0x10 in the last group = negative); from the fourth value on, values are deltas to the value
    two places earlier.
    """
    values: list[int] = []
    value = shift = 0
    for char in counts:
        group = ord(char) - 48
        if not 0 <= group < 64:
            raise ValueError(f"invalid character {char!r}")
        value |= (group & 0x1F) << shift
        shift += 5
        if group & 0x20:
            continue
        if group & 0x10:
            value -= 1 << shift
        if len(values) > 2:
            value += values[-2]
        values.append(value)
        value = shift = 0
    if shift:
        raise ValueError("truncated")
    return values


def _rle_runs(rle: Any, height: int, width: int) -> list[int]:
    """Run lengths of a COCO RLE dict for a ``height`` x ``width`` mask; ValueError if malformed."""
    if not isinstance(rle, dict) or "counts" not in rle or "size" not in rle:
        raise ValueError("RLE must be an object with 'size' and 'counts'")
    if rle["size"] != [height, width]:
        raise ValueError(f"RLE size {rle['size']} does not match the {width}x{height} image")
    counts = rle["counts"]
    if isinstance(counts, bytes | str):
        try:
            counts = _rle_string_counts(counts.decode() if isinstance(counts, bytes) else counts)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"RLE counts string is malformed ({e})") from e
    elif not isinstance(counts, list) or not all(type(c) is int for c in counts):
        raise ValueError("RLE counts must be a string or a list of integers")
    if any(c < 0 for c in counts):
        raise ValueError("RLE counts contain negative run lengths")
    if sum(counts) != height * width:
        raise ValueError(
            f"RLE runs cover {sum(counts)} pixels, the {width}x{height} image has {height * width}"
        )
    return counts


def rle_problem(rle: Any, height: int, width: int) -> str | None:
    """Why a COCO RLE dict does not describe a ``height`` x ``width`` mask, or None if it does."""
    try:
        _rle_runs(rle, height, width)
    except ValueError as e:
        return str(e)
    return None


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Decode a COCO segmentation (polygons, compressed or uncompressed RLE) to an HxW uint8 mask.

    Degenerate polygons cover no area and are skipped; malformed RLE raises ``ValueError``.
    """
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if polygon_problem(p) is None]
        if not polygons:
            return np.zeros((height, width), np.uint8)
        segmentation = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    runs = _rle_runs(segmentation, height, width)
    # Decoded here rather than by pycocotools, whose decode warns under NumPy 2 on every call.
    # Runs alternate between 0 and 1, starting with 0, over the pixels in column-major order.
    values = (np.arange(len(runs)) & 1).astype(np.uint8)
    return np.repeat(values, runs).reshape(width, height).T


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
    Crowd annotations stay in ``coco`` for evaluation but are never training targets. Samples
    come from a compact :class:`AnnotationIndex`, so memory stays flat in loader workers.
    """

    def __init__(
        self,
        annotations: str | Path,
        images: str | Path,
        transforms: Callable[[Any, Target], tuple[Any, Target]] | None = None,
        masks: bool = True,
    ) -> None:
        self.annotations = Path(annotations)
        self.images = Path(images)
        self.transforms = transforms
        self.masks = masks
        dataset = read_json(self.annotations)
        self._validate(dataset)
        self.categories = sorted(
            ({"id": c["id"], "name": c["name"]} for c in dataset["categories"]),
            key=lambda c: c["id"],
        )
        self.cat_id_to_label = {c["id"]: i + 1 for i, c in enumerate(self.categories)}
        self.label_to_cat_id = {label: cat_id for cat_id, label in self.cat_id_to_label.items()}
        self.class_names = [c["name"] for c in self.categories]
        self.num_classes = len(self.categories) + 1
        try:
            self.index = AnnotationIndex(dataset, self.cat_id_to_label, masks)
        except (KeyError, TypeError, ValueError) as e:
            hint = "(run `spinedet data check` for details)"
            raise DataError(f"malformed images or annotations {hint}", self.annotations) from e
        self._coco: COCO | None = None
        self._unreadable: set[Any] = set()  # image ids skipped, so each is logged once

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
        """Fail fast on what would otherwise break mid-training; ``data check`` says more."""
        hint = "(run `spinedet data check` for details)"
        if not isinstance(dataset, dict) or not all(
            isinstance(dataset.get(key), list) for key in ("images", "categories")
        ):
            raise DataError(f"needs 'images' and 'categories' lists {hint}", self.annotations)
        try:
            cat_ids = {c["id"] for c in dataset["categories"]}
            anns = dataset.get("annotations", [])
            unknown = sorted({a["category_id"] for a in anns} - cat_ids)
            unusable = [a["id"] for a in anns if not a.get("iscrowd") and "segmentation" not in a]
        except (KeyError, TypeError) as e:
            raise DataError(f"malformed categories or annotations {hint}", self.annotations) from e
        if len(cat_ids) != len(dataset["categories"]):
            raise DataError(f"category ids are not unique {hint}", self.annotations)
        if not dataset["images"]:
            raise DataError("the data set has no images", self.annotations)
        try:
            escaping = [im["id"] for im in dataset["images"] if leaves_directory(im["file_name"])]
        except (KeyError, TypeError) as e:
            raise DataError(f"malformed images {hint}", self.annotations) from e
        if escaping:
            ids = shorten([str(i) for i in escaping], 10)
            raise DataError(
                f"{len(escaping)} images (ids {ids}) have file names outside the image directory "
                f"{self.images}; use paths relative to it",
                self.annotations,
            )
        if unknown:
            raise DataError(
                f"annotations use unknown category ids {unknown[:10]}", self.annotations
            )
        if self.masks and unusable:
            raise DataError(
                f"{len(unusable)} annotations (first: {unusable[0]}) have no segmentation; "
                "load with masks=False to train boxes only",
                self.annotations,
            )

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, Target]:
        """The image and its targets. An image that is missing or cannot be decoded does not
        stop a run: it is logged (once per image and process) and stands as a black image with
        no objects, under its own id. (Substituting another image instead would, in evaluation,
        score that image's detections twice.)"""
        image_id = self.index.image_id(index)
        file_name, width, height = self.index.image(index)
        image = tv_tensors.Image(torch.zeros((3, height, width), dtype=torch.uint8))
        rows = slice(0, 0)
        if image_id not in self._unreadable:
            try:
                pil = load_image(image_path(self.images, file_name), (width, height))
                image = tv_tensors.Image(F.pil_to_tensor(pil))
                rows = self.index.rows(index)
            except UnreadableImage as e:
                log.warning(
                    "skipping image %s (trained as blank, scored as missed): %s", image_id, e
                )
                self._unreadable.add(image_id)
        # Copies: the index's arrays are shared with the other workers and must stay unwritten.
        boxes = torch.tensor(self.index.boxes[rows])
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        # Degenerate boxes would crash torchvision's detectors; `data check` reports them.
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])

        target: Target = {
            "boxes": tv_tensors.BoundingBoxes(
                boxes[keep], format=tv_tensors.BoundingBoxFormat.XYXY, canvas_size=(height, width)
            ),
            "labels": torch.tensor(self.index.labels[rows])[keep],
            "image_id": image_id,
            "area": torch.tensor(self.index.areas[rows])[keep],
            "iscrowd": torch.zeros(int(keep.sum()), dtype=torch.int64),
        }
        if self.masks:
            kept = np.arange(rows.start, rows.stop)[keep.numpy()]
            target["masks"] = tv_tensors.Mask(self._decode_masks(kept, height, width))
        if self.transforms is not None:
            return self.transforms(image, target)
        return image, target

    def _decode_masks(self, rows: np.ndarray, height: int, width: int) -> torch.Tensor:
        masks = np.zeros((len(rows), height, width), np.uint8)  # numpy: cheaper fills than torch
        for i, row in enumerate(rows):
            try:
                masks[i] = decode_segmentation(self.index.segmentation(row), height, width)
            except ValueError as e:
                ann_id = self.index.ann_ids[row]
                raise DataError(f"annotation {ann_id}: {e}", self.annotations) from e
        return torch.from_numpy(masks)


def collate(batch: list[tuple[Any, Target]]) -> tuple[list[Any], list[Target]]:
    """Batch detection samples as lists: images differ in size and targets in length."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)
