"""Python inference: ``Predictor(weights)(image)`` on paths, PIL images, arrays and tensors.

The detections come back in the input image's pixels, with the data set's category ids and
names (the model's description), and masks as binary images or COCO RLE.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as nnf
from torchvision.ops import box_area
from torchvision.transforms.v2 import functional as F

from .data import load_image
from .data.coco_files import shrunk_size, to_rgb
from .data.transforms import classification_eval_transforms
from .device import default_device
from .errors import SpinedetError
from .masks import MaskCrops, resize_masks
from .models import ModelDescription, describe, detection_selection, load_model, selecting
from .models.matching import pairwise_intersection
from .models.postprocess import pasting_crops
from .models.registry import task_of
from .optimize import optimize_for_inference

log = logging.getLogger(__name__)

__all__ = [
    "Classes",
    "Detections",
    "ImageInput",
    "Predictor",
    "check_positive",
    "default_device",
    "tile_origins",
    "tile_settings",
    "to_image_tensor",
]

ImageInput = str | Path | Image.Image | np.ndarray | torch.Tensor


@dataclass(init=False)
class Detections:
    """One image's detections, in the pixels of the image as given.

    ``boxes`` (N, 4) xyxy float, ``scores`` (N,), ``labels`` (N,) the model's labels,
    ``category_ids`` and ``names`` the data set's, ``masks`` (Mask R-CNN only) a (N, H, W) bool
    tensor or a list of COCO RLE dicts, ``image_size`` (H, W).

    Binary masks given as :class:`MaskCrops` (as :class:`Predictor` gives them) stay crops,
    ``mask_crops``, which drawing and :meth:`to_coco` read: ``masks`` makes the full tensor when
    first read (100 masks of a 12-megapixel image are 1.2 GB).
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    category_ids: list[int]
    names: list[str]
    image_size: tuple[int, int]

    def __init__(
        self,
        boxes: torch.Tensor,
        scores: torch.Tensor,
        labels: torch.Tensor,
        category_ids: list[int],
        names: list[str],
        image_size: tuple[int, int],
        masks: torch.Tensor | list[dict[str, Any]] | MaskCrops | None = None,
    ) -> None:
        self.boxes, self.scores, self.labels = boxes, scores, labels
        self.category_ids, self.names, self.image_size = category_ids, names, image_size
        self.masks = masks

    @property
    def masks(self) -> torch.Tensor | list[dict[str, Any]] | None:
        if self._masks is None and self._crops is not None:
            self._masks = self._crops.full()
        return self._masks

    @masks.setter
    def masks(self, masks: torch.Tensor | list[dict[str, Any]] | MaskCrops | None) -> None:
        crops = isinstance(masks, MaskCrops)
        self._crops, self._masks = (masks, None) if crops else (None, masks)

    @property
    def mask_crops(self) -> MaskCrops | None:
        """The binary masks as :class:`MaskCrops` (None: RLE masks, or none)."""
        if self._crops is None and isinstance(self._masks, torch.Tensor):
            return MaskCrops.from_masks(self._masks)
        return self._crops

    def __len__(self) -> int:
        return len(self.scores)

    def to_coco(self, image_id: int) -> list[dict[str, Any]]:
        """COCO result entries (xywh boxes rounded to 0.01 px, RLE masks, category names)."""
        crops = self.mask_crops
        rles = crops.to_rle() if crops is not None else self._masks
        entries = []
        for i, (box, score) in enumerate(
            zip(self.boxes.tolist(), self.scores.tolist(), strict=True)
        ):
            x0, y0, x1, y1 = box
            entry = {
                "image_id": image_id,
                "category_id": self.category_ids[i],
                "category_name": self.names[i],
                "bbox": [round(v, 2) for v in (x0, y0, x1 - x0, y1 - y0)],
                "score": round(score, 5),
            }
            if rles is not None:
                entry["segmentation"] = rles[i]
            entries.append(entry)
        return entries


@dataclass
class Classes:
    """A classifier's ``top_k`` classes for one image, most probable first: ``labels`` (k,),
    ``scores`` (k,) softmax probabilities, ``category_ids`` and ``names``; ``image_size``."""

    labels: torch.Tensor
    scores: torch.Tensor
    category_ids: list[int]
    names: list[str]
    image_size: tuple[int, int]
    masks: None = None  # no masks, like a box detector's Detections

    def __len__(self) -> int:
        return len(self.scores)

    def to_coco(self, image_id: int) -> list[dict[str, Any]]:
        """One entry per class: image id, category id and name, probability."""
        return [{"image_id": image_id, "category_id": c, "category_name": n,
                 "score": round(s, 5)}
                for c, n, s in zip(self.category_ids, self.names, self.scores.tolist(),
                                   strict=True)]  # fmt: skip


