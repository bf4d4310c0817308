"""The parts a training run is built from, each from its section of the config: data sets
(chosen by the model's task), the model (fresh, fine-tuned, or on a pretrained backbone) and
the optimizer with its schedule."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..data import CocoDataset, ImageFolderDataset
from ..data.transforms import (
    classification_eval_transforms,
    classification_train_transforms,
    eval_transforms,
    train_transforms,
)
from ..errors import SpinedetError, shorten
from ..models import create_model
from ..models.registry import BACKBONE, TASKS, Task, model_task
from ..models.weights import (
    architecture_options,
    backbone_options,
    load_weights,
    read_weights,
    restore,
)

__all__ = [
    "DATASET_BUILDERS",
    "DATASET_SOURCES",
    "Datasets",
    "build_datasets",
    "build_model",
    "build_optimizer",
    "data_source",
    "effective_lr",
    "load_backbone_weights",
    "lr_lambda",
    "register_dataset_builder",
]

log = logging.getLogger(__name__)


@dataclass
class Datasets:
    """The training set, the validation set (None without ``data.val``) and the categories
    (``[{id, name}, ...]``) the model is built for; ``val_loss``, the validation set as the
    validation loss reads it, where that differs (None: ``val``)."""

    train: Dataset
    val: Dataset | None
    categories: list[dict[str, Any]]
    val_loss: Dataset | None = None


# task name -> builder(config, task) -> Datasets, and the ``data.<split>`` key that names each
# split's source (its presence says whether a validation set is given).
DATASET_BUILDERS: dict[str, Callable[[dict, Task], Datasets]] = {}
DATASET_SOURCES: dict[str, str] = {}


def register_dataset_builder(*tasks: str, source: str = "annotations") -> Callable:
    def register(builder: Callable[[dict, Task], Datasets]) -> Callable[[dict, Task], Datasets]:
        for task in tasks:
            DATASET_BUILDERS[task] = builder
            DATASET_SOURCES[task] = source
        return builder

    return register


def data_source(cfg: dict, split: str) -> str | None:
    """What ``data.<split>`` reads for the configured model: its COCO json (detectors) or its
    ImageFolder root (classifiers); None when not set."""
    task = model_task(cfg["model"]["name"])
    return cfg["data"][split][DATASET_SOURCES.get(task, "annotations")]


@register_dataset_builder("classifier", source="images")
def build_image_folder(cfg: dict, task: Task) -> Datasets:
    """ImageFolder trees (``data.<split>.images``, one folder per class) for classifiers: the
    training set's folders are the classes; the validation set's map onto them by name."""
    dcfg, size = cfg["data"], cfg["model"]["image_size"]
    train_tf = classification_train_transforms(size, tuple(dcfg["crop_area"]), dcfg["hflip"])
    train_set = ImageFolderDataset(dcfg["train"]["images"], train_tf)
    val_set = None
    if dcfg["val"]["images"]:
        val_set = ImageFolderDataset(dcfg["val"]["images"], classification_eval_transforms(size),
                                     train_set.classes)  # fmt: skip
    return Datasets(train_set, val_set, train_set.categories)


@register_dataset_builder("retinanet", "fasterrcnn", "maskrcnn")
def build_coco(cfg: dict, task: Task) -> Datasets:
    """COCO json + image folder for detectors (masks for Mask R-CNN)."""
    dcfg, size = cfg["data"], cfg["model"]["image_size"]
    train_tf = train_transforms(size, tuple(dcfg["scale_range"]), dcfg["hflip"])
    # The transforms' largest scale is all the pixels they use: larger photos load at that.
    largest = math.ceil(size * max(dcfg["scale_range"]))
    train_set = CocoDataset(dcfg["train"]["annotations"], dcfg["train"]["images"], train_tf,
                            task.masks, max_size=largest)  # fmt: skip
    if not dcfg["val"]["annotations"]:
        return Datasets(train_set, None, train_set.categories)
    # The training set's labels: a validation file listing fewer categories would number
    # them otherwise (a wrong validation loss), one with more would be refused only late.
    # AP reads the ground truth from the json: its pass loads the images alone. The loss
    # pass loads the targets too, at the size the model shrinks them to (a 12-megapixel
    # photo's 30 masks were 360 MB, then 1.4 GB of floats in the model's resize).
    val = dcfg["val"]["annotations"], dcfg["val"]["images"], eval_transforms()
    val_set = CocoDataset(*val, False, train_set.categories)
    val_loss = CocoDataset(*val, task.masks, train_set.categories, max_size=size)
    return Datasets(train_set, val_set, train_set.categories, val_loss)


def _trained_task(cfg: dict) -> str:
    """The task of ``model.name``, refusing a backbone alone."""
    name = cfg["model"]["name"]
    task_name = model_task(name)
    if task_name is None:
        raise SpinedetError(f"model.name={name} is a backbone; train a detector (e.g. _maskrcnn)")
    return task_name


def check_model_config(cfg: dict) -> None:
    """Build the configured model on the meta device (no memory, no weights, under 2 s): a
    wrong name or option is refused before the data check, which takes minutes on a large
    set, and before anything is written to the run directory."""
    _trained_task(cfg)
    mcfg = cfg["model"]
    with torch.device("meta"):
        create_model(mcfg["name"], categories=[{"id": 1, "name": "check"}],
                     image_size=mcfg["image_size"], **mcfg["options"])  # fmt: skip


def build_datasets(cfg: dict) -> tuple[Task, Datasets]:
    """The model's task and its data sets; an empty set is refused before any training."""
    task_name = _trained_task(cfg)
    name = cfg["model"]["name"]
    builder = DATASET_BUILDERS.get(task_name)
    if builder is None:
        raise SpinedetError(f"model.name={name}: no data set builder for task {task_name!r}")
    if data_source(cfg, "train") is None:
        key = f"data.train.{DATASET_SOURCES[task_name]}"
        raise SpinedetError(f"{key} is not set (use --set {key}=...)")
    data = builder(cfg, TASKS[task_name])
    for split, dataset in (("train", data.train), ("val", data.val)):
        if dataset is not None and len(dataset) == 0:
            raise SpinedetError(
                f"{data_source(cfg, split)}: the data set has no images; "
                f"point data.{split} at a set with images"
            )
    return TASKS[task_name], data


