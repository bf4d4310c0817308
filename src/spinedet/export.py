"""ONNX export of a model's dense part, checked against PyTorch with onnxruntime.

What is exported, for an ``(N, 3, S, S)`` float input:

- a backbone: the input is used as given (already normalised); outputs ``p3``..``p7``.
- a classifier: the same input; outputs ``logits`` (N, classes).
- RetinaNet: the input is an RGB image in [0, 1] resized and padded to ``S x S``; the graph
  normalises it like the model's transform and returns ``cls_logits`` (N, A, classes) and
  ``bbox_regression`` (N, A, 4) over all A anchors of all levels, plus the constant ``anchors``
  (A, 4, xyxy pixels) they refer to.
- Faster / Mask R-CNN: the same input; outputs ``p3``..``p7``, the RPN's ``objectness``
  (N, A, 1) and ``rpn_bbox_regression`` (N, A, 4), and ``anchors``.

Decoding (torchvision's ``BoxCoder`` with weights (1, 1, 1, 1)), score thresholds, NMS, and
the second stage of the R-CNNs are left to the caller: they are data-dependent and are better
done by the serving code.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import concat_box_prediction_layers

from .errors import SpinedetError
from .models import create_model, describe, load_model
from .models.weights import atomic_write, resolve_checkpoint

__all__ = ["DenseOutputs", "ExportError", "export_onnx", "resolve_model"]

TOLERANCE = 1e-4


class ExportError(SpinedetError):
    """The export failed or the exported model does not match PyTorch."""


class DenseOutputs(nn.Module):
    """A model's fixed-shape part (normalisation, backbone, dense heads) as one module."""

    def __init__(self, model: nn.Module, image_size: int) -> None:
        super().__init__()
        self.image_size = image_size
        try:
            task = describe(model).task
        except SpinedetError as e:
            raise ExportError(f"cannot export: {e}") from None
        if task in ("backbone", "classifier"):  # the input is used as given (normalised)
            self.kind, self.backbone, self.model = task, getattr(model, "backbone", model), model
            return
        self.backbone = model.backbone
        if task == "retinanet":
            self.kind, self.head, generator = "retinanet", model.head, model.anchor_generator
        else:
            self.kind, self.head, generator = "rcnn", model.rpn.head, model.rpn.anchor_generator
        self.register_buffer("mean", torch.tensor(model.transform.image_mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(model.transform.image_std).view(1, 3, 1, 1))
        self.register_buffer("anchors", _anchors(generator, self.backbone.levels, image_size))

    @property
    def output_names(self) -> list[str]:
        levels = [f"p{lvl}" for lvl in self.backbone.levels]
        if self.kind == "backbone":
            return levels
        if self.kind == "classifier":
            return ["logits"]
        if self.kind == "retinanet":
            return ["cls_logits", "bbox_regression", "anchors"]
        return [*levels, "objectness", "rpn_bbox_regression", "anchors"]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.kind == "backbone":
            return tuple(self.backbone(images).values())
        if self.kind == "classifier":
            return (self.model(images),)
        features = list(self.backbone((images - self.mean) / self.std).values())
        n = images.shape[0]
        if self.kind == "retinanet":
            out = self.head(features)
            return out["cls_logits"], out["bbox_regression"], self.anchors
        objectness, deltas = concat_box_prediction_layers(*self.head(features))
        return *features, objectness.view(n, -1, 1), deltas.view(n, -1, 4), self.anchors


@torch.no_grad()
def _anchors(generator: nn.Module, levels: list[int], image_size: int) -> torch.Tensor:
    """The generator's anchors for one ``image_size`` square image (the same for every image)."""
    sizes = [math.ceil(image_size / 2**lvl) for lvl in levels]
    features = [torch.zeros(1, 1, s, s) for s in sizes]
    images = ImageList(torch.zeros(1, 3, image_size, image_size), [(image_size, image_size)])
    return generator(images, features)[0]


def resolve_model(model_or_path: nn.Module | str | Path, **overrides) -> nn.Module:
    """A model object, a spinedet ``.safetensors`` file or run directory, or a registry name
    (random weights)."""
    if isinstance(model_or_path, nn.Module):
        return model_or_path
    if Path(model_or_path).exists():
        return load_model(resolve_checkpoint(model_or_path), **overrides)
    return create_model(str(model_or_path), **overrides)


def _default_size(model: nn.Module) -> int:
    transform = getattr(model, "transform", None)
    return int(transform.max_size) if transform is not None else 640


def export_onnx(
    model_or_path: nn.Module | str | Path,
    out: str | Path,
    image_size: int | None = None,
    check: bool = True,
    batch_size: int = 1,
) -> dict:
    """Export the dense part of a model (see the module docstring) to ONNX at ``out``.

    With ``check``, onnxruntime runs the file on a random image and every output must be within
    ``1e-4 * max(1, max|output|)`` of PyTorch's (float32 rounding is relative to the outputs'
    scale); otherwise :class:`ExportError` is raised and ``out`` is not written.

    Returns ``{"path", "kind", "image_size", "outputs": {name: shape}, "max_abs_diff":
    {name: diff}}`` (``max_abs_diff`` is empty without ``check``).
    """
    try:
        import onnxruntime  # noqa: F401 - fail before the slow export when it is missing
        import onnxscript  # noqa: F401 - torch's ONNX exporter needs it
    except ImportError as e:
        raise ExportError(f"ONNX export needs onnx, onnxscript and onnxruntime ({e})") from None
    model = resolve_model(model_or_path).eval()
    size = image_size or _default_size(model)
    graph = DenseOutputs(model, size).eval()
    images = torch.rand(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = graph(images)
    result = {
        "path": str(out),
        "kind": graph.kind,
        "image_size": size,
        "outputs": {n: list(t.shape) for n, t in zip(graph.output_names, expected, strict=True)},
        "max_abs_diff": {},
    }

    def write(tmp: str) -> None:
        with torch.no_grad():
            torch.onnx.export(
                graph,
                (images,),
                tmp,
                input_names=["images"],
                output_names=graph.output_names,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        if check:
            result["max_abs_diff"] = _check(tmp, images, graph.output_names, expected)

    atomic_write(out, write)
    return result


def _check(
    path: str, images: torch.Tensor, names: list[str], expected: tuple[torch.Tensor, ...]
) -> dict[str, float]:
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(names, {"images": images.numpy()})
    diffs, failures = {}, []
    for name, ours, theirs in zip(names, expected, got, strict=True):
        ref = ours.numpy()
        if ref.shape != theirs.shape:
            failures.append(f"{name}: shape {theirs.shape}, expected {ref.shape}")
            continue
        diff = float(np.abs(ref - theirs).max()) if ref.size else 0.0
        diffs[name] = diff
        limit = TOLERANCE * max(1.0, float(np.abs(ref).max()) if ref.size else 0.0)
        if not diff <= limit:
            failures.append(f"{name}: max |diff| {diff:.3g} > {limit:.3g}")
    if failures:
        raise ExportError("onnxruntime disagrees with PyTorch: " + "; ".join(failures))
    return diffs