def to_image_tensor(image: ImageInput, bgr: bool = False) -> torch.Tensor:
    """A (3, H, W) uint8 or float32 tensor of an image path, PIL image, HWC array or CHW tensor.

    Arrays and tensors may be uint8 (0..255), float (0..1, any precision), uint16 (0..65535,
    scaled as 16-bit image files are) or another integer type holding 0..255. ``bgr``: the
    array or tensor's channels are in OpenCV's BGR order."""
    if isinstance(image, str | Path):
        image = load_image(image)
    if isinstance(image, Image.Image):
        return F.pil_to_tensor(to_rgb(image))
    if isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise SpinedetError(f"numpy image of shape {image.shape}: expected H x W x 3 (uint8)")
        if image.dtype.kind not in "uif":  # bool, complex, object: torch cannot take all
            raise SpinedetError(f"numpy image of dtype {image.dtype}: {_DTYPES}")
        array = np.ascontiguousarray(image[:, :, :3] if image.shape[2] == 3 else _on_black(image))
        # np.asarray(PIL image) is read-only, and torch warns about sharing it on every call.
        tensor = torch.from_numpy(array if array.flags.writeable else array.copy())
        tensor = tensor.permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise SpinedetError(f"tensor image of shape {tuple(image.shape)}: expected 3 x H x W")
        tensor = image
    else:
        raise SpinedetError(f"cannot read an image from a {type(image).__name__}")
    if not tensor[0].numel():
        raise SpinedetError(f"an image of {tensor.shape[2]} x {tensor.shape[1]} pixels: empty")
    tensor = _to_model_dtype(tensor)
    return tensor.flip(0) if bgr else tensor


_DTYPES = "pass uint8 0..255 or float 0..1"


def _on_black(image: np.ndarray) -> np.ndarray:
    """An H x W x 4 array's colour composited on black by its alpha, as an RGBA file is
    (:func:`to_rgb`; uint8 through the same PIL call, so equal to the file's pixels)."""
    if image.dtype == np.uint8:  # the order of the colours does not matter: BGRA works too
        return np.asarray(to_rgb(Image.fromarray(np.ascontiguousarray(image), "RGBA")))
    opaque = 1.0 if image.dtype.kind == "f" else 65535.0 if image.dtype == np.uint16 else 255.0
    composited = image[:, :, :3] * (image[:, :, 3:] / opaque)
    if image.dtype.kind != "f":
        composited = np.rint(composited)
    return composited.astype(image.dtype)


def _to_model_dtype(tensor: torch.Tensor) -> torch.Tensor:
    """uint8 as it is, float32 in [0, 1] otherwise; anything the model would misread (values
    outside the range its dtype implies, bool) is an error rather than silently no detections."""
    if tensor.dtype == torch.uint8:
        return tensor
    if tensor.dtype == torch.uint16:  # 16-bit images: the full range, like I;16 image files
        return tensor.float() / 65535
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise SpinedetError(f"image of dtype {tensor.dtype}: {_DTYPES}")
    # torch has no aminmax for uint32/uint64; float64 tells 0..255 apart exactly.
    wide = tensor.dtype in (torch.uint32, torch.uint64)
    low, high = (tensor.double() if wide else tensor).aminmax()
    if tensor.is_floating_point():
        if not 0 <= float(low) <= float(high) <= 1:  # also false for NaN
            raise SpinedetError(
                f"float image with values {float(low):g}..{float(high):g}: {_DTYPES}"
            )
        return tensor.float()
    if not 0 <= int(low) <= int(high) <= 255:
        raise SpinedetError(f"{tensor.dtype} image with values {int(low)}..{int(high)}: {_DTYPES}")
    return tensor.to(torch.uint8)


def _kept_labels(
    description: ModelDescription, classes: str | int | Iterable[str | int] | None
) -> torch.Tensor | None:
    """Which of the model's class outputs ``classes`` keeps, as a bool mask (None: all)."""
    if classes is None:
        return None
    one = isinstance(classes, str | int | np.integer)
    kept = torch.zeros(description.num_classes, dtype=torch.bool)
    kept[description.labels_of([classes] if one else classes)] = True
    return kept


