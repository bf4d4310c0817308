"""COCO files without torch: JSON read and written whole, images loaded upright as 8-bit RGB,
polygons and RLE checked and decoded. The data commands (check, split, shapes) need no more."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from operator import mul, sub
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils

from spinedet.data.errors import DataError, UnreadableImage
from spinedet.errors import shorten
from spinedet.files import atomic_write

EXIF_ORIENTATION = 0x0112
ROTATING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width and height
NUMBERS = frozenset({int, float})  # exact types of polygon coordinates; JSON booleans are not


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


NO_IMAGES = "the data set has no images"
AREA = "area is not a number"


# The rules below are shared by ``CocoDataset``, which refuses a file on the first one broken,
# and ``data check``, which reports every one: the two cannot disagree about a file.


def repeated(values: Iterable[Any]) -> dict[Any, int]:
    """The values occurring more than once, with their counts, in order of first occurrence."""
    return {value: count for value, count in Counter(values).items() if count > 1}


def image_size(image: Mapping[str, Any]) -> tuple[int, int]:
    """An image entry's ``(width, height)`` as ints; ``ValueError`` saying why it has none.

    Each must be a positive whole number of pixels. Whole floats (``640.0``, as some tools
    write) are accepted; fractions, zero, negatives, text, booleans and absence are not.
    """
    size = []
    for key in ("width", "height"):
        if key not in image:
            raise ValueError(f"missing {key}")
        value = image[key]
        if not is_number(value) or value <= 0 or value != int(value):
            raise ValueError(f"{key} must be a positive whole number of pixels, not {value!r}")
        size.append(int(value))
    return size[0], size[1]


def image_size_problem(image: Mapping[str, Any]) -> str | None:
    """Why an image entry has no usable size (see :func:`image_size`), or None."""
    try:
        image_size(image)
    except ValueError as e:
        return str(e)
    return None


def bad_areas(annotations: list[Mapping[str, Any]]) -> list[Any]:
    """Ids of the annotations whose ``area`` is there but not a number (it may be left out)."""
    return [a.get("id") for a in annotations if "area" in a and not is_number(a["area"])]


def unsegmented(annotations: list[Mapping[str, Any]]) -> list[Any]:
    """Ids of the annotations Mask R-CNN can neither train nor be evaluated on: those without a
    segmentation (crowds too: COCO's mask evaluation reads their regions), and all of them when
    every segmentation is missing or empty (a boxes-only export's empty lists)."""
    if annotations and all(a.get("segmentation") in ([], None) for a in annotations):
        return [a.get("id") for a in annotations]
    return [a.get("id") for a in annotations if a.get("segmentation") is None]


def some_ids(what: str, ids: list[Any]) -> str:
    """``3 annotations (ids 4, 7, 9)``: a count and the first few ids, for a one-line message."""
    return f"{len(ids)} {what} (ids {shorten([str(i) for i in ids])})"


def no_segmentation(ids: list[Any]) -> str:
    """The problem with the annotations :func:`unsegmented` finds."""
    return (
        f"{some_ids('annotations', ids)} have no segmentation; Mask R-CNN needs masks: "
        "train a _fasterrcnn or _retinanet model for boxes only"
    )


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


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16/32-bit grey scaled (not clipped), transparency composited on black."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _high_bit_depth_to_8bit(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        # Transparent pixels hold arbitrary colours; composite on black, the same as padding.
        black = Image.new("RGBA", image.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def shrunk_size(height: int, width: int, longest: int) -> tuple[int, int]:
    """(height, width) scaled so that the long side is at most ``longest`` (as it is where it
    already is), each side rounded and at least one pixel."""
    scale = min(1.0, longest / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def load_image(
    path: str | Path,
    size: tuple[int, int] | None = None,
    resize: tuple[int, int] | None = None,
) -> Image.Image:
    """Load any image a camera or tool writes as 8-bit RGB, upright according to its EXIF tag.

    ``size`` is the (width, height) the annotations assume: if it matches the stored pixels but
    not the EXIF-rotated image, the stored orientation is kept so the annotations still fit (a
    square image cannot tell, so EXIF wins); if it matches neither, a ``DataError`` is raised.
    ``resize`` (width, height): the result resized to that, antialiased; a JPEG is decoded at
    the smallest of its 1/2, 1/4, 1/8 scales that keeps as many pixels (a third of the time
    for a 12-megapixel photo).
    """
    try:
        with Image.open(path) as stored:
            full = stored.size
            if resize is not None and max(resize) < max(full):
                # Asked in the stored orientation (EXIF may turn it), which the aspect tells;
                # Pillow keeps both sides at least those asked.
                wide = (resize[0] >= resize[1]) == (full[0] >= full[1])
                stored.draft(None, tuple(resize) if wide else tuple(resize[::-1]))
            stored.load()
            image = ImageOps.exif_transpose(stored)
            if size is not None:
                turned = image.size != stored.size
                oriented = full[::-1] if turned else full
                problem = size_mismatch(full, oriented, tuple(size))
                if problem:
                    raise DataError(problem, path)
                if oriented != tuple(size):
                    image = stored.copy()
            image = to_rgb(image)
            if resize is not None and image.size != tuple(resize):
                image = image.resize(resize, Image.Resampling.BILINEAR)
            return image
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
    # map() rather than generators, at half the cost: building a Mask R-CNN's data set asks
    # this of every annotation (see :func:`regionless`).
    if (
        not isinstance(polygon, list)
        or not set(map(type, polygon)) <= NUMBERS
        or not all(map(math.isfinite, polygon))
    ):
        return "polygon must be a list of numbers"
    if len(polygon) % 2:
        return f"polygon has an odd number of coordinates ({len(polygon)})"
    if len(polygon) < 6:
        return f"polygon has {len(polygon) // 2} points, at least 3 are needed"
    x, y = polygon[0::2], polygon[1::2]
    # Shoelace formula, the sum of x[i-1] * y[i] - x[i] * y[i-1]; plain Python beats numpy on
    # typical polygons of a few dozen points.
    if sum(map(sub, map(mul, x[-1:] + x[:-1], y), map(mul, x, y[-1:] + y[:-1]))) == 0:
        return "polygon has zero area"
    return None


def regionless(segmentation: Any) -> bool:
    """Whether a segmentation is polygons none of which is usable (:func:`polygon_problem`),
    ``[]`` included: its mask would be empty. RLE is not judged here (decoding checks it)."""
    return isinstance(segmentation, list) and all(polygon_problem(p) for p in segmentation)


def no_region(ids: list[Any]) -> str:
    """What happens to the non-crowd annotations :func:`regionless` finds: Mask R-CNN training
    leaves them out rather than teach its mask head that the objects have no pixels."""
    return (
        f"{some_ids('annotations', ids)} have a segmentation without a usable polygon: they "
        "are left out of Mask R-CNN training"
    )


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


def decode_segmentation(
    segmentation: Any,
    height: int,
    width: int,
    size: tuple[int, int] | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Decode a COCO segmentation (polygons, compressed or uncompressed RLE) of a ``height`` x
    ``width`` image to a uint8 mask of that size, or of ``size`` (h, w), the image's resized:
    polygons drawn at it, RLE resized as torch's ``nearest`` does. ``out``: a zeroed uint8
    array of that size to write into.

    Degenerate polygons cover no area and are skipped; malformed RLE raises ``ValueError``.
    """
    rows, cols = size or (height, width)
    if out is None:
        out = np.zeros((rows, cols), np.uint8)
    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if polygon_problem(p) is None]
        if not polygons:
            return out
        if size is not None:  # COCO's coordinates are continuous: they scale as the image
            factor = np.array([cols / width, rows / height])
            polygons = [(np.reshape(p, (-1, 2)) * factor).ravel().tolist() for p in polygons]
            height, width = rows, cols
        segmentation = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    _paint(out, np.asarray(_rle_runs(segmentation, height, width), np.int64), height, width)
    return out


def _paint(out: np.ndarray, runs: np.ndarray, height: int, width: int) -> None:
    """Set the pixels of ``out`` that the RLE ``runs`` of a ``height`` x ``width`` mask cover
    (resized as torch's ``nearest`` does where ``out`` is of another size).

    Runs alternate between 0 and 1, starting with 0, over the pixels in column-major order.
    Only the columns that hold ones are expanded and transposed into ``out``: an object's,
    not a 12-megapixel photo's (decoded here rather than by pycocotools, whose decode warns
    under NumPy 2 on every call, and transposes the whole image).
    """
    ends = np.cumsum(runs)
    starts = ends - runs
    ones = slice(1, None, 2)
    filled = runs[ones] > 0
    if not filled.any():
        return
    x0 = int(starts[ones][filled][0]) // height
    x1 = -(-int(ends[ones][filled][-1]) // height)
    low, high = x0 * height, x1 * height
    lengths = np.clip(ends, low, high) - np.clip(starts, low, high)
    values = (np.arange(len(runs)) & 1).astype(np.uint8)
    block = np.repeat(values, lengths).reshape(x1 - x0, height)  # (columns, rows)
    if out.shape == (height, width):
        taken = np.flatnonzero(block.any(0))
        y0, y1 = int(taken[0]), int(taken[-1]) + 1
        out[y0:y1, x0:x1] = block[:, y0:y1].T
        return
    source_rows = _nearest(out.shape[0], height)
    source_cols = _nearest(out.shape[1], width)
    inside = np.flatnonzero((source_cols >= x0) & (source_cols < x1))
    out[:, inside] = block[source_cols[inside] - x0][:, source_rows].T


def _nearest(length: int, source: int) -> np.ndarray:
    """The source index of each of ``length`` pixels resized from ``source`` by torch's
    ``nearest`` interpolation: the floor of the position times the scale, in float32 as torch
    computes it (float64 rounds some positions to the next pixel)."""
    scale = np.float32(source) / np.float32(length)
    positions = np.arange(length, dtype=np.float32) * scale
    return np.minimum(np.floor(positions).astype(np.int64), source - 1)
