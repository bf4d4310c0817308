"""``spinedet convert-tf``: a Model Garden checkpoint to a spinedet safetensors file."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..models.registry import create_model, model_task
from ..models.weights import save_weights
from .tf_checkpoint import TFCheckpoint
from .tf_mapping import ConversionError, convert_checkpoint, find_backbone

__all__ = ["add_convert_commands", "convert_tf"]


def _num_classes(ckpt: TFCheckpoint) -> int:
    """Classes of a RetinaNet checkpoint: classifier channels / 9 anchors."""
    root = ckpt.child(ckpt.root, "model") or ckpt.root
    classifier = ckpt.child(root, "_head", "_classifier", "kernel")
    if classifier is None or classifier.tensor is None:
        raise ConversionError(f"{ckpt.prefix} holds no RetinaNet classifier (model/_head)")
    return ckpt.shape(classifier.tensor)[-1] // 9


def convert_tf(
    checkpoint: str | Path,
    model_name: str,
    out: str | Path,
    num_classes: int | None = None,
    activation: str = "relu",
) -> str:
    """Convert a Model Garden checkpoint for ``model_name`` and save it to ``out``.

    Two-stage detectors get their backbone only (Model Garden's R-CNN heads differ from
    torchvision's); the file then loads into the detector's backbone. Returns a summary.
    """
    ckpt = TFCheckpoint(checkpoint)
    find_backbone(ckpt)  # fail early, before building a model
    task = model_task(model_name)
    name = model_name.lower()
    if task is None:
        if num_classes is not None:
            raise ConversionError(f"{model_name} is a backbone: --num-classes does not apply")
        model = create_model(name, activation=activation)
    elif task == "retinanet":
        model = create_model(name, num_classes or _num_classes(ckpt), activation=activation)
    else:
        name = name.split("_")[0]
        model = create_model(name, activation=activation)
    state = convert_checkpoint(ckpt, model)
    model.load_state_dict(state, strict=False)  # completeness was checked; BN counters stay
    save_weights(model, out, {"converted_from": str(ckpt.prefix)})
    summary = f"{ckpt.prefix} -> {out}: {name}, {len(state)} tensors"
    if name != model_name.lower():
        summary += (
            f" (backbone only: Model Garden's {task} heads differ from spinedet's; "
            f"create_model({model_name.lower()!r}, weights=...) loads it into the backbone)"
        )
    return summary


def _cmd_convert_tf(args: argparse.Namespace) -> int:
    print(convert_tf(args.checkpoint, args.model, args.out, args.num_classes, args.activation))
    return 0


def add_convert_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``convert-tf`` on the ``spinedet`` command line."""
    p = subparsers.add_parser(
        "convert-tf",
        help="convert a TensorFlow Model Garden SpineNet checkpoint to safetensors",
        description="Read a Model Garden checkpoint (a ckpt-N prefix or its directory) of a "
        "SpineNet backbone, RetinaNet or Mask R-CNN, without TensorFlow.",
    )
    p.add_argument("checkpoint", help="ckpt-N prefix, one of its files, or its directory")
    p.add_argument("--model", required=True, help="spinedet model name, e.g. spinenet49_retinanet")
    p.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="RetinaNet classes incl. background (default: read from the checkpoint)",
    )
    p.add_argument(
        "--activation",
        choices=["relu", "swish"],
        default="relu",
        help="activation the checkpoint was trained with (checkpoints do not record it)",
    )
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.set_defaults(func=_cmd_convert_tf)