def _one_image(images: Any) -> bool:
    """Whether ``images`` is one image rather than an iterable of them: a stacked batch (an
    (N, 3, H, W) tensor, an (N, H, W, 3) array, as a DataLoader or a video reader stacks them)
    is the latter; anything iterable but a path is too."""
    if isinstance(images, np.ndarray | torch.Tensor):
        return images.ndim < 4
    return isinstance(images, str) or not isinstance(images, Iterable)


class Predictor:
    """A detector (or classifier) ready for inference on images of any kind.

    ``Predictor(weights)`` loads a spinedet ``.safetensors`` file or run directory (or takes a
    model); calling it on an image path, a PIL image, a numpy array (H x W x 3, RGB unless
    ``bgr=True`` as OpenCV reads them) or a (3, H, W) tensor, either uint8 or float in [0, 1]
    (see :func:`to_image_tensor`), returns a :class:`Detections`; on any iterable of them (a
    list, a generator, a batch: an (N, 3, H, W) tensor or (N, H, W, 3) array), a list, run
    ``batch_size`` images at a time. :meth:`stream` yields the results one by one instead,
    reading the images as it goes (a video's frames, an endless camera: Ultralytics'
    ``stream=True``). On a CPU (or with ``optimize=False``), images run in one batch are padded
    to a common size, as in evaluation (see "What rank 0 does, and what every rank does" in
    ``docs/training_at_scale.md``): a thin image can then give slightly different detections
    than alone, and ``batch_size=1`` gives each image its own. On a GPU the optimised model pads
    every image to its square size (:func:`~spinedet.cuda_graphs.pad_to_square`), so batches
    do not matter there.

    ``device`` defaults to CUDA when present. ``optimize`` (default) runs the model with
    BatchNorm folded, channels-last and oneDNN on CPU (:func:`optimize_for_inference`), equal to
    the plain model up to float rounding; on CPUs with AMX its convolutional parts run in
    bfloat16 (close, not equal). Images larger than the model's size are resized to it
    before the model sees them (so memory stays bounded) and thin ones padded to the largest
    stride; the detections are mapped back to the image as given. ``masks``: ``"binary"`` (bool
    tensors at image size, made when first read from the crops in ``mask_crops``, which only
    hold each mask's box: see :mod:`spinedet.masks`) or ``"rle"`` (COCO RLE dicts).
    ``score_threshold`` (0..1) below the detector's own (torchvision's 0.05) lowers that one
    while the Predictor runs the model (a model given is left as it was). ``max_detections``
    (a positive integer) caps the detections kept per image, the best first; default: the
    detector's own ``detections_per_img`` (torchvision's 300 for a RetinaNet, 100 for an R-CNN,
    unless built otherwise). ``classes``: only detections of these categories, each a name or
    data set id (see :meth:`~spinedet.models.ModelDescription.labels_of`), dropped before any
    cap so that other classes never take their places; a classifier's top ``top_k`` (default
    5; a classifier's option only) are those classes' best. ``nms_threshold`` (0..1): the IoU
    above which a detection suppresses a lower-scoring one of its class; default: the
    detector's own ``nms_thresh`` (torchvision's 0.5). These settings hold for the Predictor's
    own calls only, also when other threads run the same model meanwhile (see
    :func:`~spinedet.models.selecting`). ``image_size``: run the model loaded from ``weights``
    at this size instead of the one it was trained at (a detector's long side, a classifier's
    crop).

    ``tile`` (pixels): detect in ``tile`` x ``tile`` windows of each image larger than that,
    at the image's own resolution, neighbours overlapping by ``tile_overlap`` (default 0.2) of
    a tile (:func:`tile_origins`), and with ``tile_whole`` also in the whole image (resized to the
    model's size, as without tiles: for objects larger than a tile). Objects a few pixels wide
    in a 4000 x 3000 photo vanish when it is resized to 640; in a tile they keep their pixels.
    The views' detections are merged best first: each drops those of its class from other
    views that it covers, or that cover it, by ``nms_threshold`` (default: the detector's) of
    the smaller box, such as the pieces of an object that a tile border cuts; boxes at a
    tile's inner border (within 2% of a tile) come after all others, so that a piece never
    wins over the whole object seen by the neighbouring tile (or the whole image), which
    drops the pieces it covers of other classes too. ``max_detections`` keeps the first in
    that order (whole objects before pieces); the result is sorted by score.
    (``benchmarks/tiled_predict.py`` measures the choices.) Tiles larger than the model's
    ``image_size`` are shrunk to it, losing the pixels tiles are for (a warning says so).
    """

    def __init__(
        self,
        weights: str | Path | nn.Module,
        device: str | torch.device | None = None,
        score_threshold: float = 0.5,
        optimize: bool = True,
        batch_size: int = 4,
        masks: Literal["binary", "rle"] = "binary",
        top_k: int | None = None,
        *,
        max_detections: int | None = None,
        classes: str | int | Iterable[str | int] | None = None,
        nms_threshold: float | None = None,
        image_size: int | None = None,
        tile: int | None = None,
        tile_overlap: float | None = None,
        tile_whole: bool = False,
    ) -> None:
        if isinstance(weights, nn.Module):
            if image_size is not None:
                raise SpinedetError("image_size: give the weights' path, or build the model at "
                                    "that size (load_model(path, image_size=...))")  # fmt: skip
            model = weights
        else:
            sized = {} if image_size is None else {"image_size": image_size}
            model = load_model(weights, **sized)
        if task_of(model) is None:
            raise SpinedetError(f"{weights}: holds a backbone; Predictor needs a detector")
        if masks not in ("binary", "rle"):
            raise SpinedetError(f"masks={masks!r}: use 'binary' or 'rle'")
        if not (_is_real(score_threshold) and 0 <= score_threshold <= 1):  # NaN: none passes
            raise SpinedetError(f"score threshold {score_threshold!r}: use a score in 0..1")
        check_positive("batch_size", batch_size)  # 0 would end every stream at once
        if max_detections is not None:
            check_positive("max_detections", max_detections)
        if nms_threshold is not None and not (_is_real(nms_threshold) and 0 <= nms_threshold <= 1):
            raise SpinedetError(f"nms_threshold={nms_threshold!r}: use an IoU in 0..1")
        tile_overlap = tile_settings(tile, tile_overlap, tile_whole)
        self.description = describe(model)
        if self.description.task == "classifier":
            if max_detections is not None:
                raise SpinedetError("max_detections: a classifier gives its top_k classes instead")
            if nms_threshold is not None:
                raise SpinedetError("nms_threshold: a classifier has no detections to suppress")
            if tile is not None:
                raise SpinedetError("tile: a classifier sees each image whole")
        elif top_k is not None:
            raise SpinedetError("top_k: a detector gives detections, not classes "
                                "(max_detections caps them)")  # fmt: skip
        if top_k is not None:
            check_positive("top_k", top_k)
        kept = _kept_labels(self.description, classes)  # refused before the model is optimised
        self.device = default_device(device)
        self.kept_labels = None if kept is None else kept.to(self.device)
        model = model.eval().to(self.device)
        self.model = optimize_for_inference(model) if optimize else model
        # The optimised model's CUDA graphs replay into buffers of their own, which a second
        # thread's replay would overwrite before the first has read them: one call at a time.
        cuda_graphs = optimize and self.device.type == "cuda"
        self._one_at_a_time = threading.Lock() if cuda_graphs else contextlib.nullcontext()
        # The detector's own threshold (torchvision's 0.05) would silently drop the detections
        # a lower one asks for: lowered in the forward (a classifier has none).
        own = getattr(detection_selection(self.model), "score_thresh", None)
        self._score_thresh = score_threshold if own is not None and score_threshold < own else None
        self.score_threshold = score_threshold
        self.batch_size = batch_size
        self.masks = masks
        self._label_to_cat = self.description.label_to_category_id()
        self._name_of = {c.id: c.name for c in self.description.categories}
        self.classifier = self.description.task == "classifier"
        self.max_detections = None if max_detections is None else int(max_detections)
        self.nms_threshold = nms_threshold
        self.tile = None if tile is None else int(tile)
        self.tile_overlap = tile_overlap
        self.tile_whole = tile_whole
        if self.classifier:  # resized, centre-cropped and normalised as in evaluation
            top_k = 5 if top_k is None else top_k
            self.top_k = min(top_k, len(self._name_of) if kept is None else int(kept.sum()))
            self.transform = classification_eval_transforms(model.image_size)
            return
        self.image_size = int(model.transform.max_size)
        self.min_stride = 2 ** min(model.backbone.levels)
        if self.tile is not None and self.tile > self.image_size:
            log.warning("tiles of %d px are shrunk %.1fx to the model's %d: objects lose the "
                        "pixels tiles are for; a tile of %d keeps them", self.tile,
                        self.tile / self.image_size, self.image_size, self.image_size)  # fmt: skip

    def __call__(
        self, images: ImageInput | Iterable[ImageInput], bgr: bool = False
    ) -> Detections | Classes | list[Detections] | list[Classes]:
        """The result for one image; for an iterable of them, the list of results."""
        if _one_image(images):
            return self.predict_batch([to_image_tensor(images, bgr)])[0]
        return list(self.stream(images, bgr))

    def stream(
        self, images: Iterable[ImageInput], bgr: bool = False
    ) -> Iterator[Detections | Classes]:
        """Each image's result in turn, reading ``images`` (any iterable of them: a generator of
        video frames, a list, a stacked batch) only ``batch_size`` at a time, as it goes: an
        endless stream never ends up held in memory, results and masks included."""
        images = iter([images] if _one_image(images) else images)
        while batch := list(itertools.islice(images, self.batch_size)):
            yield from self.predict_batch([to_image_tensor(x, bgr) for x in batch])

    def prepare(self, image: torch.Tensor) -> torch.Tensor:
        """The float [0, 1] image given to the model: at most the model's size (antialiased
        downscale), and a thin image padded at the bottom/right so that its short side is at
        least the smallest stride once the model has resized it (else it rounds to 0 px)."""
        height, width = image.shape[-2:]
        scale = self.image_size / max(height, width)
        if scale < 1:
            image = F.resize(image, self._seen((height, width)), antialias=True)
        if not image.is_floating_point():
            image = F.to_dtype(image, torch.float32, scale=True)
        long_side = max(image.shape[-2:])
        # Padding the short side up to at most the long one leaves the model's scale unchanged.
        least = min(long_side, math.ceil(self.min_stride * long_side / self.image_size))
        pad_h, pad_w = max(0, least - image.shape[-2]), max(0, least - image.shape[-1])
        if pad_h or pad_w:
            image = nnf.pad(image, (0, pad_w, 0, pad_h))
        return image

    def _seen(self, shape: tuple[int, int]) -> tuple[int, int]:
        """The size an image of ``shape`` is given to the model at (never above its size)."""
        return shrunk_size(*shape, self.image_size)

    @torch.no_grad()
    def predict_batch(self, images: Sequence[torch.Tensor]) -> list[Detections] | list[Classes]:
        """Detections (a classifier's top-k :class:`Classes`) for (3, H, W) image tensors, run
        as one batch."""
        if self.classifier:
            batch = torch.stack([self.transform(image) for image in images]).to(self.device)
            with self._one_at_a_time:
                probs = self.model(batch).float().softmax(dim=1)
            if self.kept_labels is not None:  # the best of those classes, probabilities of all
                probs = probs.where(self.kept_labels, -1.0)
            scores, labels = probs.cpu().topk(self.top_k, dim=1)
            return [self._classes(s, lab, tuple(image.shape[-2:]))
                    for s, lab, image in zip(scores, labels, images, strict=True)]  # fmt: skip
        found = (
            self._detect(images, self.max_detections) if self.tile is None else self._tiled(images)
        )
        if self.masks == "rle":
            for detections in found:
                if (crops := detections.mask_crops) is not None:
                    detections.masks = crops.to_rle()
        return found

    def _detect(
        self, images: Sequence[torch.Tensor], max_detections: int | None
    ) -> list[Detections]:
        """Each image's detections, at most ``max_detections`` (None: the detector's own cap),
        run as one batch, masks as crops."""
        inputs, shapes = [], []
        for image in images:
            shapes.append(tuple(image.shape[-2:]))
            inputs.append(self.prepare(image.to(self.device)))
        selected = selecting(self.model, max_detections, self.kept_labels, self._score_thresh,
                             self.nms_threshold)  # fmt: skip
        # Pasted at the (small) size the model saw, whatever the caller's context: _finish
        # resizes them to the image's size as crops.
        with self._one_at_a_time, selected, pasting_crops(False):
            outputs = self.model(inputs)
        return [self._finish(o, x, s) for o, x, s in zip(outputs, inputs, shapes, strict=True)]

    def _tiled(self, images: Sequence[torch.Tensor]) -> list[Detections]:
        """Each image larger than a tile in overlapping tiles at its own resolution
        (:func:`tile_origins`), and whole with ``tile_whole`` (a smaller one whole only),
        ``batch_size`` views at a time; each image's detections merged (:meth:`_merge`)."""

        def views() -> Iterator[tuple[int, int, int, torch.Tensor]]:
            for i, image in enumerate(images):
                height, width = image.shape[-2:]
                if self.tile_whole or max(height, width) <= self.tile:
                    yield i, 0, 0, image
                if max(height, width) > self.tile:
                    for y, x in tile_origins(height, width, self.tile, self.tile_overlap):
                        yield i, y, x, image[:, y : y + self.tile, x : x + self.tile]

        parts: list[list[tuple[int, int, Detections]]] = [[] for _ in images]
        pending = views()
        while batch := list(itertools.islice(pending, self.batch_size)):
            found = self._detect([view for *_, view in batch], None)  # capped once merged
            for (i, y, x, _), detections in zip(batch, found, strict=True):
                parts[i].append((y, x, detections))
        shapes = [tuple(image.shape[-2:]) for image in images]
        return [self._merge(part, shape) for part, shape in zip(parts, shapes, strict=True)]

    def _merge(
        self, parts: list[tuple[int, int, Detections]], shape: tuple[int, int]
    ) -> Detections:
        """The detections of an image's views (each at its ``(y, x)`` in the image) as the
        image's: each drops the detections of its class from other views whose box it covers,
        or that cover it, by ``nms_threshold`` of the smaller box (the pieces of an object a
        tile border cuts, besides the whole one). Those a view's border may cut
        (:func:`_at_inner_border`) come after the others, each group best first, so that the
        whole object from the neighbouring tile wins over a higher-scored piece of it; such a
        whole one also drops the pieces it covers of other classes. At most ``max_detections``
        are kept, in that order (each view keeps up to the detector's own cap), then sorted by
        score."""
        offsets = torch.tensor([[x, y, x, y] for y, x, d in parts for _ in range(len(d))])
        boxes = torch.cat([d.boxes for *_, d in parts]) + offsets.reshape(-1, 4)
        scores = torch.cat([d.scores for *_, d in parts])
        labels = torch.cat([d.labels for *_, d in parts])
        views = torch.cat([torch.full((len(d),), v) for v, (*_, d) in enumerate(parts)])
        heads = detection_selection(self.model)
        threshold = self.nms_threshold if self.nms_threshold is not None else heads.nms_thresh
        overlap = pairwise_intersection(boxes, boxes)
        area = box_area(boxes)
        smaller = torch.minimum(area[:, None], area[None]).clamp(min=1e-6)
        covers = (overlap / smaller >= threshold) & (views[:, None] != views[None])
        margin = _BORDER_MARGIN * self.tile
        cut = torch.cat([_at_inner_border(d.boxes, (y, x), d.image_size, shape, margin)
                         for y, x, d in parts])  # fmt: skip
        # A piece is classed from part of an object: whole ones drop those they cover of any class.
        pieces = covers & cut[None]
        covers &= labels[:, None] == labels[None]
        order = scores.argsort(descending=True, stable=True)
        order = order[cut[order].to(torch.uint8).argsort(stable=True)]
        dropped = torch.zeros(len(scores), dtype=torch.bool)
        keep = []
        for i in order.tolist():
            if not dropped[i]:
                keep.append(i)
                dropped |= covers[i] if cut[i] else covers[i] | pieces[i]
        keep = keep[: self.max_detections]  # None: all; wholes before pieces
        keep.sort(key=lambda k: -float(scores[k]))
        cats = [c for *_, d in parts for c in d.category_ids]
        merged = Detections(boxes[keep], scores[keep], labels[keep], [cats[k] for k in keep],
                            [self._name_of[cats[k]] for k in keep], shape)  # fmt: skip
        if parts[0][2].mask_crops is not None:
            crops = [c for *_, d in parts for c in d.mask_crops.crops]
            origins = [(y + top, x + left) for y, x, d in parts
                       for top, left in d.mask_crops.origins]  # fmt: skip
            merged.masks = MaskCrops([crops[k] for k in keep], [origins[k] for k in keep], shape)
        return merged

    def _classes(self, scores: torch.Tensor, labels: torch.Tensor,
                 shape: tuple[int, int]) -> Classes:  # fmt: skip
        cats = [self._label_to_cat[int(label)] for label in labels]
        return Classes(labels, scores, cats, [self._name_of[c] for c in cats], shape)

    def _finish(self, output: dict, given: torch.Tensor, shape: tuple[int, int]) -> Detections:
        """Keep detections above the threshold and map them back to the original image."""
        keep = output["scores"] >= self.score_threshold
        if not keep.all():  # else no copy: 100 masks at 640 x 480 are 120 MB
            output = {k: v[keep] for k, v in output.items()}
        height, width = shape
        # The model saw the image scaled to (seen_h, seen_w) and padded: undo both.
        seen_h, seen_w = self._seen(shape)
        factor = torch.tensor([width / seen_w, height / seen_h] * 2, device=output["boxes"].device)
        boxes = output["boxes"] * factor
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        labels = output["labels"].cpu()
        cats = [self._label_to_cat[int(label)] for label in labels]
        detections = Detections(
            boxes=boxes.cpu(),
            scores=output["scores"].cpu(),
            labels=labels,
            category_ids=cats,
            names=[self._name_of[c] for c in cats],
            image_size=(height, width),
        )
        if "masks" in output:
            detections.masks = resize_masks(output["masks"][:, 0, :seen_h, :seen_w], shape)
        return detections


