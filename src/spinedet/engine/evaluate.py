"""COCO evaluation with faster-coco-eval: the twelve COCO numbers and per-class AP, optionally
split over the ranks of a distributed run; the validation loss, sharded the same way."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from faster_coco_eval import COCO as FastCOCO
from faster_coco_eval import COCOeval_faster
from pycocotools.coco import COCO
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.ops import StochasticDepth
from tqdm import tqdm

from ..data import collate
from ..data.coco_files import some_ids
from ..masks import MaskCrops
from ..models.postprocess import pasting_crops
from .distributed import DistInfo, any_rank, exchange, gather_objects, gather_to

__all__ = [
    "STAT_NAMES",
    "STOP_CHECK_EVERY",
    "Accumulated",
    "EvaluationStopped",
    "accumulate",
    "category_owners",
    "check_stop",
    "coco_evaluate",
    "eval_mode_for_losses",
    "evaluate_distributed",
    "fast_coco",
    "flat_metrics",
    "format_metrics",
    "instance_counts",
    "merge",
    "run_inference",
    "shard_loader",
    "shard_batches",
    "sharded_val_loss",
    "summarize",
    "to_coco_results",
    "without_images",
]

# The twelve numbers of COCO's summary, in COCOeval.stats order.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
              "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")  # fmt: skip

# faster-coco-eval logs every load and index build at INFO; spinedet prints its own summary.
logging.getLogger("faster_coco_eval").setLevel(logging.WARNING)
log = logging.getLogger(__name__)


# Batches between the ranks' agreements on a stop (distributed.any_rank): each waits for the
# GPU and for the slowest rank, which after every batch would stall the queue of the validation
# loss (which has no other host sync) and pace every rank to the slowest one; 8 batches are
# seconds of a large validation pass. One process needs no agreement and checks every batch.
STOP_CHECK_EVERY = 8


class EvaluationStopped(Exception):
    """An evaluation gave up on a stop request; every rank of a distributed run raises it after
    the same batch."""


def check_stop(stop: Callable[[], bool] | None, done: int, common: int, info: DistInfo) -> None:
    """Raise :class:`EvaluationStopped` after ``done`` batches when ``stop()`` (this rank was
    asked to stop) holds: after every batch in one process; on any rank, every
    ``STOP_CHECK_EVERY`` batches within the ``common`` ones every rank has, so none waits in a
    collective for a rank that finished or left."""
    if stop is None:
        return
    if info.enabled:
        stopped = done % STOP_CHECK_EVERY == 0 and done <= common and any_rank(stop(), info)
    else:
        stopped = stop()
    if stopped:
        raise EvaluationStopped(f"gave up after batch {done}")


def _quiet(*_args: Any, **_kwargs: Any) -> None:
    """The print function handed to faster-coco-eval (its summaries are ours to print)."""


def to_coco_results(
    output: dict[str, torch.Tensor], image_id: int, label_to_cat_id: dict[int, int]
) -> list[dict[str, Any]]:
    """One image's detections as COCO result entries (xywh boxes, RLE masks, user category ids)."""
    boxes = output["boxes"].detach().cpu().float()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    scores = output["scores"].tolist()
    labels = output["labels"].tolist()
    masks = output.get("masks")
    if masks is not None and not isinstance(masks, MaskCrops):  # (N, 1, H, W) probabilities
        masks = MaskCrops.from_masks(masks[:, 0] > 0.5)
    rles = None if masks is None else masks.to_rle()
    results = []
    for i, (box, score, label) in enumerate(zip(xywh, scores, labels, strict=True)):
        entry = {
            "image_id": image_id,
            "category_id": label_to_cat_id[label],
            "bbox": [round(v, 2) for v in box],
            "score": round(score, 5),
        }
        if rles is not None:
            entry["segmentation"] = rles[i]
        results.append(entry)
    return results


