"""``spinedet convert-tf``: a Model Garden or tensorflow/tpu checkpoint to a spinedet
safetensors file."""

from __future__ import annotations

import argparse


def _cmd_convert_tf(args: argparse.Namespace) -> int:
    from ..convert import convert_tf

    summary = convert_tf(
        args.checkpoint,
        args.model,
        args.out,
        args.num_classes,
        args.activation,
        args.categories,
        overwrite=args.overwrite,
    )
    print(summary)
    return 0


def add_convert_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``convert-tf`` on the ``spinedet`` command line."""
    p = subparsers.add_parser(
        "convert-tf",
        help="convert a TensorFlow SpineNet checkpoint (Model Garden, tensorflow/tpu) to "
        "safetensors",
        description="Read, without TensorFlow, a Model Garden (TF2) checkpoint of a SpineNet or "
        "SpineNet-Mobile backbone, RetinaNet, Faster R-CNN or Mask R-CNN, or a tensorflow/tpu "
        "(TF1) checkpoint of a SpineNet classifier, RetinaNet or Mask R-CNN (backbone, RPN, box "
        "and mask heads). "
        "Give a checkpoint prefix (ckpt-N, model.ckpt-N), one of its files, or its directory.",
    )
    p.add_argument("checkpoint", help="ckpt-N prefix, one of its files, or its directory")
    p.add_argument(
        "--model",
        required=True,
        help="spinedet model name, e.g. spinenet49_retinanet or spinenet49_classifier",
    )
    p.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="classes incl. background, checked against the checkpoint (read from it anyway)",
    )
    p.add_argument(
        "--activation",
        choices=["relu", "swish"],
        default=None,
        help="activation the checkpoint was trained with (checkpoints do not record it); "
        "read from the run's params.yaml when one lies beside the checkpoint, else required",
    )
    p.add_argument(
        "--categories",
        default=None,
        help="COCO json whose categories name the checkpoint's classes (class k = id k), "
        "e.g. instances_val2017.json",
    )
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=_cmd_convert_tf)