def tile_settings(tile: int | None, overlap: float | None, whole: bool) -> float:
    """The tile overlap to use (default 0.2), or a SpinedetError for settings that cannot
    apply: a tile under 32 pixels, an overlap outside 0..1 (1 excluded), or an overlap or
    ``whole`` without a tile (silently unused otherwise)."""
    if tile is not None and not (_is_whole(tile) and tile >= 32):
        raise SpinedetError(f"tile={tile!r}: use a size in pixels, at least 32")
    if tile is None and (overlap is not None or whole):
        given = "tile_overlap" if overlap is not None else "tile_whole"
        raise SpinedetError(f"{given} (--{given.replace('_', '-')}): applies to tiles only; "
                            "give a tile size too (tile=, --tile)")  # fmt: skip
    overlap = 0.2 if overlap is None else overlap
    if not (_is_real(overlap) and 0 <= overlap < 1):
        raise SpinedetError(f"tile_overlap={overlap!r}: use a fraction in 0..1 (not 1)")
    return float(overlap)


def check_positive(name: str, value: object) -> None:
    """A SpinedetError naming ``name`` unless ``value`` is a positive integer (numpy's too;
    not a bool)."""
    if not (_is_whole(value) and value >= 1):
        raise SpinedetError(f"{name}={value!r}: use a positive integer")


