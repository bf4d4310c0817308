"""A COCO data set's images and training annotations in a few flat numpy arrays.

DataLoader workers are forked from the main process and share its memory copy-on-write, but
merely reading a Python object writes its reference count, so per-sample dicts and lists are
copied page by page into every worker over an epoch: on 226,000 images and a million polygons
that is gigabytes per worker. Numpy arrays are single objects whose data pages are only read,
so workers keep sharing them; each sample is rebuilt from its slices in ``__getitem__``.
"""

from __future__ import annotations

import contextlib
import gc
import json
from collections.abc import Iterable, Iterator
from itertools import chain
from typing import Any

import numpy as np

from spinedet.data.coco_files import NUMBERS, regionless


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """No garbage collection while indexing: the parsed json is millions of objects, and every
    full collection triggered by the containers made here would walk all of them."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _ids(values: list[Any]) -> np.ndarray:
    """Ids as int64, or as objects for the odd data set with non-integer ids."""
    if all(type(v) is int for v in values):
        return np.array(values, dtype=np.int64)
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def _strings(values: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """UTF-8 strings as one byte buffer and their ``n + 1`` offsets."""
    encoded = [v.encode("utf-8", "surrogatepass") for v in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets


def _is_polygons(segmentation: Any) -> bool:
    """Whether a segmentation is a list of lists of plain numbers, storable as float64."""
    return (
        type(segmentation) is list
        and all(type(p) is list for p in segmentation)
        and set(map(type, chain.from_iterable(segmentation))) <= NUMBERS
    )


class AnnotationIndex:
    """Images (file name, size, id) and their non-crowd annotations (box, label, area, id,
    segmentation), in file order per image, as flat arrays with per-image row ranges.

    Duplicated image ids resolve to the last entry, as pycocotools' index does. Polygons are
    stored as float64 (exactly the JSON's values); any other segmentation (RLE, or anything
    malformed that decoding must report) as its JSON text. ``regions`` tells, per annotation,
    whether its segmentation can have a region (not :func:`regionless`).
    """

    def __init__(
        self, dataset: dict[str, Any], cat_id_to_label: dict[Any, int], segmentations: bool
    ) -> None:
        with _collector_paused():
            self._build(dataset, cat_id_to_label, segmentations)

    def _build(
        self, dataset: dict[str, Any], cat_id_to_label: dict[Any, int], segmentations: bool
    ) -> None:
        entries = {image["id"]: image for image in dataset["images"]}  # last one wins
        row_of = {image_id: row for row, image_id in enumerate(entries)}
        self.ids = _ids([image["id"] for image in dataset["images"]])
        self.image_rows = np.array(
            [row_of[image["id"]] for image in dataset["images"]], dtype=np.int64
        )
        self.widths = np.array([int(im["width"]) for im in entries.values()], dtype=np.int32)
        self.heights = np.array([int(im["height"]) for im in entries.values()], dtype=np.int32)
        self.names, self.name_offsets = _strings(im["file_name"] for im in entries.values())

        anns = [
            a
            for a in dataset.get("annotations", [])
            if not a.get("iscrowd", 0) and a["image_id"] in row_of
        ]
        owner = np.array([row_of[a["image_id"]] for a in anns], dtype=np.int64)
        order = np.argsort(owner, kind="stable")  # group by image, keeping file order
        anns = [anns[i] for i in order]
        self.starts = np.searchsorted(owner[order], np.arange(len(entries) + 1))
        self.boxes = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
        self.labels = np.array([cat_id_to_label[a["category_id"]] for a in anns], dtype=np.int64)
        self.areas = np.array([float(a.get("area", 0.0)) for a in anns], dtype=np.float32)
        self.ann_ids = _ids([a.get("id") for a in anns])
        if segmentations:
            self._store_segmentations([a["segmentation"] for a in anns])

    def _store_segmentations(self, segmentations: list[Any]) -> None:
        polygons, others = [], []
        polygon_counts = np.zeros(len(segmentations) + 1, dtype=np.int64)
        other_sizes = np.zeros(len(segmentations) + 1, dtype=np.int64)
        for j, segmentation in enumerate(segmentations, 1):
            if _is_polygons(segmentation):
                polygons.extend(segmentation)
                polygon_counts[j] = len(segmentation)
            else:
                others.append(json.dumps(segmentation).encode())
                other_sizes[j] = len(others[-1])
        self.polygon_starts = np.cumsum(polygon_counts)  # per annotation, into polygon_offsets
        self.polygon_offsets = np.zeros(len(polygons) + 1, dtype=np.int64)
        np.cumsum([len(p) for p in polygons], out=self.polygon_offsets[1:])
        self.coords = np.fromiter(
            chain.from_iterable(polygons), dtype=np.float64, count=int(self.polygon_offsets[-1])
        )
        self.other_starts = np.cumsum(other_sizes)  # per annotation, into others
        self.others = np.frombuffer(b"".join(others), dtype=np.uint8)
        self.regions = np.fromiter(
            (not regionless(s) for s in segmentations), dtype=bool, count=len(segmentations)
        )

    def __len__(self) -> int:
        return len(self.ids)

    def image_id(self, index: int) -> Any:
        value = self.ids[index]
        return value.item() if isinstance(value, np.generic) else value

    def image(self, index: int) -> tuple[str, int, int]:
        """File name, width and height of image ``index``."""
        row = self.image_rows[index]
        name = self.names[self.name_offsets[row] : self.name_offsets[row + 1]]
        return (
            name.tobytes().decode("utf-8", "surrogatepass"),
            int(self.widths[row]),
            int(self.heights[row]),
        )

    def rows(self, index: int) -> slice:
        """The annotation rows of image ``index``."""
        row = self.image_rows[index]
        return slice(int(self.starts[row]), int(self.starts[row + 1]))

    def segmentation(self, row: int) -> Any:
        """Annotation ``row``'s segmentation as the JSON gave it (polygon values as floats)."""
        start, stop = self.other_starts[row], self.other_starts[row + 1]
        if stop > start:
            return json.loads(self.others[start:stop].tobytes())
        first, last = self.polygon_starts[row], self.polygon_starts[row + 1]
        bounds = self.polygon_offsets[first : last + 1]
        return [self.coords[a:b].tolist() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
