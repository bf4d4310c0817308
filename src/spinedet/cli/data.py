"""``spinedet data``: check, split and generate datasets."""

from __future__ import annotations

import argparse
from pathlib import Path

from spinedet.data.check import errors, format_report, inspect_dataset
from spinedet.data.errors import DataError
from spinedet.data.shapes import MAX_INSTANCES, make_shape_classes, make_shapes
from spinedet.data.split import split_parts, split_table, write_split

from .types import at_least


def _size(text: str) -> int | tuple[int, int]:
    """``160`` for a square or ``WIDTHxHEIGHT``."""
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected SIZE or WIDTHxHEIGHT, got {text!r}")
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def _check(args: argparse.Namespace) -> int:
    problems, table = inspect_dataset(args.annotations, args.images, full=args.full,
                                      workers=args.workers, masks=args.masks or None)  # fmt: skip
    if table:
        print(table)
    print(format_report(problems))
    return 1 if errors(problems) else 0  # warnings alone pass


def _split(args: argparse.Namespace) -> int:
    parts = split_parts(args.annotations, args.ratios, args.seed, args.names)
    paths = write_split(parts, args.out, args.annotations, args.overwrite)
    for name, path in paths.items():
        print(f"{name}: {path}")
    print(split_table(parts))
    return 0


def _show(args: argparse.Namespace) -> int:
    from spinedet.config import load_config
    from spinedet.data.show import show_dataset

    config = load_config(args.config, args.set) if args.augmented else None
    written = show_dataset(args.annotations, args.images, args.out, num=args.num,
                           image_ids=args.ids, augmented=args.augmented, config=config,
                           seed=args.seed, overwrite=args.overwrite)  # fmt: skip
    print(f"drew {len(written)} image(s) into {args.out}")
    return 0


def _shapes(args: argparse.Namespace) -> int:
    if args.classification:  # an ImageFolder tree, one shape per image
        paths = make_shape_classes(args.out, args.num_images, args.size, args.seed,
                                   args.splits or (0.8, 0.1, 0.1),
                                   class_colours=args.class_colours)  # fmt: skip
    elif args.class_colours:
        raise DataError("--class-colours applies with --classification")
    else:
        paths = make_shapes(args.out, num_images=args.num_images, size=args.size,
                            seed=args.seed, splits=args.splits,
                            max_instances=args.max_instances,
                            overwrite=args.overwrite)  # fmt: skip
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def add_data_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``data {check,split,show,shapes}``; each sets ``func(args) -> exit code``."""
    data = subparsers.add_parser("data", help="check, split, draw or generate COCO datasets")
    commands = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)

    check = commands.add_parser("check", help="report every problem in a COCO dataset")
    check.add_argument("annotations", type=Path, help="COCO json file")
    check.add_argument("--images", type=Path, required=True, help="image directory")
    check.add_argument("--full", action="store_true", help="decode every image completely")
    check.add_argument("--workers", type=at_least(1), default=8, help="threads reading images")
    check.add_argument("--masks", action="store_true",
                       help="for a Mask R-CNN: annotations without segmentation are errors, not "
                       "warnings")  # fmt: skip
    check.set_defaults(func=_check, uses_torch=False)

    split = commands.add_parser("split", help="split into image-disjoint, class-balanced parts")
    split.add_argument("annotations", type=Path, help="COCO json file")
    split.add_argument("--ratios", type=float, nargs="+", default=[0.8, 0.1, 0.1],
                       help="shares of the images per part, scaled to sum to 1 (8 1 1 = 0.8 0.1 "
                       "0.1)")  # fmt: skip
    split.add_argument("--names", nargs="+", help="part names (default: train val [test])")
    split.add_argument("--seed", type=int, default=0, help="seed of the random assignment")
    split.add_argument("--out", type=Path, required=True, help="directory for <name>.json")
    split.add_argument("--overwrite", action="store_true", help="replace existing split files")
    split.set_defaults(func=_split, uses_torch=False)

    show = commands.add_parser(
        "show", help="draw the ground truth (and its training augmentation) over the images"
    )
    show.add_argument("annotations", type=Path, help="COCO json file")
    show.add_argument("--images", type=Path, required=True, help="image directory")
    show.add_argument("--out", type=Path, required=True, help="directory for the drawings")
    show.add_argument("--num", type=at_least(1), default=16, help="images drawn, picked at random")
    show.add_argument("--ids", nargs="+", help="draw these image ids instead")
    show.add_argument("--augmented", type=at_least(0), default=0, metavar="K",
                      help="also draw K training augmentations of each image")  # fmt: skip
    show.add_argument("--config", default="quickstart",
                      help="config or recipe whose augmentation --augmented draws")  # fmt: skip
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config value, e.g. data.hflip=0")  # fmt: skip
    show.add_argument("--seed", type=int, default=0, help="seed of the picks and augmentations")
    show.add_argument("--overwrite", action="store_true", help="replace existing drawings")
    show.set_defaults(func=_show)

    shapes = commands.add_parser("shapes", help="generate the synthetic shapes dataset")
    shapes.add_argument("--out", type=Path, required=True, help="directory for images and json")
    shapes.add_argument("--num-images", type=int, default=500, help="number of images")
    shapes.add_argument("--size", type=_size, default=160, help="SIZE or WIDTHxHEIGHT")
    shapes.add_argument("--seed", type=int, default=0, help="seed of the generator")
    shapes.add_argument("--overwrite", action="store_true",
                        help="replace a data set already in --out (detection shapes)")  # fmt: skip
    shapes.add_argument("--splits", type=float, nargs="+", help="also split, e.g. 0.8 0.1 0.1")
    shapes.add_argument(
        "--max-instances",
        type=int,
        default=MAX_INSTANCES,
        help="at most this many shapes per image (default: %(default)s)",
    )
    shapes.add_argument("--classification", action="store_true",
                        help="one shape per image, as an ImageFolder tree OUT/{train,val,test}/"
                        "<class>/ (splits 0.8 0.1 0.1 unless --splits)")  # fmt: skip
    shapes.add_argument("--class-colours", action="store_true",
                        help="with --classification: each class in its own hue, an easy "
                        "set (the colour tells the class) for a quick check that training "
                        "works")  # fmt: skip
    shapes.set_defaults(func=_shapes, uses_torch=False)
    return data
