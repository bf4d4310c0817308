"""``spinedet data show``: the ground truth drawn over its images, and what the training
augmentation makes of it, to look at before training on a data set."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..draw import draw_instances
from ..errors import SpinedetError
from ..files import refuse_existing, save_png
from .coco import CocoDataset
from .coco_files import read_json, unsegmented
from .transforms import train_transforms

__all__ = ["show_dataset"]


def _has_masks(annotations: str | Path) -> bool:
    """Whether the loader takes the annotations' masks (then they are drawn): its own rule."""
    anns = read_json(annotations).get("annotations") or []
    return bool(anns) and not unsegmented(anns)


def _pick(dataset: CocoDataset, num: int, image_ids: Sequence[Any] | None, seed: int) -> list[int]:
    """Indices of ``image_ids`` (in that order), or ``num`` images drawn at random."""
    if image_ids:
        position = {str(image_id): i for i, image_id in enumerate(dataset.ids)}
        missing = [str(i) for i in image_ids if str(i) not in position]
        if missing:
            raise SpinedetError(f"{dataset.annotations}: no image with id {', '.join(missing)}")
        return [position[str(i)] for i in image_ids]
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    return sorted(order[:num].tolist())


def _draw(image: torch.Tensor, target: dict[str, Any], dataset: CocoDataset) -> Image.Image:
    if image.is_floating_point():  # after the augmentation: [0, 1] floats
        image = (image * 255).round().clamp(0, 255).to(torch.uint8)
    labels = target["labels"].tolist()
    texts = [dataset.class_names[label - 1] for label in labels]
    boxes = target["boxes"].as_subclass(torch.Tensor)
    drawn = draw_instances(image.as_subclass(torch.Tensor), boxes, labels, texts,
                           len(dataset.class_names), target.get("masks"))  # fmt: skip
    return Image.fromarray(drawn.permute(1, 2, 0).numpy())


def show_dataset(
    annotations: str | Path,
    images: str | Path,
    out: str | Path,
    *,
    num: int = 16,
    image_ids: Sequence[Any] | None = None,
    augmented: int = 0,
    config: dict[str, Any] | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> list[Path]:
    """Draw the boxes, masks and class names of ``num`` random images (or of ``image_ids``)
    into ``out/<file name>.png``, and ``augmented`` training augmentations of each (as
    ``config``'s ``model.image_size``, ``data.scale_range`` and ``data.hflip`` make them) into
    ``out/<file name>_aug<k>.png``. Returns the files written; existing files are never
    replaced unless ``overwrite``."""
    dataset = CocoDataset(annotations, images, masks=_has_masks(annotations))
    picked = _pick(dataset, num, image_ids, seed)
    augment = None
    if augmented:
        if config is None:
            raise SpinedetError("data show --augmented needs a config (--config RECIPE)")
        size, data = config["model"]["image_size"], config["data"]
        augment = train_transforms(size, tuple(data["scale_range"]), data["hflip"])
    out = Path(out)
    jobs: list[tuple[Path, int, int]] = []  # (drawing, dataset index, augmentation or -1)
    for index in picked:
        name = Path(dataset.index.image(index)[0])
        jobs.append((out / name.with_suffix(".png"), index, -1))
        jobs += [(out / name.with_name(f"{name.stem}_aug{k}.png"), index, k)
                 for k in range(augmented)]  # fmt: skip
    for path, _, _ in jobs:
        refuse_existing(path, overwrite)
    for path, index, k in jobs:
        image, target = dataset[index]
        if k >= 0:
            torch.manual_seed(seed * 1_000_003 + index * 101 + k)  # the same drawings every run
            image, target = augment(image, target)
        save_png(_draw(image, target, dataset), path)
    return [path for path, _, _ in jobs]