def build_model(cfg: dict, categories: list[dict[str, Any]]) -> nn.Module:
    """The detector of ``model``: fresh, from ``model.weights`` (fine-tuning keeps the file's
    architecture unless the config sets an option itself) or on ``model.backbone_weights``
    (whose activation, BN epsilon and padding it keeps alike)."""
    mcfg = cfg["model"]
    options = dict(mcfg["options"])
    name = mcfg["name"].lower()
    for path, inherit in ((mcfg["weights"], architecture_options),
                          (mcfg["backbone_weights"], backbone_options)):  # fmt: skip
        inherited = (
            {k: v for k, v in inherit(path, name).items() if k not in options} if path else {}
        )
        options |= inherited
        if inherited:
            shown = ", ".join(f"{k}={v!r}" for k, v in sorted(inherited.items()))
            log.info("model options from %s: %s", path, shown)
    model = create_model(mcfg["name"], categories=categories, image_size=mcfg["image_size"],
                         **options)  # fmt: skip
    if mcfg["weights"]:
        load_weights(model, mcfg["weights"], allow_shape_mismatch=True)
    if mcfg["backbone_weights"]:
        load_backbone_weights(model, mcfg["backbone_weights"])
    return model


def load_backbone_weights(model: nn.Module, path: str) -> None:
    """Load the backbone of ``path`` (a backbone file, or a classifier/detector whose tensors
    under ``backbone.`` are its backbone) into ``model.backbone``, strictly; every other tensor
    of ``model`` keeps its fresh initialisation and is named in the log."""
    description, state, _ = read_weights(path)
    if description.task != BACKBONE:
        state = {k.removeprefix("backbone."): v for k, v in state.items()
                 if k.startswith("backbone.")}  # fmt: skip
        if not state:
            raise SpinedetError(f"model.backbone_weights={path}: no tensors under 'backbone.'; "
                                "give a backbone, classifier or detector file")  # fmt: skip
    restore(model.backbone, state, description, f"model.backbone_weights={path}")
    fresh = sorted(k for k in model.state_dict() if not k.startswith("backbone."))
    log.info("backbone from %s (%d tensors); %d tensors start fresh: %s", path, len(state),
             len(fresh), shorten(fresh))  # fmt: skip


def effective_lr(tcfg: dict) -> float:
    """``base_lr`` scaled linearly from ``base_batch`` to the effective batch (global batch x
    accumulation)."""
    return tcfg["base_lr"] * tcfg["batch_size"] * tcfg["accumulate"] / tcfg["base_batch"]


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on kernels only (conv/linear weights), not on biases or norm parameters."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_lambda(tcfg: dict, total_steps: int) -> Callable[[int], float]:
    """Warm-up, then step or cosine decay, as a factor of the LR per optimizer step."""
    warmup, factor = tcfg["warmup_steps"], tcfg["warmup_factor"]
    milestones = [int(m * total_steps) for m in tcfg["milestones"]]

    def scale(step: int) -> float:
        ramp = factor + (1 - factor) * step / warmup if step < warmup else 1.0
        if tcfg["schedule"] == "cosine":
            decay = 0.5 * (1 + math.cos(math.pi * min(step / max(total_steps, 1), 1.0)))
        else:
            decay = tcfg["gamma"] ** sum(step >= m for m in milestones)
        return ramp * decay

    return scale


def build_optimizer(
    tcfg: dict, model: nn.Module, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SGD with momentum or AdamW (``train.optimizer``) at :func:`effective_lr`, and its
    schedule over ``total_steps``."""
    groups, lr = _param_groups(model, tcfg["weight_decay"]), effective_lr(tcfg)
    # On a CPU the fused kernels take a quarter of the per-tensor loops' time (AdamW over the
    # quickstart model: 27 vs 103 ms a step on 2 cores).
    fused = all(p.device.type == "cpu" for p in model.parameters())
    if tcfg["optimizer"] == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=lr, fused=fused)
    else:
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=tcfg["momentum"], fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tcfg, total_steps))
    return optimizer, scheduler
