"""A Model Garden checkpoint to a spinedet safetensors file (``spinedet convert-tf``)."""

from __future__ import annotations

from pathlib import Path

from ..data.coco import read_json
from ..data.errors import DataError
from ..models.registry import create_model, model_task
from ..models.weights import save_weights
from .tf_checkpoint import TFCheckpoint
from .tf_mapping import ConversionError, convert_checkpoint, find_backbone, model_node

__all__ = ["convert_tf"]


def _shape(ckpt: TFCheckpoint, *path: str) -> tuple[int, ...]:
    node = ckpt.child(model_node(ckpt), *path)
    if node is None or node.tensor is None:
        raise ConversionError(f"{ckpt.prefix} holds no {'/'.join(path)}")
    return ckpt.shape(node.tensor)


def _retinanet_options(ckpt: TFCheckpoint) -> dict:
    """Classes (classifier channels / 9 anchors) and tower depth of a RetinaNet checkpoint."""
    convs = ckpt.child(model_node(ckpt), "_head", "_cls_convs")
    return {
        "num_classes": _shape(ckpt, "_head", "_classifier", "kernel")[-1] // 9,
        "head_depth": len(convs.children) if convs is not None else None,
    }


def _rcnn_options(ckpt: TFCheckpoint) -> dict:
    """Head sizes of a Model Garden Faster/Mask R-CNN checkpoint, read from its shapes."""
    rpn = ckpt.child(model_node(ckpt), "rpn_head", "_convs")
    if rpn is None:
        raise ConversionError(f"{ckpt.prefix} holds no R-CNN heads (model/rpn_head)")
    return {
        "num_classes": _shape(ckpt, "detection_head", "0", "_classifier", "kernel")[-1],
        "head_channels": _shape(ckpt, "rpn_head", "_convs", "0", "kernel")[-1],
        "rpn_depth": len(rpn.children),
        "rpn_scales": _shape(ckpt, "rpn_head", "_classifier", "kernel")[-1] // 3,
        "fc_dim": _shape(ckpt, "detection_head", "0", "_fcs", "0", "kernel")[-1],
    }


def _categories(path: str | Path, num_classes: int) -> list[dict]:
    """Categories ``1 .. num_classes - 1`` named from a COCO json's ``categories`` (Model
    Garden's class index is the category id); ids the file lacks are named ``unused_<id>``."""
    data = read_json(path)
    try:
        names = {int(c["id"]): str(c["name"]) for c in data["categories"]}
    except (TypeError, KeyError, ValueError) as e:
        raise DataError("no valid 'categories' list of {id, name} entries", path) from e
    beyond = sorted(k for k in names if not 0 < k < num_classes)
    if beyond:
        raise DataError(
            f"category ids {beyond[:5]} are outside the checkpoint's classes 1..{num_classes - 1}",
            path,
        )
    return [{"id": k, "name": names.get(k, f"unused_{k}")} for k in range(1, num_classes)]


def convert_tf(
    checkpoint: str | Path,
    model_name: str,
    out: str | Path,
    num_classes: int | None = None,
    activation: str = "relu",
    categories: str | Path | None = None,
    **model_kwargs,
) -> str:
    """Convert a Model Garden checkpoint for ``model_name`` and save it to ``out``.

    Detector head sizes (classes, R-CNN head widths, RPN convs and anchor scales) are read
    from the checkpoint and recorded in the file, so :func:`~spinedet.load_model` rebuilds the
    same model. Model Garden's class ``k`` is category id ``k`` of its COCO json; given that
    json as ``categories``, the file records their names (else the names are ``"1"``, ...).
    ``model_kwargs`` are further builder options (e.g. ``filter_scale`` for a checkpoint of a
    custom scaling). Returns a summary.
    """
    ckpt = TFCheckpoint(checkpoint)
    find_backbone(ckpt)  # fail early, before building a model
    task = model_task(model_name)
    name = model_name.lower()
    options: dict = {}
    if task is None:
        if num_classes is not None:
            raise ConversionError(f"{model_name} is a backbone: --num-classes does not apply")
    else:
        options = _retinanet_options(ckpt) if task == "retinanet" else _rcnn_options(ckpt)
        if num_classes is not None and num_classes != options["num_classes"]:
            raise ConversionError(
                f"{ckpt.prefix} has {options['num_classes']} classes (with background), "
                f"not {num_classes}: convert as is, then fine-tune with your classes"
            )
    metadata: dict = {"converted_from": str(ckpt.prefix)}
    if categories is not None:
        if task is None:
            raise ConversionError(f"{model_name} is a backbone: --categories does not apply")
        options["categories"] = _categories(categories, options.pop("num_classes"))
    model = create_model(name, activation=activation, **(options | model_kwargs))
    state = convert_checkpoint(ckpt, model)
    model.load_state_dict(state, strict=False)  # completeness was checked; BN counters stay
    save_weights(model, out, metadata)
    shown = ", ".join(f"{k}={v}" for k, v in options.items() if k != "categories")
    return f"{ckpt.prefix} -> {out}: {name}{f' ({shown})' if shown else ''}, {len(state)} tensors"
