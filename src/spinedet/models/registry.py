"""Model registry: ``create_model("spinenet49s_maskrcnn", num_classes=...)`` and friends."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable
from pathlib import Path

from torch import nn

from .detectors import spinenet_fasterrcnn, spinenet_maskrcnn, spinenet_retinanet
from .specs import MOBILE_SCALING, SCALING
from .spinenet import spinenet
from .spinenet_mobile import spinenet_mobile

__all__ = ["create_model", "list_models", "load_model", "model_task"]

log = logging.getLogger(__name__)

_DETECTORS: dict[str, Callable[..., nn.Module]] = {
    "retinanet": spinenet_retinanet,
    "fasterrcnn": spinenet_fasterrcnn,
    "maskrcnn": spinenet_maskrcnn,
}

_REGISTRY: dict[str, tuple[str, str | None]] = {}
for _variant in SCALING:
    _REGISTRY[f"spinenet{_variant}"] = (_variant, None)
    for _task in _DETECTORS:
        _REGISTRY[f"spinenet{_variant}_{_task}"] = (_variant, _task)
# SpineNet-Mobile: backbones and RetinaNet only (Model Garden trains no mobile R-CNNs).
for _variant in MOBILE_SCALING:
    _REGISTRY[f"spinenet_mobile{_variant}"] = (f"mobile{_variant}", None)
    _REGISTRY[f"spinenet_mobile{_variant}_retinanet"] = (f"mobile{_variant}", "retinanet")


def list_models(pattern: str = "") -> list[str]:
    """Names accepted by :func:`create_model`, optionally only those containing ``pattern``."""
    return [name for name in _REGISTRY if pattern in name]


def _lookup(name: str) -> tuple[str, str | None]:
    key = name.lower()
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list(_REGISTRY), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown model {name!r}{hint} (see spinedet.list_models() for all {len(_REGISTRY)})"
        )
    return _REGISTRY[key]


def model_task(name: str) -> str | None:
    """``"retinanet"``, ``"fasterrcnn"``, ``"maskrcnn"`` or None (a bare backbone)."""
    return _lookup(name)[1]


def create_model(
    name: str,
    num_classes: int | None = None,
    *,
    weights: str | Path | None = None,
    **kwargs,
) -> nn.Module:
    """Build a registered model by name.

    Args:
        name: ``spinenet{49s,49,96,143,190}`` for a backbone, or with a ``_retinanet``,
            ``_fasterrcnn`` or ``_maskrcnn`` suffix for a detector;
            ``spinenet_mobile{49,49s,49xs}`` or with a ``_retinanet`` suffix for SpineNet-Mobile.
        num_classes: detector classes including background (default 91, COCO); inferred from
            ``class_names=`` when that is given. Not accepted for backbones.
        weights: a ``.safetensors`` file written by spinedet (training, ``convert-tf``).
        **kwargs: builder options, e.g. ``image_size=512``, ``activation="swish"``,
            ``norm="syncbn"`` or custom ``block_specs`` and scaling values.

    Example:
        >>> model = create_model("spinenet49s_maskrcnn", class_names=["cat", "dog"])
    """
    variant, task = _lookup(name)
    if task is None:
        if num_classes is not None:
            raise ValueError(f"{name} is a backbone: num_classes applies to detectors only")
        if variant.startswith("mobile"):
            model = spinenet_mobile(variant.removeprefix("mobile"), **kwargs)
        else:
            model = spinenet(variant, **kwargs)
    else:
        if num_classes is None and "class_names" not in kwargs:
            num_classes = 91
        model = _DETECTORS[task](variant, num_classes, **kwargs)
    model.model_name = name.lower()
    # What rebuilds this model from a weights file (see load_model); class names travel apart.
    model.model_kwargs = {k: v for k, v in kwargs.items() if k != "class_names"}
    if weights is not None:
        from .weights import load_weights

        load_weights(model, weights)
    return model


def load_model(path: str | Path, **overrides) -> nn.Module:
    """Rebuild the model a spinedet ``.safetensors`` file was saved from and load its weights.

    ``overrides`` replace builder options, e.g. ``box_score_thresh=0.3`` for prediction.
    """
    from .weights import WeightsError, read_metadata

    meta = read_metadata(path)
    if not meta.get("model_name"):
        raise WeightsError(
            f"{path}: no spinedet model name in the file; use create_model(NAME, weights=...)"
        )
    kwargs = {**meta.get("model_kwargs", {}), **overrides}
    if model_task(meta["model_name"]) is not None:
        kwargs["class_names"] = meta["class_names"]
    return create_model(meta["model_name"], weights=path, **kwargs)
