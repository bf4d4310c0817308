"""Find every problem in a COCO dataset in one pass, without ever raising."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from spinedet.data.coco_files import (
    AREA,
    EXIF_ORIENTATION,
    NO_IMAGES,
    ROTATING_ORIENTATIONS,
    bad_areas,
    image_size,
    is_number,
    leaves_directory,
    load_image,
    no_region,
    no_segmentation,
    polygon_problem,
    read_json,
    regionless,
    repeated,
    rle_problem,
    size_mismatch,
    unsegmented,
)
from spinedet.data.errors import DataError
from spinedet.data.stats import format_class_counts
from spinedet.errors import shorten
from spinedet.files import atomic_write

log = logging.getLogger(__name__)

BOX_TOLERANCE = 0.5  # pixels a box may overshoot the image: sub-pixel float noise is harmless
IMAGE_CHUNK = 64  # image files checked per thread-pool task
JPEG_TAIL = 1024  # bytes searched for a JPEG's end-of-image marker (padding may follow it)
CHECK_CACHE = "data_check.json"  # in a run directory: the checks that passed
CACHE_ENTRIES = 16  # kept in it (train and val, a few edits of each)


@dataclass(frozen=True)
class Problem:
    """One problem: where it is (file, image id, annotation id), what it is, and its kind.

    An ``"error"`` makes training refuse the data set; a ``"warning"`` is data that only some
    models refuse or leave out (Mask R-CNN: annotations without segmentation, or without a
    usable polygon), said so in its message.
    """

    file: str
    image_id: int | None
    ann_id: int | None
    message: str
    kind: str
    severity: str = "error"

    def __str__(self) -> str:
        message = f"warning: {self.message}" if self.severity == "warning" else self.message
        if self.ann_id is not None:
            image = "" if self.image_id is None else f" (image {self.image_id})"
            return f"{self.file}: annotation {self.ann_id}{image}: {message}"
        if self.image_id is not None:
            return f"{self.file}: image {self.image_id}: {message}"
        return f"{self.file}: {message}"


def errors(problems: list[Problem]) -> list[Problem]:
    """The problems that make training refuse the data set (warnings left out)."""
    return [p for p in problems if p.severity == "error"]


def _is_id(value: Any) -> bool:
    return type(value) is int  # exact type: JSON true/false would pass isinstance(int)


def _header_orientation(image: Image.Image) -> int | None:
    """EXIF orientation as far as the header tells; avoids a full decode."""
    if image.format == "PNG" and "exif" not in image.info:
        return None  # Pillow would decode all pixels looking for an eXIf chunk after the data
    return image.getexif().get(EXIF_ORIENTATION)


def _looks_complete(path: Path, image_format: str | None) -> bool:
    """Whether a file that passed ``verify()`` surely holds the whole image. PNG's verify reads
    every chunk up to IEND; JPEG's reads nothing, so its end-of-image marker must be in the
    tail (a cut file lacks it). Otherwise only decoding tells."""
    if image_format == "PNG":
        return True
    if image_format != "JPEG":
        return False
    with open(path, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - JPEG_TAIL))
        return b"\xff\xd9" in f.read()


def _fmt_box(box: list[float]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


class _Checker:
    """Accumulates problems while walking categories, images, annotations, then image files."""

    def __init__(self, annotations: Path, images: Path) -> None:
        self.json = str(annotations)
        self.images_dir = images
        self.problems: list[Problem] = []
        self.cat_ids: set[Any] = set()
        self.images: dict[int, dict[str, Any]] = {}  # valid entries, first of duplicated ids
        self.image_ids: set[int] = set()  # every integer id, valid entry or not
        self.no_images = False  # an empty 'images' list
        self.category_entries: list[dict[str, Any]] = []  # valid, first of duplicated ids
        self.counted: list[dict[str, Any]] = []  # annotations of a known image and category

    def report(
        self,
        kind: str,
        message: str,
        image_id: Any = None,
        ann_id: Any = None,
        file: str | None = None,
        severity: str = "error",
    ) -> None:
        self.problems.append(
            Problem(
                file or self.json,
                image_id if _is_id(image_id) else None,
                ann_id if _is_id(ann_id) else None,
                message,
                kind,
                severity,
            )
        )

    def entries(self, dataset: dict[str, Any], key: str) -> list[dict[str, Any]]:
        """The list under ``key``, reporting a missing list and skipping non-object entries."""
        if key not in dataset:
            self.report("schema", f"missing top-level key '{key}'")
            return []
        if not isinstance(dataset[key], list):
            self.report("schema", f"'{key}' must be a list")
            return []
        for index, entry in enumerate(dataset[key]):
            if not isinstance(entry, dict):
                self.report("schema", f"{key}[{index}] is not an object")
        return [entry for entry in dataset[key] if isinstance(entry, dict)]

    def duplicates(self, entries: list[dict[str, Any]], what: str) -> None:
        for value, count in repeated(e["id"] for e in entries if _is_id(e.get("id"))).items():
            self.report(
                "duplicate id",
                f"{what} id {value} is used {count} times",
                image_id=value if what == "image" else None,
                ann_id=value if what == "annotation" else None,
            )

    def categories(self, categories: list[dict[str, Any]]) -> None:
        for index, cat in enumerate(categories):
            if not _is_id(cat.get("id")):
                self.report("schema", f"categories[{index}] has no integer 'id'")
                continue
            if not isinstance(cat.get("name"), str):
                self.report("schema", f"category {cat['id']} has no 'name'")
            if cat["id"] not in self.cat_ids:
                self.category_entries.append(cat)
            self.cat_ids.add(cat["id"])
        self.duplicates(categories, "category")
        named = [c for c in categories if _is_id(c.get("id")) and isinstance(c.get("name"), str)]
        for name, count in repeated(c["name"] for c in named).items():
            # Names key the per-class metrics and the model's class list.
            ids = shorten([str(c["id"]) for c in named if c["name"] == name])
            message = f"category name {name!r} is used {count} times (ids {ids})"
            self.report("duplicate name", message)

    def image_entries(self, images: list[dict[str, Any]]) -> None:
        for index, image in enumerate(images):
            image_id = image.get("id")
            if not _is_id(image_id):
                self.report("schema", f"images[{index}] has no integer 'id'")
                continue
            self.image_ids.add(image_id)
            invalid = []
            if not isinstance(image.get("file_name"), str) or not image["file_name"]:
                invalid.append("missing or invalid file_name")
            try:
                width, height = image_size(image)
            except ValueError as e:
                invalid.append(str(e))
            if invalid:
                self.report("schema", "; ".join(invalid), image_id)
                continue
            image = {**image, "width": width, "height": height}  # 640.0 -> 640
            if leaves_directory(image["file_name"]):
                self.report(
                    "path outside images",
                    f"file_name {image['file_name']!r} points outside {self.images_dir}: "
                    "use a path relative to the image directory",
                    image_id,
                )
            if image_id not in self.images:
                self.images[image_id] = image
        self.duplicates(images, "image")
        names = Counter(image["file_name"] for image in self.images.values())
        for name, count in names.items():
            if count > 1:
                self.report("duplicate file", f"{count} images share the file '{name}'")

    def annotation(self, index: int, ann: dict[str, Any]) -> None:
        ann_id, image_id = ann.get("id"), ann.get("image_id")
        if not _is_id(ann_id):
            self.report("schema", f"annotations[{index}] has no integer 'id'", image_id)

        def report(kind: str, message: str) -> None:
            self.report(kind, message, image_id, ann_id)

        image = self.images.get(image_id) if _is_id(image_id) else None
        if image is None and not (_is_id(image_id) and image_id in self.image_ids):
            report("unknown image", f"refers to unknown image id {image_id!r}")
        category_id = ann.get("category_id")
        if not _is_id(category_id) or category_id not in self.cat_ids:
            report("unknown category", f"category id {category_id!r} is not defined")
        elif image is not None:
            self.counted.append(ann)
        if bad_areas([ann]):
            report("schema", f"{AREA}: {ann['area']!r}")
        if ann.get("iscrowd", 0) not in (0, 1):
            report("schema", f"iscrowd must be 0 or 1, not {ann['iscrowd']!r}")

        box = ann.get("bbox")
        if box is None:
            report("box", "has no bbox")
        elif not isinstance(box, list) or len(box) != 4 or not all(is_number(v) for v in box):
            report("box", f"bbox must be [x, y, width, height], not {box!r}")
        elif box[2] <= 0 or box[3] <= 0:
            report("box", f"box {_fmt_box(box)} has zero or negative size")
        elif image is not None:
            width, height = image["width"], image["height"]
            x, y, w, h = box
            tol = BOX_TOLERANCE
            if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
                report("box", f"box {_fmt_box(box)} lies outside the {width}x{height} image")

        segmentation = ann.get("segmentation")
        if isinstance(segmentation, list):
            for k, polygon in enumerate(segmentation):
                problem = polygon_problem(polygon)
                if problem:
                    report("polygon", f"polygon {k}: {problem}")
        elif isinstance(segmentation, dict):
            problem = rle_problem(segmentation, image["height"], image["width"]) if image else None
            if problem:
                report("rle", problem)
        elif segmentation is not None:
            report("segmentation", "segmentation must be a list of polygons or an RLE object")

    def image_file(self, image: dict[str, Any], full: bool) -> tuple[str, str] | None:
        """Kind and message of the problem with one image file, or None."""
        path = self.images_dir / image["file_name"]
        try:
            if not path.is_file():
                return "missing file", "file not found"
            with Image.open(path) as header:
                stored = header.size
                rotated = _header_orientation(header) in ROTATING_ORIENTATIONS
                image_format = header.format
                header.verify()  # cheap integrity check; decoding everything is `full`'s job
            oriented = stored[::-1] if rotated else stored
            if full or not _looks_complete(path, image_format):
                oriented = load_image(path).size
        except DataError as e:
            return "unreadable image", e.reason
        except Exception as e:  # a check never crashes, whatever Pillow raises
            return "unreadable image", f"cannot decode image: {' '.join(str(e).split())}"
        problem = size_mismatch(stored, oriented, (image["width"], image["height"]))
        return ("image size", problem) if problem else None

    def segmentations(self, anns: list[dict[str, Any]], masks: bool | None) -> None:
        """Annotations Mask R-CNN refuses: an error for it (``masks``), else a warning; and
        those it leaves out, a warning."""
        if masks is False:
            return
        if ids := unsegmented(anns):
            severity = "error" if masks else "warning"
            self.report("no segmentation", no_segmentation(ids), severity=severity)
        left_out = [
            a.get("id")
            for a in anns
            if not a.get("iscrowd", 0) and regionless(a.get("segmentation"))
        ]
        if left_out and len(ids) < len(anns):  # all of them: a boxes-only export, said above
            self.report("no region", no_region(left_out), severity="warning")

    def emptiness(self) -> None:
        """A data set must have images and, with classes, annotations on them, to be used."""
        if self.no_images:
            self.report("empty", NO_IMAGES)
        elif self.cat_ids and self.images and not self.counted:
            self.report("empty", "no image has an annotation: nothing to train or evaluate on")

    def entries_of(self, dataset: dict[str, Any], masks: bool | None) -> None:
        """Check the json's categories, images and annotations (not the image files)."""
        self.categories(self.entries(dataset, "categories"))
        self.image_entries(self.entries(dataset, "images"))
        self.no_images = dataset.get("images") == []
        anns = self.entries(dataset, "annotations")
        for index, ann in enumerate(anns):
            self.annotation(index, ann)
        self.duplicates(anns, "annotation")
        self.segmentations(anns, masks)
        self.emptiness()

    def image_files(self, full: bool, progress: bool | None, workers: int) -> None:
        images = [im for im in self.images.values() if not leaves_directory(im["file_name"])]
        # Chunks keep the per-task overhead of the pool small next to a cheap header check.
        chunks = [images[i : i + IMAGE_CHUNK] for i in range(0, len(images), IMAGE_CHUNK)]
        with (
            ThreadPoolExecutor(max(1, workers)) as pool,  # file I/O bound: threads overlap it
            tqdm(
                total=len(images),
                desc="checking images",
                unit="img",
                disable=None if progress is None else not progress,
            ) as bar,
        ):
            results = pool.map(lambda chunk: [self.image_file(im, full) for im in chunk], chunks)
            for chunk, found in zip(chunks, results, strict=True):
                bar.update(len(chunk))
                for image, result in zip(chunk, found, strict=True):
                    if result:
                        path = str(self.images_dir / image["file_name"])
                        self.report(result[0], result[1], image["id"], file=path)


