"""A synthetic instance-segmentation dataset of coloured shapes: the built-in demo data.

Shapes are rasterised with pycocotools from the very polygons stored in the json, and the pixels
are painted from those rasters, so the ground truth matches the image exactly. Later shapes
occlude earlier ones only a little; an occluded instance is stored as the RLE of its visible
pixels (still ``iscrowd=0``), an unoccluded one as its polygon. With one shape per image, the
same drawings make an ImageFolder tree for classifiers (:func:`make_shape_classes`).
"""

from __future__ import annotations

import colorsys
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from spinedet.data.coco_files import decode_segmentation, write_json
from spinedet.data.errors import DataError
from spinedet.data.split import DEFAULT_NAMES, split_dataset, split_fractions

# Non-contiguous ids on purpose: they exercise the id <-> label mapping everywhere.
CATEGORIES = (
    {"id": 3, "name": "circle"},
    {"id": 7, "name": "square"},
    {"id": 11, "name": "triangle"},
    {"id": 20, "name": "star"},
)
MAX_INSTANCES = 6
MIN_VISIBLE = 0.7  # an earlier instance keeps at least this fraction of its pixels visible
MIN_PIXELS = 30  # smaller shapes are not recognisable


def _polygon(name: str, cx: float, cy: float, radius: float, angle: float) -> list[float]:
    """Vertices (flattened x, y) of a shape inscribed in a circle of ``radius``."""
    if name == "circle":
        radii, count = [radius], 32
    elif name == "star":
        radii, count = [radius, 0.45 * radius], 10
    else:
        radii, count = [radius], 4 if name == "square" else 3
    coords = []
    for k in range(count):
        theta = angle + 2 * math.pi * k / count
        r = radii[k % len(radii)]
        coords += [round(cx + r * math.cos(theta), 2), round(cy + r * math.sin(theta), 2)]
    return coords


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Dark, muted, blotchy texture: shapes are bright and saturated, so contrast is high."""
    cells = rng.uniform(25, 105, size=(int(rng.integers(2, 7)), int(rng.integers(2, 7)), 3))
    blotches = Image.fromarray(cells.astype(np.uint8)).resize((width, height), Image.BILINEAR)
    return np.asarray(blotches, dtype=np.float32)


def _colours(rng: np.random.Generator, count: int) -> list[np.ndarray]:
    """Bright colours whose hues step by the golden ratio, so overlapping shapes stay distinct."""
    first = rng.uniform()
    colours = []
    for k in range(count):
        hue = (first + k * 0.618034) % 1.0
        rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.45, 1.0), rng.uniform(0.75, 1.0))
        colours.append(np.array(rgb, dtype=np.float32) * 255)
    return colours


Shape = tuple[int, list[float], np.ndarray]  # category index, polygon, full mask


def _place_shapes(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float],
    category: int | None = None,
    max_instances: int = MAX_INSTANCES,
) -> tuple[list[Shape], np.ndarray]:
    """1 to ``max_instances`` shapes back to front with occlusion limited, and the index of the
    topmost per pixel; with ``category`` (an index of CATEGORIES), one shape of that class."""
    wanted = int(rng.integers(1, max_instances + 1)) if category is None else 1
    side = min(height, width)
    shapes: list[Shape] = []
    owner = np.full((height, width), -1, dtype=np.int16)
    for _ in range(wanted * 10):
        if len(shapes) == wanted:
            break
        kind = int(rng.integers(len(CATEGORIES))) if category is None else category
        radius = side * math.exp(rng.uniform(math.log(scale[0]), math.log(scale[1]))) / 2
        cx, cy = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
        angle = rng.uniform(0, 2 * math.pi)
        polygon = _polygon(CATEGORIES[kind]["name"], cx, cy, radius, angle)
        mask = decode_segmentation([polygon], height, width).astype(bool)
        if mask.sum() < MIN_PIXELS:
            continue
        covered = np.bincount(owner[mask & (owner >= 0)], minlength=len(shapes))
        visible = np.bincount(owner[owner >= 0], minlength=len(shapes))
        full = np.array([m.sum() for _, _, m in shapes], dtype=np.int64)
        if np.any(visible - covered < MIN_VISIBLE * full):
            continue
        owner[mask] = len(shapes)
        shapes.append((kind, polygon, mask))
    return shapes, owner


def _draw(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float],
    category: int | None = None,
    class_colour: bool = False,
    max_instances: int = MAX_INSTANCES,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One image (uint8 HxWx3) and its annotations (without ids); see :func:`_place_shapes`.
    ``class_colour``: each shape in its class's own hue instead of a random colour."""
    pixels = _background(rng, height, width)
    shapes, owner = _place_shapes(rng, height, width, scale, category, max_instances)
    colours = _colours(rng, len(shapes))  # drawn either way: the same noise follows
    if class_colour:
        hues = [kind / len(CATEGORIES) for kind, _, _ in shapes]
        colours = [np.array(colorsys.hsv_to_rgb(h, 0.8, 0.95), np.float32) * 255 for h in hues]
    for (_, _, mask), colour in zip(shapes, colours, strict=True):
        pixels[mask] = colour
    pixels += rng.normal(0, 5, size=pixels.shape)  # sensor-like noise on everything
    image = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)

    anns = []
    for index, (category, polygon, mask) in enumerate(shapes):
        own = owner == index
        rle = mask_utils.encode(np.asfortranarray(own.astype(np.uint8)))
        if own.sum() == mask.sum():
            segmentation: Any = [polygon]
        else:
            segmentation = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
        anns.append(
            {
                "category_id": CATEGORIES[category]["id"],
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "area": float(own.sum()),
                "segmentation": segmentation,
                "iscrowd": 0,
            }
        )
    return image, anns


