"""Instances and images per class, per part of a data set, as a compact table."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from typing import Any


def class_counts(annotations: Iterable[dict[str, Any]]) -> dict[Any, tuple[int, int]]:
    """``category id -> (instances, distinct images)`` of well-formed annotations."""
    instances: Counter[Any] = Counter()
    images: dict[Any, set[Any]] = defaultdict(set)
    for ann in annotations:
        instances[ann["category_id"]] += 1
        images[ann["category_id"]].add(ann["image_id"])
    return {cat: (n, len(images[cat])) for cat, n in instances.items()}


def format_class_counts(
    categories: Iterable[dict[str, Any]],
    parts: Mapping[str, tuple[Iterable[dict[str, Any]], int]],
) -> str:
    """One row per category and a total row, one column per part: ``parts`` maps a part's
    name to its annotations and number of images. One part shows instances and images in two
    columns; several show ``instances/images`` per part."""
    names = list(parts)
    counts = {name: class_counts(anns) for name, (anns, _) in parts.items()}
    rows = [
        (str(cat["name"]), [counts[name].get(cat["id"], (0, 0)) for name in names])
        for cat in categories
    ]
    rows.append(("total", [(sum(i for i, _ in counts[n].values()), parts[n][1]) for n in names]))
    if len(names) == 1:
        header = ["class", "instances", "images"]
        table = [header, *([label, str(i), str(m)] for label, [(i, m)] in rows)]
    else:
        header = ["class", *names]
        table = [header, *([label, *(f"{i}/{m}" for i, m in cells)] for label, cells in rows)]
    widths = [max(len(row[k]) for row in table) for k in range(len(header))]
    lines = [
        "  ".join([row[0].ljust(widths[0])] + [row[k].rjust(widths[k]) for k in range(1, len(row))])
        for row in table
    ]
    if len(parts) > 1:
        lines[0] += "  (instances/images)"
    return "\n".join(lines)
