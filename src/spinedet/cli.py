"""The ``spinedet`` command line: one entry point, a sub-command per job."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from .models import list_models


def _cmd_info(args: argparse.Namespace) -> int:
    from .info import model_info

    info = model_info(args.name, args.size, args.num_classes)
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{info['model']} at {info['image_size']} x {info['image_size']}")
    if info["num_classes"] is not None:
        print(f"  classes (incl. background): {info['num_classes']}")
    print(f"  parameters: {info['params']:,} (backbone {info['backbone_params']:,})")
    print(f"  multiply-adds: {info['gflops']:.2f} G")
    for lvl in info["levels"]:
        print(f"  {lvl['name']}: stride {lvl['stride']:>3}, {lvl['channels']} channels")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from .info import model_info

    names = list_models(args.filter)
    print(f"| model | params | backbone params | GFLOPs @ {args.size} |")
    print("|---|---:|---:|---:|")
    for name in names:
        info = model_info(name, args.size)
        print(f"| {name} | {info['params']:,} | {info['backbone_params']:,} | {info['gflops']} |")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spinedet", description="SpineNet detectors: train, evaluate, predict, export."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="parameters, FLOPs and outputs of a model")
    p.add_argument("name", help="a model name, e.g. spinenet49s_maskrcnn (see `spinedet models`)")
    p.add_argument("--size", type=int, default=640, help="square input size for FLOPs")
    p.add_argument("--num-classes", type=int, default=None, help="classes incl. background")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("models", help="markdown table of every registered model")
    p.add_argument("--size", type=int, default=640, help="square input size for FLOPs")
    p.add_argument("--filter", default="", help="only names containing this text")
    p.set_defaults(func=_cmd_models)

    from .convert.commands import add_convert_commands
    from .data.commands import add_data_commands
    from .engine.commands import add_engine_commands
    from .export_commands import add_export_commands

    add_data_commands(sub)
    add_engine_commands(sub)
    add_convert_commands(sub)
    add_export_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        # User-facing problems (bad names, files, data) get one line; SPINEDET_DEBUG=1 shows all.
        if os.environ.get("SPINEDET_DEBUG"):
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"spinedet: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"spinedet: {e or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