def make_shapes(
    out_dir: str | Path,
    num_images: int = 500,
    size: int | tuple[int, int] = 160,
    seed: int = 0,
    splits: Sequence[float] | None = None,
    scale: tuple[float, float] = (0.1, 0.5),
    max_instances: int = MAX_INSTANCES,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write ``OUT/images/*.png`` and ``OUT/annotations.json`` with 1 to ``max_instances``
    shapes per image (fewer where they would hide each other). A data set already in ``OUT``
    is refused, or with ``overwrite`` removed first (its images and json files), so the two
    never mix.

    ``size`` is the side of square images or (width, height). ``scale`` bounds the shapes'
    diameter as a fraction of the shorter image side. Image ``i`` depends only on ``seed`` and
    ``i``. With ``splits`` (ratios), also writes ``OUT/train.json``, ``val.json``(, ``test.json``).
    Returns paths under the keys "images", "annotations" and each split name.
    """
    width, height = (size, size) if isinstance(size, int) else size
    if num_images < 1 or min(width, height) < 16:
        raise DataError("need at least one image of at least 16x16 pixels")
    if max_instances < 1:
        raise DataError(f"max_instances {max_instances}: need at least 1 shape per image")
    if splits is not None:
        split_fractions(splits)  # before drawing: bad ratios cost no images
    out = Path(out_dir)
    files = ["images", "annotations.json", *(f"{name}.json" for name in DEFAULT_NAMES)]
    old = [out / name for name in files if (out / name).exists()]
    if old and not overwrite:
        raise DataError(f"{out} already holds a data set ({old[0].name}): use --overwrite to "
                        "replace it, or another --out")  # fmt: skip
    for path in old:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        rng = np.random.default_rng([seed, index])
        pixels, anns = _draw(rng, height, width, scale, max_instances=max_instances)
        file_name = f"{index:06d}.png"
        Image.fromarray(pixels).save(out / "images" / file_name, compress_level=1)
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for ann in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})

    dataset = {
        "info": {"description": "spinedet synthetic shapes", "seed": seed},
        "licenses": [],
        "categories": [dict(c) for c in CATEGORIES],
        "images": images,
        "annotations": annotations,
    }
    paths = {"images": out / "images", "annotations": out / "annotations.json"}
    write_json(paths["annotations"], dataset)
    if splits is not None:  # a new data set: its old splits are stale
        paths.update(split_dataset(paths["annotations"], out, splits, seed, overwrite=True))
    return paths


def make_shape_classes(
    out_dir: str | Path,
    num_images: int = 400,
    size: int | tuple[int, int] = 64,
    seed: int = 0,
    splits: Sequence[float] = (0.8, 0.1, 0.1),
    scale: tuple[float, float] = (0.35, 0.9),
    class_colours: bool = False,
) -> dict[str, Path]:
    """Write an ImageFolder tree of one shape per image: ``OUT/<split>/<class>/<index>.png``.

    With ``class_colours`` every class is drawn in its own hue: an easy set, where the colour
    alone tells the class, for checking in seconds that a classifier learns.

    Classes take turns (image ``i`` shows class ``i mod 4``), so every split is balanced;
    the splits (``train``, ``val``, ``test`` by default ratios) take consecutive images. Image
    ``i`` depends only on ``seed`` and ``i``. A split folder that already holds files is
    refused (ImageFolder would mix them in). Returns ``{split name: folder}``.
    """
    width, height = (size, size) if isinstance(size, int) else size
    names = ("train", "val", "test")
    if num_images < 1 or min(width, height) < 16:
        raise DataError("need at least one image of at least 16x16 pixels")
    if not 1 <= len(splits) <= len(names) or min(splits) <= 0:
        raise DataError(f"splits {list(splits)}: give 1 to 3 positive ratios (train, val, test)")
    out = Path(out_dir)
    paths = {name: out / name for name in names[: len(splits)]}
    for path in paths.values():
        if path.is_dir() and any(path.iterdir()):
            raise DataError("exists and is not empty; choose another --out or remove it", path)
    ends = np.rint(np.cumsum(splits) / sum(splits) * num_images).astype(int)
    for index in range(num_images):
        category = index % len(CATEGORIES)
        rng = np.random.default_rng([seed, index])
        anns: list[dict[str, Any]] = []
        while not anns:  # a shape below MIN_PIXELS is redrawn
            pixels, anns = _draw(rng, height, width, scale, category, class_colours)
        split = names[int(np.searchsorted(ends, index, side="right"))]
        folder = paths[split] / CATEGORIES[category]["name"]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{index:06d}.png", compress_level=1)
    return paths
