"""Prediction on image files: detections drawn over each image plus COCO-style JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torchvision.transforms.v2 import functional as F
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks
from tqdm import tqdm

from ..data import load_image
from ..models import describe
from ..models.weights import atomic_write
from .evaluate import to_coco_results

__all__ = ["IMAGE_SUFFIXES", "collect_images", "predict_images", "draw_detections"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Image files named directly or found (recursively) in the given directories."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            paths.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such image or directory")
    if not paths:
        raise FileNotFoundError(f"no images found in {', '.join(map(str, inputs))}")
    return paths


def draw_detections(
    image: torch.Tensor, output: dict[str, torch.Tensor], class_names: Sequence[str]
) -> torch.Tensor:
    """uint8 image with masks, boxes and ``name score`` labels drawn by torchvision."""
    if "masks" in output and len(output["masks"]):
        image = draw_segmentation_masks(image, output["masks"][:, 0] > 0.5, alpha=0.45)
    labels = [
        f"{class_names[int(label) - 1]} {score:.2f}"
        for label, score in zip(output["labels"], output["scores"].tolist(), strict=True)
    ]
    return draw_bounding_boxes(image, output["boxes"], labels, width=2)


@torch.no_grad()
def predict_images(
    model: nn.Module,
    paths: Sequence[Path],
    out_dir: str | Path,
    score_threshold: float = 0.5,
    device: torch.device | str = "cpu",
) -> Path:
    """Run ``model`` on each image, draw the detections above ``score_threshold`` into
    ``out_dir/<name>.png`` and write all of them to ``out_dir/predictions.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval().to(device)
    description = describe(model)
    label_to_cat = description.label_to_category_id()
    names = description.class_names
    name_of = {c.id: c.name for c in description.categories}
    results = []
    for index, path in enumerate(tqdm(paths, desc="predict", unit="img")):
        image = F.pil_to_tensor(load_image(path))
        output = model([F.to_dtype(image, torch.float32, scale=True).to(device)])[0]
        keep = output["scores"] >= score_threshold
        output = {k: v[keep].cpu() for k, v in output.items()}
        F.to_pil_image(draw_detections(image, output, names)).save(out / f"{path.stem}.png")
        for entry in to_coco_results(output, index, label_to_cat):
            entry["file_name"] = str(path)
            entry["category_name"] = name_of[entry["category_id"]]
            results.append(entry)
    target = out / "predictions.json"
    atomic_write(target, lambda tmp: Path(tmp).write_text(json.dumps(results)))
    return target
