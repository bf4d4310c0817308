"""Prediction on image files, directories, globs and videos: drawings, masks and JSON.

Every readable input ends up in ``predictions.jsonl`` (one line per image, flushed as it is
written, so a killed run leaves a valid file) and, at the end, in ``predictions.json`` (COCO
results, written atomically). Unreadable inputs are skipped and reported at the end.
"""

from __future__ import annotations

import glob
import json
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..data import load_image
from ..draw import draw_instances
from ..errors import SpinedetError
from ..files import atomic_write, refuse_existing, save_png, writing
from ..predictor import Detections, Predictor, to_image_tensor

__all__ = [
    "IMAGE_SUFFIXES",
    "VIDEO_SUFFIXES",
    "InputItem",
    "PredictionReport",
    "collect_images",
    "collect_inputs",
    "draw_detections",
    "predict_images",
]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"}


@dataclass(frozen=True)
class InputItem:
    """An image or video file and the path its outputs take under the output directory."""

    path: Path
    name: Path  # relative output path, without suffix
    frame: int | None = None  # a video's frame, counted from 0

    @property
    def is_video(self) -> bool:
        return self.path.suffix.lower() in VIDEO_SUFFIXES


@dataclass
class PredictionReport:
    """What a prediction run wrote and what it skipped (``(input, reason)`` pairs)."""

    path: Path
    images: int = 0
    detections: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _inside(path: Path, folder: Path | None) -> bool:
    return folder is not None and path.resolve().is_relative_to(folder)


