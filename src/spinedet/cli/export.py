"""``spinedet export``: write a model's dense part as ONNX, checked with onnxruntime."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_export_commands"]


def _cmd_export(args: argparse.Namespace) -> int:
    from ..export import export_onnx

    out = args.out or str(Path(args.checkpoint).with_suffix(".onnx").name)
    result = export_onnx(args.checkpoint, out, image_size=args.size, check=not args.no_check)
    print(f"exported {result['kind']} at {result['image_size']} px to {result['path']}")
    for name, shape in result["outputs"].items():
        diff = result["max_abs_diff"].get(name)
        checked = f"  max |diff| vs PyTorch {diff:.2e}" if diff is not None else ""
        print(f"  {name}: {tuple(shape)}{checked}")
    if result["max_abs_diff"]:
        print("onnxruntime matches PyTorch")
    return 0


def add_export_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``export`` on the ``spinedet`` command line's sub-parsers."""
    p = subparsers.add_parser(
        "export",
        help="export a model to ONNX (backbone and dense heads; decoding and NMS left out)",
    )
    p.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="a spinedet .safetensors file, or a model name (random weights)",
    )
    p.add_argument("--format", choices=["onnx"], default="onnx", help="export format")
    p.add_argument("--out", help="output file (default: CHECKPOINT's name with .onnx)")
    p.add_argument(
        "--size", type=int, default=None, help="square input size (default: the model's)"
    )
    p.add_argument(
        "--no-check", action="store_true", help="skip the onnxruntime comparison with PyTorch"
    )
    p.set_defaults(func=_cmd_export)
