"""``spinedet export``: write a detector (or a model's dense part) as ONNX or TorchScript,
checked against PyTorch first."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .types import at_least, score

__all__ = ["add_export_commands"]

SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}
# Formats to nothing; a help text holding it states its own default, and --help then adds no
# "(default: None)" (ArgumentDefaultsHelpFormatter skips texts that mention %(default)).
OWN_DEFAULT = "%(default).0s"


def _default_out(checkpoint: str, fmt: str) -> Path:
    """Beside the weights (``runs/x`` -> ``runs/x/best.onnx``, as the run directory resolves);
    a model name's random weights go to the current directory."""
    from ..models.weights import resolve_checkpoint

    path = Path(checkpoint)
    if path.exists():
        return resolve_checkpoint(path).with_suffix(SUFFIXES[fmt])
    return Path(path.name + SUFFIXES[fmt])


def _cmd_export(args: argparse.Namespace) -> int:
    from ..errors import SpinedetError
    from ..export import export_onnx, export_torchscript

    out = args.out or _default_out(args.checkpoint, args.format)
    other = next((f for f, suffix in SUFFIXES.items()
                  if f != args.format and Path(out).suffix == suffix), None)  # fmt: skip
    if other is not None:  # the other format's name: a runtime would misread the file
        raise SpinedetError(f"--out {out}: a {other} file's name, but --format {args.format}; "
                            f"name it {Path(out).with_suffix(SUFFIXES[args.format])} "
                            f"or use --format {other}")  # fmt: skip
    options = {
        "image_size": args.size, "check": not args.no_check, "check_images": args.check_images,
        "input_dtype": args.input_dtype, "overwrite": args.overwrite,
    }  # fmt: skip
    selection = {"score_threshold": args.score_threshold, "nms_threshold": args.nms_threshold,
                 "max_detections": args.max_detections}  # fmt: skip
    if args.format == "torchscript":
        if args.dense:
            raise SpinedetError("--dense exports to ONNX only: use --format onnx")
        result = export_torchscript(args.checkpoint, out, **options, **selection)
    else:
        result = export_onnx(args.checkpoint, out, dense=args.dense, **options, **selection)
    if "max_abs_diff" in result:  # the dense part
        print(f"exported {result['kind']} at {result['image_size']} px to {result['path']}")
        for name, shape in result["outputs"].items():
            diff = result["max_abs_diff"].get(name)
            checked = f"  max |diff| vs PyTorch {diff:.2e}" if diff is not None else ""
            print(f"  {name}: {tuple(shape)}{checked}")
        if result["max_abs_diff"]:
            print("onnxruntime matches PyTorch")
        return 0
    print(f"exported the whole {result['kind']} detector to {result['path']} ({args.format})")
    kind = "uint8 0..255" if args.input_dtype == "uint8" else "float32 0..1"
    print(f"  images: (N, 3, H, W) RGB {kind}; resize so the longer side is "
          f"{result['image_size']}")  # fmt: skip
    for name, what in result["outputs"].items():
        print(f"  {name}: {what}")
    if args.format == "torchscript":  # torch.jit.load alone fails: torchvision::nms unknown
        print("  load: import torchvision (its NMS and RoIAlign ops), then torch.jit.load; "
              "spinedet is not needed")  # fmt: skip
    stats = result["check"]
    if stats:
        runtime = "onnxruntime" if args.format == "onnx" else "TorchScript"
        sizes = " and ".join(f"{h}x{w}" for h, w in stats["sizes"])
        masks = f", min mask IoU {stats['mask_iou']:.3f}" if "masks" in result["outputs"] else ""
        print(f"{runtime} matches PyTorch on {stats['images']} images (batches of 2, {sizes}): "
              f"{stats['detections']} detections, max box diff {stats['box']:.1e} px, "
              f"max score diff {stats['score']:.1e}{masks}")  # fmt: skip
        if not stats["detections"]:  # agreeing on nothing shows nothing
            print("  warning: the check compared no detections: the model found nothing above "
                  "its score threshold on the check images; give --check-images with objects it "
                  "finds", file=sys.stderr)  # fmt: skip
    return 0


def add_export_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``export`` on the ``spinedet`` command line's sub-parsers."""
    p = subparsers.add_parser(
        "export",
        help="export a detector, post-processing included, to ONNX or TorchScript",
        description="Export the whole detector (images in; boxes, scores, category ids, "
        "detection counts and Mask R-CNN masks out; any batch and image size) to ONNX or "
        "TorchScript, with the class names and categories as metadata. The export is checked "
        "against PyTorch on real images (two sizes, batches of 2) and written only if they "
        "agree. --dense exports only the fixed-size part to ONNX (backbones and classifiers "
        "always export that way).",
    )
    p.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="a spinedet .safetensors file, a run directory (its best.safetensors, else "
        "last.safetensors), or a model name (random weights)",
    )
    p.add_argument("--format", choices=sorted(SUFFIXES), default="onnx", help="export format")
    p.add_argument(
        "--out",
        help=f"output file (default{OWN_DEFAULT}: beside the weights, e.g. RUN/best.onnx, or "
        "RUN/best.pt for TorchScript; a model name's in the current directory)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument(
        "--size",
        type=at_least(32),
        default=None,
        help="the model's input size: the longer side of the check images, the square size "
        f"of --dense (default{OWN_DEFAULT}: the size the model was built for)",
    )
    p.add_argument(
        "--input-dtype",
        choices=["uint8", "float32"],
        default="uint8",
        help="input images: uint8 0..255 or float32 0..1",
    )
    p.add_argument(
        "--check-images",
        nargs="+",
        metavar="IMAGE",
        help=f"images for the check against PyTorch (default{OWN_DEFAULT}: two synthetic "
        "shapes images)",
    )
    p.add_argument(
        "--dense",
        action="store_true",
        help="export only the fixed-size part (backbone and dense heads, square input, no "
        "decoding or NMS), as before",
    )
    p.add_argument(
        "--score-threshold",
        type=score,
        default=None,
        help=f"keep detections above (default{OWN_DEFAULT}: the model's own, torchvision's 0.05)",
    )
    p.add_argument(
        "--nms-threshold",
        type=score,
        default=None,
        help="IoU above which a detection suppresses a lower-scoring one of its class "
        f"(default{OWN_DEFAULT}: the model's own, torchvision's 0.5)",
    )
    p.add_argument(
        "--max-detections",
        type=at_least(1),
        default=None,
        help="detections per image, the rows of each image's outputs (default"
        f"{OWN_DEFAULT}: the model's own, torchvision's 300 for a RetinaNet, 100 for an R-CNN)",
    )
    p.add_argument("--no-check", action="store_true", help="skip the comparison with PyTorch")
    p.set_defaults(func=_cmd_export)
