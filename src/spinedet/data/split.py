"""Split a COCO dataset into image-disjoint parts with class frequencies kept balanced."""

from __future__ import annotations

import math
import random
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spinedet.data.check import annotation_problems, errors
from spinedet.data.coco_files import read_json, write_json
from spinedet.data.errors import DataError
from spinedet.data.stats import format_class_counts

DEFAULT_NAMES = ("train", "val", "test")


def split_fractions(
    ratios: Sequence[float], names: Sequence[str] | None = None
) -> dict[str, float]:
    """Each split's share of the images by name (``names`` defaults to train/val(/test)), or a
    DataError for ratios or names that cannot make a split."""
    names = tuple(names) if names is not None else DEFAULT_NAMES[: len(ratios)]
    if len(ratios) < 2:
        raise DataError(f"need at least two split ratios, got {list(ratios)}")
    if len(names) != len(ratios):
        raise DataError(f"got {len(ratios)} ratios but {len(names)} split names {list(names)}")
    if len(set(names)) != len(names):
        raise DataError(f"split names must be unique, got {list(names)}")
    if any(not name or Path(name).name != name or name in (".", "..") for name in names):
        raise DataError(f"split names must be plain file names, got {list(names)}")
    if not all(r > 0 and math.isfinite(r) for r in ratios):
        raise DataError(f"split ratios must all be positive and finite, got {list(ratios)}")
    total = sum(ratios)
    return {name: r / total for name, r in zip(names, ratios, strict=True)}


def stratified_assignment(
    labels: Sequence[Counter[int]], ratios: Sequence[float], rng: random.Random
) -> list[int]:
    """Split index for every item, balancing per-class instance counts (iterative stratification).

    ``labels[i]`` counts the instances of each class in item ``i``; ``ratios`` sum to 1. The
    rarest class still unassigned goes first: each of its items goes to the split missing the
    largest fraction of its target for that class, then of its target item count; remaining
    ties are broken by ``rng``. Items without labels fill up the item counts at the end.
    Cost is O(items x splits x classes per item + classes^2).
    """
    splits = range(len(ratios))
    totals: Counter[int] = Counter()
    holders: dict[int, list[int]] = defaultdict(list)
    for i, counts in enumerate(labels):
        totals.update(counts)
        for cls in counts:
            holders[cls].append(i)
    wanted = {cls: [r * n for r in ratios] for cls, n in totals.items()}
    missing = {cls: list(w) for cls, w in wanted.items()}
    wanted_items = [r * len(labels) for r in ratios]
    missing_items = list(wanted_items)
    unassigned = {cls: n for cls, n in totals.items() if n > 0}
    assignment = [-1] * len(labels)

    def assign(i: int, split: int) -> None:
        assignment[i] = split
        missing_items[split] -= 1
        for cls, n in labels[i].items():
            missing[cls][split] -= n
            unassigned[cls] -= n
            if unassigned[cls] <= 0:
                unassigned.pop(cls)

    while unassigned:
        cls = min(unassigned, key=unassigned.__getitem__)  # first seen wins ties: deterministic
        pending = [i for i in holders[cls] if assignment[i] < 0]
        rng.shuffle(pending)
        for i in pending:
            split = max(
                splits,
                key=lambda s: (
                    missing[cls][s] / wanted[cls][s],
                    missing_items[s] / wanted_items[s],
                    rng.random(),
                ),
            )
            assign(i, split)

    rest = [i for i, split in enumerate(assignment) if split < 0]
    rng.shuffle(rest)
    for i in rest:
        assign(i, max(splits, key=lambda s: (missing_items[s] / wanted_items[s], rng.random())))
    return assignment


def split_dataset(
    annotations: str | Path,
    out_dir: str | Path,
    ratios: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    names: Sequence[str] | None = None,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write ``OUT/<name>.json`` per split and return their paths by name.

    Ratios must be positive and are normalised. Every image lands in exactly one split with all
    of its annotations; other top-level keys (info, licenses, categories) are copied to each.
    ``names`` defaults to train/val(/test) for two or three ratios. Deterministic per ``seed``.
    See :func:`write_split` for how files are written.
    """
    parts = split_parts(annotations, ratios, seed, names)
    return write_split(parts, out_dir, annotations, overwrite)


def split_parts(
    annotations: str | Path,
    ratios: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    names: Sequence[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """The COCO dict of every split, by name, in memory (see :func:`split_dataset`)."""
    fractions = split_fractions(ratios, names)
    dataset = read_json(annotations)
    images, anns = _images_and_annotations(dataset, annotations)

    per_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for ann in anns:
        per_image[ann["image_id"]].append(ann)
    labels = [Counter(a.get("category_id") for a in per_image[im["id"]]) for im in images]
    assignment = stratified_assignment(labels, list(fractions.values()), random.Random(seed))

    parts = {}
    for index, name in enumerate(fractions):
        chosen = [im for im, split in zip(images, assignment, strict=True) if split == index]
        ids = {im["id"] for im in chosen}
        parts[name] = {
            **dataset,
            "images": chosen,
            "annotations": [a for a in anns if a["image_id"] in ids],
        }
    return parts


def write_split(
    parts: dict[str, dict[str, Any]],
    out_dir: str | Path,
    annotations: str | Path,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write ``OUT/<name>.json`` per part, all or nothing, and return their paths.

    Existing files are replaced only with ``overwrite``, the input ``annotations`` never. Every
    part is written and synced in a staging folder before the first is renamed into place, so a
    full disk or a kill leaves the previous files (or none), never a truncated or partial split.
    """
    out_dir = Path(out_dir)
    targets = {name: out_dir / f"{name}.json" for name in parts}
    source = Path(annotations)
    inputs = {source.resolve(), source.parent.resolve() / source.name}  # the file and its link
    clashes = [p.name for p in targets.values() if p.parent.resolve() / p.name in inputs]
    if clashes:
        raise DataError(
            f"writing {clashes[0]} would replace the input annotations; choose another --out",
            out_dir,
        )
    existing = [path.name for path in targets.values() if path.exists()]
    if existing and not overwrite:
        raise DataError(f"{', '.join(existing)} already exist; use --overwrite to replace", out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".split-", dir=out_dir))
    except OSError as e:
        raise DataError(f"cannot write ({e.strerror or e})", out_dir) from None
    try:
        for name, part in parts.items():
            write_json(staging / targets[name].name, part)
        for path in targets.values():  # renames within one file system need no space
            (staging / path.name).replace(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return targets


def split_table(parts: dict[str, dict[str, Any]]) -> str:
    """Instances/images per class (rows) and split (columns) of :func:`split_parts`' result."""
    categories = next(iter(parts.values())).get("categories") or []
    return format_class_counts(
        categories, {name: (p["annotations"], len(p["images"])) for name, p in parts.items()}
    )


def _images_and_annotations(
    dataset: Any, path: str | Path
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The image and annotation lists, refusing data that training would refuse (by `data
    check`'s rules, image files aside): split, its errors would reach every part unnoticed."""
    if problems := errors(annotation_problems(path, dataset)):
        first = str(problems[0]).removeprefix(f"{path}: ")
        more = len(problems) - 1
        more = f"; {more} more problem{'s' if more > 1 else ''}" if more else ""
        raise DataError(f"{first}{more} (run `spinedet data check` for details)", path)
    return dataset["images"], dataset.get("annotations", [])
