"""``spinedet info`` and ``spinedet models``: sizes, multiply-adds and outputs of models."""

from __future__ import annotations

import argparse
import json

from ..errors import SpinedetError
from .types import at_least


def _info(args: argparse.Namespace) -> int:
    from ..info import model_info

    if len(args.size) > 2:
        raise SpinedetError(f"--size {' '.join(map(str, args.size))}: give one int or H W")
    size = args.size[0] if len(args.size) == 1 else tuple(args.size)
    info = model_info(args.name, size, args.num_classes, args.depth)
    if args.json:
        print(json.dumps(info))
        return 0
    h, w = info["image_size"]
    print(f"{info['model']} ({info['source']}) at {h} x {w}")
    if info["num_classes"] is not None:
        print(f"  classes (incl. background): {info['num_classes']}")
    print(f"  parameters: {info['params']:,} (backbone {info['backbone_params']:,})")
    print(f"  multiply-adds: {info['gflops']:.2f} G")
    for lvl in info["levels"]:
        print(f"  {lvl['name']}: stride {lvl['stride']:>3}, {lvl['channels']} channels")
    if "modules" in info:
        width = max(len("  " * r["depth"] + r["name"]) for r in info["modules"])
        print(f"\n{'module':<{width}}  {'type':<24} {'params':>12} {'mult-adds':>16}")
        for r in info["modules"]:
            name = "  " * r["depth"] + r["name"]
            print(f"{name:<{width}}  {r['type']:<24} {r['params']:>12,} {r['macs']:>16,}")
    return 0


def _models(args: argparse.Namespace) -> int:
    from ..info import model_info
    from ..models import list_models

    names = list_models(args.filter)
    print(f"| model | params | backbone params | GFLOPs @ {args.size} |")
    print("|---|---:|---:|---:|")
    for name in names:
        info = model_info(name, args.size)
        print(f"| {name} | {info['params']:,} | {info['backbone_params']:,} | {info['gflops']} |")
    return 0


def add_info_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameters, FLOPs and outputs of a model")
    p.add_argument(
        "name",
        help="a model name (e.g. spinenet49s_maskrcnn, see `spinedet models`), "
        "a .safetensors file, a run directory, or a config file or recipe name",
    )
    p.add_argument("--size", type=at_least(32), nargs="+", default=[640], metavar=("H", "W"),
                   help="input size for FLOPs: one int (square) or H W")  # fmt: skip
    p.add_argument(
        "--depth",
        type=at_least(0),
        default=None,
        help="also print parameters and multiply-adds per module down to this depth",
    )
    p.add_argument("--num-classes", type=int, default=None, help="classes incl. background")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_info)

    p = sub.add_parser("models", help="markdown table of every registered model")
    p.add_argument("--size", type=at_least(32), default=640, help="square input size for FLOPs")
    p.add_argument("--filter", default="", help="only names containing this text")
    p.set_defaults(func=_models)
