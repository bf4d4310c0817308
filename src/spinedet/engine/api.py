"""The three jobs as Python functions: ``train``, ``evaluate`` and ``predict``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import CocoDataset
from ..data.transforms import eval_transforms
from ..errors import SpinedetError
from ..models import describe, load_model
from ..models.registry import task_of
from ..models.weights import atomic_write, resolve_checkpoint
from .distributed import flush_denormals
from .evaluate import coco_evaluate, run_inference
from .predict import collect_images, predict_images
from .trainer import train

__all__ = ["train", "evaluate", "predict", "resolve_checkpoint", "load_checkpoint"]


def load_checkpoint(path: str | Path, **overrides) -> tuple[nn.Module, list[dict[str, Any]]]:
    """The model saved in ``path`` and its categories (user ids and names)."""
    flush_denormals()
    path = resolve_checkpoint(path)
    model = load_model(path, **overrides)
    categories = [{"id": c.id, "name": c.name} for c in describe(model).categories]
    return model, categories


def evaluate(
    checkpoint: str | Path,
    annotations: str | Path,
    images: str | Path,
    out_dir: str | Path | None = None,
    batch_size: int = 2,
    device: str = "cpu",
) -> dict[str, dict[str, Any]]:
    """COCO AP (box, and mask for Mask R-CNN) of a checkpoint on a COCO json data set.

    With ``out_dir``, writes ``metrics.json`` and the COCO results file ``results.json``.
    """
    model, categories = load_checkpoint(checkpoint)
    task = task_of(model)
    if task is None:
        raise SpinedetError(f"{checkpoint} holds a backbone: evaluate a detector")
    masks = task.masks
    dataset = CocoDataset(annotations, images, eval_transforms(), masks=masks)
    ids = {c["id"] for c in categories}
    unknown = sorted({c["id"] for c in dataset.categories} - ids)
    if unknown:
        raise SpinedetError(
            f"{annotations}: category ids {unknown[:10]} are not among the model's categories"
        )
    label_to_cat = describe(model).label_to_category_id()
    results = run_inference(model.to(device), dataset, label_to_cat, torch.device(device),
                            batch_size=batch_size)  # fmt: skip
    metrics = coco_evaluate(dataset.coco, results, ("bbox", "segm") if masks else ("bbox",))
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(
            out / "metrics.json", lambda t: Path(t).write_text(json.dumps(metrics, indent=1))
        )
        atomic_write(out / "results.json", lambda t: Path(t).write_text(json.dumps(results)))
    return metrics


def predict(
    checkpoint: str | Path,
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    score_threshold: float = 0.5,
    device: str = "cpu",
) -> Path:
    """Draw a checkpoint's detections over images (files or directories) into ``out_dir``;
    returns the path of ``predictions.json``."""
    model, _ = load_checkpoint(checkpoint)
    return predict_images(model, collect_images(inputs), out_dir, score_threshold, device)
