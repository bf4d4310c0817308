"""Classifier evaluation: loss, top-1 and top-5 accuracy, overall and per class, split over the
ranks of a distributed run by image."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from ..models import describe
from .distributed import DistInfo, gather_objects
from .evaluate import check_stop, shard_batches, shard_loader

__all__ = [
    "classification_metrics",
    "evaluate_classifier",
    "flat_classification",
    "format_classification",
]

TOP_K = 5


def _rate(hits: torch.Tensor) -> float | None:
    return float(hits.float().mean()) if len(hits) else None


def classification_metrics(
    top5: torch.Tensor, labels: torch.Tensor, losses: torch.Tensor, class_names: Sequence[str]
) -> dict[str, Any]:
    """``loss`` (mean), ``top1``, ``top5`` (fractions of images), ``images``, and ``per_class``:
    ``{name: {images, top1, top5}}`` over the images of that class (null when it has none)."""
    hit1 = top5[:, 0] == labels
    hit5 = (top5 == labels[:, None]).any(dim=1)
    per_class = {}
    for label, name in enumerate(class_names):
        mine = labels == label
        per_class[name] = {"images": int(mine.sum()), "top1": _rate(hit1[mine]),
                           "top5": _rate(hit5[mine])}  # fmt: skip
    return {"loss": float(losses.mean()) if len(losses) else None, "top1": _rate(hit1),
            "top5": _rate(hit5), "images": len(labels), "per_class": per_class}  # fmt: skip


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    dataset: Dataset,
    device: torch.device,
    info: DistInfo | None = None,
    batch_size: int = 32,
    workers: int = 0,
    progress: bool = True,
    stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """:func:`classification_metrics` of ``model`` (in eval mode) on a dataset of ``(image,
    {"labels"})`` samples labelled as the model's classes. Each rank runs every
    ``world_size``-th image and gets every image's top 5, label and loss (the model's own:
    cross-entropy with its label smoothing), so the metrics are the same on every rank.
    ``stop``: see :func:`~spinedet.engine.evaluate.run_inference`."""
    info = info or DistInfo()
    loader = shard_loader(dataset, info, batch_size, workers, device)
    common = shard_batches(dataset, info, batch_size)
    was_training = model.training
    model.eval()
    parts: list[tuple[torch.Tensor, ...]] = []
    bar = tqdm(loader, desc="evaluate", unit="batch", disable=not progress or info.rank != 0)
    for done, (images, targets) in enumerate(bar, 1):
        logits = model(torch.stack(images).to(device, non_blocking=True)).float()
        labels = torch.stack([t["labels"] for t in targets]).to(device)
        k = min(TOP_K, logits.shape[1])
        losses = model.loss(logits, labels, reduction="none")
        parts.append((logits.topk(k).indices.cpu(), labels.cpu(), losses.cpu()))
        check_stop(stop, done, common, info)
    model.train(was_training)
    gathered = [p for rank_parts in gather_objects(parts, info) for p in rank_parts]
    if gathered:
        top5, labels, losses = (torch.cat(column) for column in zip(*gathered, strict=True))
    else:
        top5, labels = torch.zeros(0, TOP_K, dtype=torch.long), torch.zeros(0, dtype=torch.long)
        losses = torch.zeros(0)
    return classification_metrics(top5, labels, losses, describe(model).class_names)


def flat_classification(metrics: dict[str, Any]) -> dict[str, float | None]:
    """One level for metrics.jsonl and TensorBoard: ``accuracy/top1``, ``accuracy/top5`` and
    ``top1_per_class/<class>``."""
    flat = {"accuracy/top1": metrics["top1"], "accuracy/top5": metrics["top5"]}
    return flat | {f"top1_per_class/{name}": row["top1"]
                   for name, row in metrics["per_class"].items()}  # fmt: skip


def _cell(value: float | None) -> str:
    return "     -" if value is None else f"{value:6.3f}"


def format_classification(metrics: dict[str, Any], worst: int | None = None) -> str:
    """Top-1 and top-5 accuracy, then per-class accuracy worst first (classes without images
    last); ``worst`` keeps only that many rows."""
    lines = [f"top-1 {_cell(metrics['top1'])}  top-5 {_cell(metrics['top5'])}  "
             f"({metrics['images']} images)"]  # fmt: skip
    rows = metrics["per_class"]
    names = sorted(rows, key=lambda n: (rows[n]["top1"] is None, rows[n]["top1"] or 0.0))
    shown = names if worst is None else names[:worst]
    title = "per-class accuracy, worst first"
    if len(shown) < len(names):
        title += f" ({len(shown)} of {len(names)})"
    lines += ["", title, f"{'class':<20} {'images':>6} {'top-1':>6} {'top-5':>6}"]
    for name in shown:
        row = rows[name]
        lines.append(f"{name[:20]:<20} {row['images']:>6} {_cell(row['top1'])} "
                     f"{_cell(row['top5'])}")  # fmt: skip
    return "\n".join(lines)
