"""Model summaries: parameters, multiply-adds (overall and per module) and output pyramid of a
registered model, a weights file, a run directory or a config."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.detection.roi_heads import RoIHeads

from .config import CONFIG_DIR, load_config, resolve_config_path
from .files import refuse_missing_path
from .models import create_model, describe, load_model

__all__ = ["count_params", "count_macs", "model_info", "module_table", "resolve_source"]

Size = int | tuple[int, int]


def _hw(size: Size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def count_params(module: nn.Module) -> int:
    """Number of parameters (excluding buffers such as BN statistics)."""
    return sum(p.numel() for p in module.parameters())


def _backbone(model: nn.Module) -> nn.Module:
    """The SpineNet of a detector, or the model itself when it is a backbone."""
    return model if describe(model).task == "backbone" else model.backbone


def _roi_macs(
    roi: RoIHeads, features: dict, size: tuple[int, int], num_boxes: int, masks: bool
) -> None:
    """Run the second-stage heads on ``num_boxes`` fixed boxes (the test-time proposal count),
    so the count does not depend on how many detections random weights produce."""
    (h, w), steps = size, torch.linspace(0, 0.75, num_boxes)
    x, y = steps * w, steps * h
    boxes = [torch.stack([x, y, x + w / 4, y + h / 4], dim=1)]
    sizes = [size]
    roi.box_predictor(roi.box_head(roi.box_roi_pool(features, boxes, sizes)))
    if masks and roi.has_mask():
        detections = [boxes[0][: roi.detections_per_img]]
        roi.mask_predictor(roi.mask_head(roi.mask_roi_pool(features, detections, sizes)))


@torch.no_grad()
def count_macs(
    model: nn.Module, image_size: Size = 640, counter: FlopCounterMode | None = None
) -> int:
    """Multiply-adds of one image of ``image_size`` (an int for a square, or (H, W)), as the
    SpineNet paper counts.

    Detector counts cover the backbone and heads and exclude post-processing (decoding, NMS);
    two-stage detectors are counted at their test-time proposal and detection numbers. Pass a
    ``counter`` to read the per-module counts from it afterwards.
    """
    was_training = model.training
    model.eval()
    size = _hw(image_size)
    x = torch.zeros(1, 3, *size)
    counter = counter if counter is not None else FlopCounterMode(display=False)
    try:
        with counter:
            task = describe(model).task
            if task == "classifier":  # the whole network: backbone, level sum, linear layer
                model(x)
                features = {}
            else:
                features = _backbone(model)(x)
            if task == "retinanet":
                model.head(list(features.values()))
            elif task in ("fasterrcnn", "maskrcnn"):
                model.rpn.head(list(features.values()))
                proposals = model.rpn._post_nms_top_n["testing"]
                _roi_macs(model.roi_heads, features, size, proposals, masks=True)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2  # the counter counts a multiply-add as 2 FLOPs


def resolve_source(source: str | Path, num_classes: int | None = None) -> nn.Module:
    """A model from a registry name, a weights file, a run directory, or a config file or
    shipped recipe name (built as training would, with random weights)."""

    path = Path(source)
    if path.is_dir() or (path.suffix == ".safetensors" and path.exists()):
        return load_model(path)
    if path.suffix in (".yaml", ".yml") or (CONFIG_DIR / f"{path.name}.yaml").is_file():
        resolve_config_path(path)  # a one-line error for a missing file
        model_config = load_config(path)["model"]
        options = dict(model_config["options"])
        if num_classes is not None:
            options["num_classes"] = num_classes
        return create_model(model_config["name"], image_size=model_config["image_size"], **options)
    refuse_missing_path(source)
    return create_model(str(source), num_classes=num_classes)


def module_table(model: nn.Module, image_size: Size = 640, depth: int = 2) -> list[dict]:
    """Parameters and multiply-adds (as :func:`count_macs` counts them) of each module down
    to ``depth`` levels below the model (``name``, ``depth``, ``type``, ``params``,
    ``macs``), in the model's order."""
    counter = FlopCounterMode(display=False)
    spent: dict[nn.Module, int] = defaultdict(int)
    started: dict[nn.Module, list[int]] = defaultdict(list)

    # A module's count is the counter's growth during its calls; a container that is never
    # called itself (ModuleList, or the detector whose parts count_macs runs) sums its children.
    def before(module: nn.Module, _args) -> None:
        started[module].append(counter.get_total_flops())

    def after(module: nn.Module, _args, _out) -> None:
        spent[module] += counter.get_total_flops() - started[module].pop()

    handles = []
    for module in model.modules():
        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    try:
        count_macs(model, image_size, counter)
    finally:
        for handle in handles:
            handle.remove()

    def macs(module: nn.Module) -> int:
        return spent[module] if module in spent else sum(map(macs, module.children()))

    rows = []
    for name, module in model.named_modules():
        level = name.count(".") + 1 if name else 0
        if level <= depth:
            rows.append({"name": name or type(model).__name__, "depth": level,
                         "type": type(module).__name__, "params": count_params(module),
                         "macs": macs(module) // 2})  # fmt: skip
    return rows


def model_info(
    name: str | Path,
    image_size: Size = 640,
    num_classes: int | None = None,
    depth: int | None = None,
) -> dict:
    """Summary of a model (see :func:`resolve_source`): parameters (total, backbone), GFLOPs
    (multiply-adds) at ``image_size`` (int or (H, W)), the output levels with their strides
    and channels, and with ``depth`` the per-module table of :func:`module_table`."""
    model = resolve_source(name, num_classes)
    backbone = _backbone(model)
    h, w = _hw(image_size)
    info = {
        "model": describe(model).name,
        "source": str(name),
        "image_size": [h, w],
        "num_classes": getattr(model, "num_classes", None),
        "params": count_params(model),
        "backbone_params": count_params(backbone),
        "gflops": round(count_macs(model, (h, w)) / 1e9, 2),
        "levels": [
            {"level": lvl, "name": f"p{lvl}", "stride": 2**lvl, "channels": backbone.out_channels}
            for lvl in backbone.levels
        ],
    }
    if depth is not None:
        info["modules"] = module_table(model, (h, w), depth)
    return info