def collect_inputs(
    inputs: Sequence[str | Path], exclude: str | Path | None = None
) -> tuple[list[InputItem], list[tuple[str, str]]]:
    """Image and video files named directly, matched by a glob or found (recursively) in a
    directory, never from inside ``exclude`` (the output directory); and the inputs that
    name nothing, with why. Output names keep the path relative to the directory given and
    never collide (a second ``img`` becomes ``img_1``)."""
    skip = Path(exclude).resolve() if exclude is not None else None
    suffixes = IMAGE_SUFFIXES | VIDEO_SUFFIXES
    items: list[InputItem] = []
    missing: list[tuple[str, str]] = []
    used: set[Path] = set()

    def add(path: Path, name: Path, root: Path | None = None) -> None:
        # The output directory may be the input directory itself (then its existing files are
        # never replaced), but a folder inside an input is never read back.
        if _inside(path, skip) and (root is None or skip != root.resolve()):
            return
        unique, n = name, 1
        while unique in used:
            unique, n = name.with_name(f"{name.name}_{n}"), n + 1
        used.add(unique)
        items.append(InputItem(path, unique))

    for item in map(str, inputs):
        path = Path(item)
        if path.is_dir():
            for p in sorted(path.rglob("*")):
                if p.is_file() and p.suffix.lower() in suffixes:
                    add(p, p.relative_to(path).with_suffix(""), path)
        elif path.is_file():
            add(path, Path(path.stem))
        elif glob.has_magic(item) and (matches := sorted(glob.glob(item, recursive=True))):
            for p in map(Path, matches):
                if p.is_file() and p.suffix.lower() in suffixes:
                    add(p, Path(p.stem))
        else:
            missing.append((item, "no such file, directory or glob match"))
    return items, missing


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image and video files named directly, matched by a glob or found in directories."""
    items, missing = collect_inputs(inputs)
    if missing:
        raise FileNotFoundError(f"{missing[0][0]}: {missing[0][1]}")
    if not items:
        raise FileNotFoundError(f"no images found in {', '.join(map(str, inputs))}")
    return [i.path for i in items]


def draw_detections(image: torch.Tensor, detections: Detections, num_classes: int) -> torch.Tensor:
    """uint8 image with masks, boxes and ``name score`` labels, one colour per class."""
    texts = [f"{n} {s:.2f}" for n, s in zip(detections.names, detections.scores.tolist(),
                                             strict=True)]  # fmt: skip
    return draw_instances(image, detections.boxes, detections.labels.tolist(), texts,
                          num_classes, detections.mask_crops)  # fmt: skip


def _frames(
    item: InputItem, every: int, size: tuple[int, int] | None = None
) -> Iterator[tuple[InputItem, torch.Tensor]]:
    """The image (in the orientation of ``size``, (width, height), see
    :func:`~spinedet.data.load_image`), or every ``every``-th frame of a video (PyAV)."""
    if not item.is_video:
        yield item, to_image_tensor(load_image(item.path, size))
        return
    import av

    try:
        with av.open(str(item.path)) as container:
            for index, frame in enumerate(container.decode(video=0)):
                if index % every == 0:
                    array = frame.to_ndarray(format="rgb24")
                    name = item.name / f"frame_{index:06d}"
                    yield InputItem(item.path, name, index), to_image_tensor(array)
    except (av.error.FFmpegError, IndexError) as e:
        raise SpinedetError(f"{item.path}: cannot decode video ({e})") from None


def _save_masks(detections: Detections, target: Path, mode: str) -> None:
    masks = detections.mask_crops
    if masks is None:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    if mode == "instance":
        for i, crop in enumerate(masks.crops):
            mask = np.zeros(detections.image_size, dtype=np.uint8)
            mask[masks.window(i)] = crop.numpy() * np.uint8(255)
            save_png(Image.fromarray(mask), target.with_name(f"{target.name}_{i:03d}.png"))
        return
    # One image per input: pixel value i + 1 is instance i (later instances on top), 0 none.
    index = np.zeros(detections.image_size, dtype=np.uint16 if len(masks) > 255 else np.uint8)
    for i, crop in enumerate(masks.crops):
        index[masks.window(i)][crop.numpy()] = i + 1
    save_png(Image.fromarray(index), _png(target))


def _png(name: Path) -> Path:
    """``name`` + ``.png``: an output name keeps every dot of its input's (``with_suffix`` would
    turn ``photo.v1`` and ``photo.v2`` both into ``photo.png``)."""
    return name.with_name(f"{name.name}.png")


def predict_images(
    predictor: Predictor,
    items: Sequence[InputItem],
    out_dir: str | Path,
    *,
    image_ids: Mapping[Path, int] | None = None,
    image_sizes: Mapping[Path, tuple[int, int]] | None = None,
    first_id: int = 0,
    every: int = 1,
    draw: bool = True,
    save_masks: str | None = None,
    overwrite: bool = False,
) -> PredictionReport:
    """Run ``predictor`` on the inputs in batches; draw into ``out_dir/<name>.png``, save masks
    under ``out_dir/masks/`` and write ``predictions.jsonl`` and ``predictions.json``.

    ``image_ids`` maps input image files (:attr:`InputItem.path`) to image ids; the other
    images and video frames are numbered in order from ``first_id``. ``image_sizes`` maps
    image files to the (width, height) their ids' annotations assume: such an image is read in
    that orientation (the stored pixels' or the EXIF-rotated image's, as in training and
    evaluation), and skipped as unreadable if it has neither size. Existing files are never
    replaced unless ``overwrite``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = PredictionReport(out / "predictions.json")
    lines = out / "predictions.jsonl"

    def target(path: Path) -> Path:
        refuse_existing(path, overwrite).parent.mkdir(parents=True, exist_ok=True)
        return path

    target(report.path)
    for item in items:
        if draw and not item.is_video and not predictor.classifier:
            target(_png(out / item.name))
    results: list[dict] = []
    counter = first_id
    ids, sizes = image_ids or {}, image_sizes or {}
    num_classes = len(predictor.description.categories)

    def record(item: InputItem, image: torch.Tensor, det: Detections, sink) -> None:
        nonlocal counter
        image_id = ids.get(item.path) if item.frame is None else None
        if image_id is None:
            image_id, counter = counter, counter + 1
        if draw and not predictor.classifier:  # a classifier has no boxes to draw
            drawn = draw_detections(image, det, num_classes)
            save_png(Image.fromarray(drawn.permute(1, 2, 0).numpy()),
                      target(_png(out / item.name)))  # fmt: skip
        if save_masks:
            _save_masks(det, out / "masks" / item.name, save_masks)
        where = {"file_name": str(item.path)}
        if item.frame is not None:
            where["frame"] = item.frame
        entries = [entry | where for entry in det.to_coco(image_id)]
        height, width = det.image_size
        line = {**where, "name": str(item.name), "image_id": image_id,
                "height": height, "width": width, "detections": entries}  # fmt: skip
        with writing(lines):
            sink.write((json.dumps(line) + "\n").encode())
        results.extend(entries)
        report.images += 1
        report.detections += len(entries)

    # The inputs in the order the predictor reads them (a batch ahead of its results at most).
    read: deque[tuple[InputItem, torch.Tensor]] = deque()

    def images() -> Iterator[torch.Tensor]:
        for item in tqdm(items, desc="predict", unit="input"):
            try:
                for frame, image in _frames(item, every, sizes.get(item.path)):
                    read.append((frame, image))
                    yield image
            except SpinedetError as e:
                report.skipped.append((str(item.path), str(e).removeprefix(f"{item.path}: ")))

    # Unbuffered: each record is in the file once written, and a failed write is not tried again
    # (with a second, unnamed error) when the file closes.
    with open(target(lines), "wb", buffering=0) as sink:
        for det in predictor.stream(images()):
            record(*read.popleft(), det, sink)
    atomic_write(report.path, lambda tmp: Path(tmp).write_text(json.dumps(results)))
    return report