def shard_loader(
    dataset: Dataset, info: DistInfo, batch_size: int, workers: int, device: torch.device
) -> DataLoader:
    """Batches of this rank's images of ``dataset``: every ``world_size``-th one, in order."""
    shard = Subset(dataset, range(info.rank, len(dataset), info.world_size))
    # A generator of its own: the workers' seeds are not drawn from the training RNG.
    return DataLoader(shard, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                      pin_memory=torch.device(device).type == "cuda",
                      generator=torch.Generator())  # fmt: skip


def shard_batches(dataset: Dataset, info: DistInfo, batch_size: int) -> int:
    """The number of :func:`shard_loader` batches every rank has (the smallest shard's)."""
    return -(-(len(dataset) // info.world_size) // batch_size)


@torch.no_grad()
def run_inference(
    model: nn.Module,
    dataset: Dataset,
    label_to_cat_id: dict[int, int],
    device: torch.device,
    info: DistInfo | None = None,
    batch_size: int = 2,
    workers: int = 0,
    progress: bool = True,
    stop: Callable[[], bool] | None = None,
) -> tuple[list[dict[str, Any]], list[Any]]:
    """COCO results of ``model`` on this rank's images of ``dataset``: every ``world_size``-th
    (loaded by ``workers`` DataLoader processes), all of them when not distributed, and the ids
    of those the data set could not read (their targets say ``"unreadable"``). ``stop``:
    whether this rank was asked to stop, checked between batches (see :func:`check_stop`)."""
    info = info or DistInfo()
    loader = shard_loader(dataset, info, batch_size, workers, device)
    common = shard_batches(dataset, info, batch_size)
    was_training = model.training
    model.eval()
    results: list[dict[str, Any]] = []
    unreadable = []
    bar = tqdm(loader, desc="evaluate", unit="batch", disable=not progress or info.rank != 0)
    for done, (images, targets) in enumerate(bar, 1):
        with pasting_crops():  # masks of large images never at full size
            outputs = model([img.to(device, non_blocking=True) for img in images])
        for out, target in zip(outputs, targets, strict=True):
            if target.get("unreadable"):
                unreadable.append(target["image_id"])
            else:
                results.extend(to_coco_results(out, int(target["image_id"]), label_to_cat_id))
        check_stop(stop, done, common, info)
    model.train(was_training)
    return results, unreadable


@dataclass
class Accumulated:
    """COCOeval's accumulated arrays for one IoU type; -1 where a class has no ground truth.

    ``precision`` and ``scores`` are [IoU thresholds, recall points, classes, area ranges,
    max detections], ``recall`` is [IoU thresholds, classes, area ranges, max detections];
    classes in the order of ``cat_ids`` (ascending), IoU thresholds 0.50:0.05:0.95, recall
    points 0:0.01:1, areas all/small/medium/large, max detections 1/10/100.
    """

    iou_type: str
    cat_ids: list[int]
    precision: np.ndarray
    recall: np.ndarray
    scores: np.ndarray


def fast_coco(coco_gt: COCO | FastCOCO) -> FastCOCO:
    """faster-coco-eval's index of the ground truth (spinedet's datasets hold pycocotools')."""
    if isinstance(coco_gt, FastCOCO):
        return coco_gt
    return FastCOCO(coco_gt.dataset, print_function=_quiet)


def accumulate(
    coco_gt: COCO | FastCOCO,
    results: list[dict[str, Any]],
    iou_type: str,
    cat_ids: Iterable[int] | None = None,
) -> Accumulated:
    """COCOeval ``evaluate`` + ``accumulate`` (faster-coco-eval) for ``cat_ids`` (default: all).

    Categories are evaluated independently, so any split of them gives, merged, the same
    arrays as one evaluation of all.
    """
    gt = fast_coco(coco_gt)
    cat_ids = sorted(gt.getCatIds() if cat_ids is None else cat_ids)
    evaluator = COCOeval_faster(gt, None, iou_type, print_function=_quiet)
    if not cat_ids:  # a rank whose share of the categories is empty
        p = evaluator.params
        t, r, a, m = len(p.iouThrs), len(p.recThrs), len(p.areaRng), len(p.maxDets)
        empty = np.zeros((t, r, 0, a, m))
        return Accumulated(iou_type, [], empty, np.zeros((t, 0, a, m)), empty)
    wanted = set(cat_ids)
    # Copies: loading results adds ids and areas to the entries.
    evaluator.cocoDt = gt.loadRes([dict(r) for r in results if r["category_id"] in wanted])
    evaluator.params.catIds = cat_ids
    evaluator.evaluate()
    evaluator.accumulate()
    e = evaluator.eval
    return Accumulated(iou_type, cat_ids, e["precision"], e["recall"], e["scores"])


def merge(parts: Sequence[Accumulated]) -> Accumulated:
    """The arrays of category shares as one evaluation, classes in ascending id order."""
    ids = [c for part in parts for c in part.cat_ids]
    order = np.argsort(ids, kind="stable")
    precision = np.concatenate([p.precision for p in parts], axis=2)[:, :, order]
    recall = np.concatenate([p.recall for p in parts], axis=1)[:, order]
    scores = np.concatenate([p.scores for p in parts], axis=2)[:, :, order]
    return Accumulated(parts[0].iou_type, sorted(ids), precision, recall, scores)


def _mean_defined(values: np.ndarray) -> float | None:
    """COCO's mean over entries that exist (> -1); None (JSON null) when none do."""
    defined = values[values > -1]
    return float(defined.mean()) if defined.size else None


def instance_counts(coco_gt: COCO | FastCOCO) -> Counter:
    """Ground-truth instances per category id (crowd regions are not instances to find)."""
    anns = coco_gt.dataset["annotations"]
    return Counter(a["category_id"] for a in anns if not a.get("iscrowd", 0))


def summarize(coco_gt: COCO | FastCOCO, acc: Accumulated) -> dict[str, Any]:
    """The twelve COCO numbers (``STAT_NAMES``; -1 as COCO's "no ground truth in this area
    range") and ``per_class``: {name: {category_id, instances, AP, AP50, AR100}}, with null
    for classes without ground truth."""
    evaluator = COCOeval_faster(None, None, acc.iou_type, print_function=_quiet)
    evaluator.eval = {"precision": acc.precision, "recall": acc.recall, "scores": acc.scores}
    evaluator.summarize()
    stats = {name: float(v) for name, v in zip(STAT_NAMES, evaluator.stats, strict=True)}
    iou50 = int(np.flatnonzero(np.isclose(evaluator.params.iouThrs, 0.5))[0])
    names = {c["id"]: c["name"] for c in coco_gt.dataset["categories"]}
    counts = instance_counts(coco_gt)
    per_class = {}
    for k, cat_id in enumerate(acc.cat_ids):
        precision = acc.precision[:, :, k, 0, -1]  # area "all", 100 detections
        per_class[names[cat_id]] = {
            "category_id": cat_id,
            "instances": counts[cat_id],
            "AP": _mean_defined(precision),
            "AP50": _mean_defined(precision[iou50]),
            "AR100": _mean_defined(acc.recall[:, k, 0, -1]),
        }
    return {**stats, "per_class": per_class}


def category_owners(
    coco_gt: COCO | FastCOCO, detections: Counter, world_size: int
) -> dict[int, int]:
    """The rank evaluating each category id: greedy balance of ground-truth + detection counts
    (``detections``: per category id, over all ranks)."""
    load = instance_counts(coco_gt) + detections
    totals = [0] * world_size
    owners = {}
    cat_ids = [c["id"] for c in coco_gt.dataset["categories"]]
    for cat_id in sorted(cat_ids, key=lambda c: (-load[c], c)):
        rank = totals.index(min(totals))
        totals[rank] += load[cat_id] + 1
        owners[cat_id] = rank
    return owners


def coco_evaluate(
    coco_gt: COCO | FastCOCO,
    results: list[dict[str, Any]],
    iou_types: Iterable[str] = ("bbox",),
    *,
    info: DistInfo | None = None,
) -> dict[str, dict[str, Any]]:
    """COCO metrics per IoU type (see :func:`summarize`); strict JSON (no NaN).

    With ``info`` of a distributed run, each rank passes its own share of the results (as
    :func:`run_inference` returns them, every image's on one rank): they go to the rank that
    evaluates their category, no rank holds more than its categories' results, the arrays are
    gathered, and every rank returns the numbers of a single-process evaluation.
    """
    info = info or DistInfo()
    gt = fast_coco(coco_gt)
    iou_types = list(iou_types)
    share = None
    if info.enabled:
        counts = Counter(r["category_id"] for r in results)
        owners = category_owners(gt, sum(gather_objects(counts, info), Counter()), info.world_size)
        outgoing: list[list[dict[str, Any]]] = [[] for _ in range(info.world_size)]
        for r in results:  # results of categories the ground truth lacks are not evaluated
            if r["category_id"] in owners:
                outgoing[owners[r["category_id"]]].append(r)
        results = [r for part in exchange(outgoing, info) for r in part]
        share = [c for c, rank in owners.items() if rank == info.rank]
    parts = {t: accumulate(gt, results, t, share) for t in iou_types}
    if info.enabled:
        gathered = gather_objects(parts, info)
        parts = {t: merge([g[t] for g in gathered]) for t in iou_types}
    return {t: summarize(gt, parts[t]) for t in iou_types}


def without_images(coco_gt: COCO | FastCOCO, image_ids: Iterable[Any]) -> COCO | FastCOCO:
    """The ground truth without the images ``image_ids`` and their annotations (``coco_gt``
    itself when there are none)."""
    left_out = set(image_ids)
    if not left_out:
        return coco_gt
    data = coco_gt.dataset
    return FastCOCO({**data,
                     "images": [im for im in data["images"] if im["id"] not in left_out],
                     "annotations": [a for a in data["annotations"]
                                     if a["image_id"] not in left_out]},
                    print_function=_quiet)  # fmt: skip


def evaluate_distributed(
    model: nn.Module,
    dataset: Dataset,
    label_to_cat_id: dict[int, int],
    device: torch.device,
    info: DistInfo | None = None,
    iou_types: Iterable[str] = ("bbox",),
    batch_size: int = 2,
    workers: int = 0,
    progress: bool = True,
    collect: bool = True,
    stop: Callable[[], bool] | None = None,
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Inference sharded by image, COCO evaluation sharded by category: no rank waits for
    another, or holds another's detections, beyond its share. Returns (metrics, results): the
    metrics identical on every rank and equal to the single-process numbers; the results (COCO
    detections of every image) on rank 0 when ``collect``, else and elsewhere ``[]``.
    ``dataset`` needs a ``coco`` attribute (a CocoDataset). ``stop``: see :func:`run_inference`."""
    results, unreadable = run_inference(model, dataset, label_to_cat_id, device, info,
                                        batch_size, workers, progress, stop)  # fmt: skip
    info = info or DistInfo()
    if info.enabled:
        unreadable = [i for part in gather_objects(unreadable, info) for i in part]
    # Scored without the unreadable images: their objects would count as missed.
    metrics = coco_evaluate(without_images(dataset.coco, unreadable), results, iou_types,
                            info=info)  # fmt: skip
    if unreadable:
        log.warning("%s left out of the AP: they could not be read (see above)",
                    some_ids("images", sorted(unreadable)))  # fmt: skip
        for m in metrics.values():
            m["unreadable_images"] = sorted(unreadable)
    gathered = gather_to(results, 0, info) if collect else None
    return metrics, [r for part in gathered or [] for r in part]


def eval_mode_for_losses(model: nn.Module) -> None:
    """Train mode (so torchvision returns losses) with frozen BN statistics and no drop-path."""
    model.train()
    for m in model.modules():
        if isinstance(m, _BatchNorm | StochasticDepth):
            m.eval()


@torch.no_grad()
def sharded_val_loss(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int,
    device: torch.device,
    info: DistInfo | None = None,
    workers: int = 0,
    seed: int = 0,
    stop: Callable[[], bool] | None = None,
) -> float:
    """Mean loss per image over ``dataset``, in :func:`eval_mode_for_losses`.

    The batches are those of one process (consecutive images), dealt to the ranks in turn and
    the sums all-reduced; each batch seeds the detector's proposal sampling with
    ``seed + batch index``, so the value depends neither on the number of ranks nor on the
    training RNG (which it leaves untouched). Pass the bare model, not the DDP wrapper.
    ``stop``: see :func:`run_inference`.
    """
    info = info or DistInfo()
    device = torch.device(device)
    starts = range(0, len(dataset), batch_size)
    batches = [list(range(s, min(s + batch_size, len(dataset)))) for s in starts]
    mine = range(info.rank, len(batches), info.world_size)
    loader = DataLoader(dataset, batch_sampler=[batches[i] for i in mine], num_workers=workers,
                        collate_fn=collate, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(seed))  # fmt: skip
    was_training = model.training
    eval_mode_for_losses(model)
    total = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, images
    cuda = [device.index or 0] if device.type == "cuda" else []
    for done, (index, (images, targets)) in enumerate(zip(mine, loader, strict=True), 1):
        with torch.random.fork_rng(devices=cuda):
            torch.default_generator.manual_seed(seed + index)
            if cuda:
                torch.cuda.manual_seed(seed + index)
            losses = model(
                [i.to(device, non_blocking=True) for i in images],
                [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()}
                 for t in targets],
            )  # fmt: skip
        total[0] += sum(losses.values()).double() * len(images)
        total[1] += len(images)
        check_stop(stop, done, len(batches) // info.world_size, info)
    if info.enabled:
        dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1].clamp(min=1)).item()


def flat_metrics(metrics: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """One level for metrics.jsonl and TensorBoard: ``bbox/AP`` ... ``bbox/ARl`` and
    ``bbox_AP_per_class/<class>`` (its own TensorBoard section; None where undefined)."""
    flat: dict[str, float | None] = {}
    for iou_type, m in metrics.items():
        flat |= {f"{iou_type}/{n}": m[n] for n in STAT_NAMES}
        flat |= {f"{iou_type}_AP_per_class/{name}": r["AP"] for name, r in m["per_class"].items()}
    return flat


def _cell(value: float | None) -> str:
    """A table cell; "-" where COCO has no number (null, or -1 for an empty area range)."""
    return "     -" if value is None or value < 0 else f"{value:6.3f}"


def format_metrics(metrics: dict[str, dict[str, Any]], worst: int | None = None) -> str:
    """The twelve COCO numbers per IoU type, then a per-class table (AP, AP50, AR100 per type
    and ground-truth instances) sorted worst first by the mask AP if present, else box AP;
    ``worst`` keeps only that many rows."""
    lines = ["type  " + " ".join(f"{n:>6}" for n in STAT_NAMES)]
    for iou_type, m in metrics.items():
        lines.append(f"{iou_type:<5} " + " ".join(_cell(m[n]) for n in STAT_NAMES))
    if not metrics:
        return "\n".join(lines)
    types = list(metrics)
    key_type = "segm" if "segm" in metrics else types[0]
    rows = metrics[key_type]["per_class"]

    def order(name: str) -> tuple[bool, float]:  # classes without ground truth last
        ap = rows[name]["AP"]
        return (ap is None, ap or 0.0)

    names = sorted(rows, key=order)
    shown = names if worst is None else names[:worst]
    title = f"per-class {key_type} AP (IoU 0.50:0.95), worst first"
    if len(shown) < len(names):
        title += f" ({len(shown)} of {len(names)})"
    header = f"{'class':<20} {'inst':>6} " + " ".join(
        f"{t + ' ' + n:>10}" for t in types for n in ("AP", "AP50", "AR100")
    )
    lines += ["", title, header]
    for name in shown:
        cells = " ".join(
            f"{_cell(metrics[t]['per_class'][name][n]):>10}"
            for t in types
            for n in ("AP", "AP50", "AR100")
        )
        lines.append(f"{name[:20]:<20} {rows[name]['instances']:>6} {cells}")
    return "\n".join(lines)
