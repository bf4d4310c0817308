"""``spinedet train``, ``eval`` and ``predict``."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .types import at_least, fraction, score


def _train(args: argparse.Namespace) -> int:
    from ..config import ConfigError, load_config
    from ..engine.trainer import train

    config_file = args.config
    if config_file is None:
        if not args.resume:
            raise ConfigError("train: give a config file or recipe (or --resume --out RUN)")
        config_file = Path(args.out) / "config.yaml"
        if not config_file.is_file():
            raise ConfigError(f"{config_file}: no run to resume in {args.out}")
        if not config_file.read_text().strip():  # damaged: the defaults would stand in for it
            raise ConfigError(f"{config_file}: empty; give the run's config: spinedet train "
                              f"CONFIG --resume --out {args.out}")  # fmt: skip
    config = load_config(config_file, args.set)
    result = train(config, args.out, resume=args.resume, device=args.device)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {result['step']} steps; run directory {result['out']}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from ..engine.api import evaluate
    from ..engine.classification import format_classification
    from ..engine.evaluate import format_metrics

    metrics = evaluate(args.checkpoint, args.annotations, args.images, args.out,
                       args.batch_size, args.device, args.workers,
                       optimize=not args.no_optimize, by_order=args.by_order,
                       overwrite=args.overwrite, confusion_score=args.confusion_score,
                       image_size=args.image_size, tile=args.tile,
                       tile_overlap=args.tile_overlap, tile_whole=args.tile_whole)  # fmt: skip
    if int(os.environ.get("RANK", "0")) == 0:
        classifier = "top1" in metrics
        print(format_classification(metrics) if classifier else format_metrics(metrics))
        if args.out:
            rest = "" if classifier else ", results.json and the analysis"
            print(f"wrote {Path(args.out) / 'metrics.json'}{rest}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from ..engine.api import predict

    report = predict(args.checkpoint, args.inputs, args.out, args.score_threshold, args.device,
                     batch_size=args.batch_size, every=args.every, draw=not args.no_draw,
                     save_masks=args.save_masks, annotations=args.annotations,
                     overwrite=args.overwrite, optimize=not args.no_optimize,
                     top_k=args.top_k, max_detections=args.max_detections,
                     classes=args.classes, nms_threshold=args.nms_threshold,
                     image_size=args.image_size, tile=args.tile,
                     tile_overlap=args.tile_overlap, tile_whole=args.tile_whole)  # fmt: skip
    records = [json.loads(line) for line in open(report.path.with_suffix(".jsonl"))]
    if records and records[0]["detections"] and "bbox" not in records[0]["detections"][0]:
        for record in records:  # a classifier: its top-k classes per image
            top = ", ".join(f"{e['category_name']} {e['score']:.3f}" for e in record["detections"])
            print(f"{record['name']}: {top}")
        print(f"{report.images} image(s): wrote {report.path}")
        return 0
    drawn = "drawings and " if not args.no_draw else ""
    print(f"{report.images} image(s), {report.detections} detection(s): wrote {drawn}{report.path}")
    return 0


def add_engine_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a detector from a YAML config")
    p.add_argument("config", nargs="?", default=None,
                   help="config file or shipped recipe name (e.g. quickstart); with --resume "
                   "and no config, the run's own config.yaml")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.epochs=12")  # fmt: skip
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (--set train.epochs=N extends it)")  # fmt: skip
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    # Before train() (loading torch, the config): train() says what a later stop leaves.
    p.set_defaults(func=_train, stopped="stopped before training began; nothing was written")

    p = sub.add_parser("eval", help="COCO AP (or a classifier's accuracy), overall and per class")
    p.add_argument("checkpoint", help=".safetensors file or run directory")
    p.add_argument("--annotations", default=None, help="COCO json (detectors)")
    p.add_argument("--images", required=True,
                   help="image directory; for a classifier an ImageFolder root")  # fmt: skip
    p.add_argument(
        "--out",
        default=None,
        help="write metrics.json, results.json, PR curves, confusion matrix and per_class.csv",
    )
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier evaluation's files in --out")  # fmt: skip
    p.add_argument("--confusion-score", type=score, default=0.5,
                   help="the confusion matrix counts detections scoring this or more")  # fmt: skip
    p.add_argument("--batch-size", type=at_least(1), default=2,
                   help="images (or tiles) per forward pass")  # fmt: skip
    p.add_argument("--workers", type=at_least(0), default=None,
                   help="data loading processes (default: on a CPU none up to 4 cores, else 2; "
                   "on a GPU one per spare core, up to 8)")  # fmt: skip
    p.add_argument("--by-order", action="store_true",
                   help="classifiers: the sorted class folders are the model's classes in order, "
                   "whatever their names (ImageNet's synset folders for a converted zoo "
                   "classifier)")  # fmt: skip
    _inference_options(p)
    p.set_defaults(func=_eval)

    p = sub.add_parser(
        "predict",
        help="draw detections over images and videos, write COCO-style JSON",
        description="Predict on images, directories (recursive), globs and videos. Writes "
        "predictions.jsonl as it goes and predictions.json at the end; unreadable inputs are "
        "skipped and listed at the end (exit 2). Existing files are never replaced without "
        "--overwrite, and a folder inside an input directory is never read back.",
    )
    p.add_argument("checkpoint", help=".safetensors file or run directory")
    p.add_argument("inputs", nargs="+", help="image or video files, directories or globs")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--score-threshold", type=score, default=0.5, help="keep detections above")
    p.add_argument("--classes", action="append", default=None, metavar="NAMES",
                   help="keep only these categories, names or ids, comma-separated (e.g. "
                   "person,car or 1,3; repeatable; a value that is one category's whole name "
                   "is that category, commas and all), before --max-detections takes the "
                   "best")  # fmt: skip
    p.add_argument("--max-detections", type=at_least(1), default=None,
                   help="keep at most this many detections per image, the best (default: the "
                   "model's own cap, as torchvision's 300 for a RetinaNet and 100 for an "
                   "R-CNN unless built otherwise)")  # fmt: skip
    p.add_argument("--nms-threshold", type=score, default=None,
                   help="IoU above which a detection suppresses a lower-scoring one of its class "
                   "(default: the model's own, torchvision's 0.5)")  # fmt: skip
    p.add_argument("--batch-size", type=at_least(1), default=4,
                   help="images (or tiles) per forward pass")  # fmt: skip
    p.add_argument("--every", type=at_least(1), default=1, help="every N-th frame of a video")
    p.add_argument("--no-draw", action="store_true", help="write JSON only, no drawings")
    p.add_argument("--save-masks", choices=["instance", "image"], default=None,
                   help="write masks as PNGs under OUT/masks: one per instance (0/255), "
                   "or one per image (pixel i = instance i, 0 = none)")  # fmt: skip
    p.add_argument("--annotations", default=None,
                   help="COCO json whose image ids go into the JSON, matched by the end of "
                   "each file's path, else by a base name only one of its images has; other "
                   "images are numbered above its ids (otherwise all in order from 0)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--top-k", type=at_least(1), default=None,
                   help="classifiers: how many of the most probable classes are printed and "
                   "written per image (default 5)")  # fmt: skip
    _inference_options(p)
    p.set_defaults(func=_predict)


def _inference_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--image-size", type=at_least(32), default=None,
                   help="run the model at this size instead of the one it was trained at (a "
                   "detector's long side, a classifier's crop)")  # fmt: skip
    p.add_argument("--tile", type=at_least(32), default=None, metavar="PIXELS",
                   help="detect in overlapping tiles of this size of each larger image, at its "
                   "own resolution (small objects in large photos; detectors)")  # fmt: skip
    p.add_argument("--tile-overlap", type=fraction, default=None,
                   help="with --tile, how much neighbouring tiles overlap, a fraction of a tile "
                   "(default 0.2)")  # fmt: skip
    p.add_argument("--tile-whole", action="store_true",
                   help="with --tile, also detect in the whole image resized to the model's size "
                   "(objects larger than a tile)")  # fmt: skip
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    p.add_argument("--no-optimize", action="store_true",
                   help="run the plain model instead of the optimised one "
                   "(BatchNorm folded, channels-last, oneDNN on CPU, bfloat16 on CPUs "
                   "with AMX)")  # fmt: skip