def check_dataset(
    annotations: str | Path,
    images: str | Path,
    full: bool = False,
    progress: bool | None = None,
    workers: int = 8,
    masks: bool | None = None,
) -> list[Problem]:
    """Report every problem of a COCO dataset: json, ids, boxes, segmentations, image files.

    Whatever makes :class:`~spinedet.data.CocoDataset` refuse the file is an error here, by the
    same rules. Image files are checked for existence, header integrity, completeness and size;
    a file name leaving ``images`` is a problem and never read. ``full=True`` decodes every
    pixel (slow on large sets). ``progress=None`` shows a bar only on a terminal. Annotations
    without segmentation are an error with ``masks=True`` (a Mask R-CNN will train), a warning
    with ``None`` (unknown model) and not reported with ``False`` (boxes only); non-crowd ones
    whose segmentation has no usable polygon, which Mask R-CNN training leaves out, are a
    warning unless ``False``.
    """
    return inspect_dataset(annotations, images, full, progress, workers, masks)[0]


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (about a second for a 432 MiB annotation file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _passed_checks(cache: Path) -> list[dict[str, Any]]:
    """The entries of a check cache; an unreadable or foreign file counts as empty."""
    try:
        entries = json.loads(cache.read_text(encoding="utf-8"))["passed"]
        return [e for e in entries if isinstance(e, dict)]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("%s: ignoring the data check cache (%s)", cache, e)
        return []


def check_dataset_cached(
    annotations: str | Path,
    images: str | Path,
    cache_dir: str | Path,
    full: bool = False,
    progress: bool | None = None,
    workers: int = 8,
    masks: bool | None = None,
) -> list[Problem]:
    """:func:`check_dataset`'s errors, skipped when ``cache_dir`` records that the same check
    passed; its warnings are logged.

    The record is keyed by the SHA-256 of the annotation file's bytes, the resolved image
    directory and the mode (a passed full check also stands for a quick one, a check with
    ``masks=True`` for one without), so an edited file is checked again. Only results without
    errors are recorded: a problem may be fixed in the image directory, which the key does not
    see. The record is written atomically.
    """
    try:
        key = {"sha256": file_sha256(annotations), "images": str(Path(images).resolve())}
    except OSError:  # it reports why
        return errors(check_dataset(annotations, images, full, progress, workers, masks))
    if masks:
        key["masks"] = True
    cache = Path(cache_dir) / CHECK_CACHE
    passed = _passed_checks(cache)
    for entry in passed:
        if {k: entry.get(k) for k in key} == key and entry.get("full", False) >= full:
            return []
    problems = check_dataset(annotations, images, full, progress, workers, masks)
    for warning in problems:
        if warning.severity != "error":
            log.warning("%s", warning)
    problems = errors(problems)
    if not problems:
        passed = [*passed, {**key, "full": full, "annotations": str(annotations)}]

        def dump(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"passed": passed[-CACHE_ENTRIES:]}, f, indent=1)

        atomic_write(cache, dump)
    return problems