def _is_whole(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


# How near (a fraction of a tile) a box must reach to a tile's inner border to count as cut
# by it: a detector rarely draws a cut object's box to the very edge (tiled_predict.py, tiles
# of 192: box AP50 rose in every setting with margins of 1% to 3% of a tile, less at 0.5%).
_BORDER_MARGIN = 0.02


def _at_inner_border(
    boxes: torch.Tensor,
    origin: tuple[int, int],
    view: tuple[int, int],
    shape: tuple[int, int],
    margin: float,
) -> torch.Tensor:
    """Which ``boxes`` of a view (``view`` = its (height, width), at ``origin`` = (y, x) in an
    image of ``shape``) reach within ``margin`` pixels of one of the view's edges that lie
    inside the image: objects the view's border may have cut."""
    (y, x), (height, width), (image_height, image_width) = origin, view, shape
    x0, y0, x1, y1 = boxes.unbind(1)
    return (
        ((x0 <= margin) & (x > 0))
        | ((y0 <= margin) & (y > 0))
        | ((x1 >= width - margin) & (x + width < image_width))
        | ((y1 >= height - margin) & (y + height < image_height))
    )


def tile_origins(height: int, width: int, tile: int, overlap: float) -> Iterator[tuple[int, int]]:
    """The top-left corners (row, column) of ``tile`` x ``tile`` windows that cover a ``height``
    x ``width`` image, neighbours overlapping by at least ``overlap`` of a tile, evenly spread
    from one border to the other (a window is the image's side where that is shorter); row by
    row, as they are needed (small tiles with a large overlap make millions)."""

    def starts(length: int) -> list[int]:
        if length <= tile:
            return [0]
        stride = max(1, math.floor(tile * (1 - overlap)))
        count = math.ceil((length - tile) / stride) + 1
        return [round(i * (length - tile) / (count - 1)) for i in range(count)]

    return itertools.product(starts(height), starts(width))