def inspect_dataset(
    annotations: str | Path,
    images: str | Path,
    full: bool = False,
    progress: bool | None = None,
    workers: int = 8,
    masks: bool | None = None,
) -> tuple[list[Problem], str]:
    """:func:`check_dataset`'s problems and a table of instances and images per class."""
    checker = _Checker(Path(annotations), Path(images))
    try:
        dataset = read_json(annotations)
    except DataError as e:
        checker.report("json", e.reason)
        return checker.problems, ""
    if not isinstance(dataset, dict):
        checker.report("schema", "top level must be an object with images/annotations/categories")
        return checker.problems, ""

    checker.entries_of(dataset, masks)
    checker.image_files(full, progress, workers)
    table = format_class_counts(
        checker.category_entries, {"": (checker.counted, len(checker.images))}
    )
    return checker.problems, table


def annotation_problems(annotations: str | Path, dataset: Any) -> list[Problem]:
    """:func:`check_dataset`'s problems of the json ``dataset`` read from ``annotations``,
    without looking at image files (for tools that write annotation files, such as a split)."""
    checker = _Checker(Path(annotations), Path())
    if not isinstance(dataset, dict):
        checker.report("schema", "top level must be an object with images/annotations/categories")
        return checker.problems
    checker.entries_of(dataset, None)
    return checker.problems


def format_report(problems: list[Problem]) -> str:
    """All problems, one per line, followed by a count per kind (and of warnings, if any)."""
    if not problems:
        return "no problems found"
    counts = Counter(p.kind for p in problems)
    summary = ", ".join(f"{count} {kind}" for kind, count in counts.most_common())
    noun = "problem" if len(problems) == 1 else "problems"
    if warnings := len(problems) - len(errors(problems)):
        noun += f" ({warnings} warning{'s' if warnings > 1 else ''})"
    return "\n".join([*map(str, problems), f"{len(problems)} {noun}: {summary}"])
