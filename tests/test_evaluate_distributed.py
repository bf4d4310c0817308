"""Evaluation over 2 gloo processes gives exactly the single-process numbers: inference sharded
by image, COCO evaluation by category (each rank holding its categories' detections only), the
validation loss by batch."""

import importlib
import json
import os
from functools import partial

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TINY_MODEL, free_port
from test_evaluate import gt_as_results
from torch.utils.data import Subset

import spinedet
from spinedet.data import CocoDataset, eval_transforms
from spinedet.engine.distributed import DistInfo, exchange
from spinedet.engine.evaluate import (
    EvaluationStopped,
    coco_evaluate,
    eval_mode_for_losses,
    evaluate_distributed,
    run_inference,
    sharded_val_loss,
)


def _run(info: DistInfo | None, shapes: dict, weights: str) -> dict:
    """Inference + evaluation, the validation loss, and evaluation of fixed detections."""
    model = spinedet.create_model("spinenet49s_maskrcnn", num_classes=5, box_score_thresh=0.0,
                                  **TINY_MODEL)  # fmt: skip
    model.load_state_dict(torch.load(weights))
    cpu = torch.device("cpu")
    val = CocoDataset(shapes["val"], shapes["images"], eval_transforms(), masks=True)
    metrics, results = evaluate_distributed(model, val, val.label_to_cat_id, cpu, info,
                                            ("bbox", "segm"), batch_size=1, workers=1,
                                            progress=False)  # fmt: skip
    loss = sharded_val_loss(model, val, 1, cpu, info, workers=1)
    train = CocoDataset(shapes["train"], shapes["images"], masks=True)
    fixed = gt_as_results(train.coco, jitter=0.15, drop_every=4, masks=True)
    rank, ranks = (info.rank, info.world_size) if info else (0, 1)
    mine = [r for r in fixed if r["image_id"] % ranks == rank]  # each image's on one rank
    fixed_metrics = coco_evaluate(train.coco, mine, ("bbox", "segm"), info=info)
    received = exchange([[f"{rank}->{dst}"] for dst in range(ranks)], info or DistInfo())
    return {"metrics": metrics, "results": results, "loss": loss, "fixed": fixed_metrics,
            "training": model.training, "received": received,
            "stopped": _stops(model, val, info or DistInfo())}  # fmt: skip


def _stops(model: torch.nn.Module, val: CocoDataset, info: DistInfo) -> list[str]:
    """Where inference and the validation loss give up: with no stop over 5 images (shards of
    3 and 2 batches: rank 0's third has no agreement, else the ranks' collectives would pair
    wrongly from there on), then when rank 1 alone is asked to stop."""
    cpu, stopped = torch.device("cpu"), []
    evaluations = (
        partial(run_inference, label_to_cat_id=val.label_to_cat_id, device=cpu, info=info,
                batch_size=1, progress=False),
        partial(sharded_val_loss, batch_size=1, device=cpu, info=info),
    )  # fmt: skip
    for data, stop in ((Subset(val, range(5)), lambda: False), (val, lambda: info.rank == 1)):
        for evaluation in evaluations:
            try:
                evaluation(model, data, stop=stop)
            except EvaluationStopped as e:
                stopped.append(str(e))
    return stopped


def _worker(rank: int, port: int, shapes: dict, weights: str, out: str) -> None:
    torch.set_num_threads(1)  # the arithmetic of the single-process run
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    # Agree on a stop after every batch (a training run: every 8), so 3 batches a rank test it.
    importlib.import_module("spinedet.engine.evaluate").STOP_CHECK_EVERY = 1
    record = _run(DistInfo(rank, rank, 2), shapes, weights)
    with open(f"{out}.{rank}", "w") as f:
        json.dump(record, f, allow_nan=False)
    dist.destroy_process_group()


def test_two_gloo_processes_give_the_single_process_numbers(shapes, tmp_path):
    torch.manual_seed(0)
    model = spinedet.create_model("spinenet49s_maskrcnn", num_classes=5, **TINY_MODEL)
    weights = str(tmp_path / "weights.pt")
    torch.save(model.state_dict(), weights)
    out = str(tmp_path / "rank")
    mp.spawn(_worker, (free_port(), shapes, weights, out), nprocs=2)
    rank0, rank1 = (json.load(open(f"{out}.{r}")) for r in range(2))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = json.loads(json.dumps(_run(None, shapes, weights), allow_nan=False))
    finally:
        torch.set_num_threads(threads)
    assert single["results"], "the untrained model must detect something to compare"
    key = lambda r: (r["image_id"], -r["score"], r["bbox"])  # noqa: E731
    assert sorted(rank0["results"], key=key) == sorted(single["results"], key=key)
    assert rank1["results"] == []  # gathered on rank 0 alone
    assert rank0["received"] == [["0->0"], ["1->0"]] and rank1["received"] == [["0->1"], ["1->1"]]
    for rank in (rank0, rank1):  # every rank gets the numbers
        assert rank["metrics"] == single["metrics"]
        assert rank["fixed"] == single["fixed"]
        assert abs(rank["loss"] - single["loss"]) <= 1e-12 * abs(single["loss"])
        assert rank["training"] is True  # the mode the model came in with
        # Rank 0 gives up with rank 1, after the same batch, and no rank waits for another.
        assert rank["stopped"] == ["gave up after batch 1"] * 2
    assert single["stopped"] == []
    assert 0.2 < single["fixed"]["bbox"]["AP"] < 0.95  # category shares of a non-trivial case
    assert single["loss"] > 0


def test_val_loss_freezes_batchnorm_and_leaves_training_rng_alone(shapes):
    model = spinedet.create_model("spinenet49s_maskrcnn", num_classes=5, **TINY_MODEL)
    model.train()
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    stats = bn.running_mean.clone()
    val = CocoDataset(shapes["val"], shapes["images"], eval_transforms(), masks=True)
    torch.manual_seed(5)
    first = sharded_val_loss(model, val, 2, torch.device("cpu"))
    after = torch.rand(1)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(1), after)  # the training RNG did not move
    assert sharded_val_loss(model, val, 2, torch.device("cpu")) == first  # seeded per batch
    assert torch.equal(bn.running_mean, stats) and model.training and bn.training
    eval_mode_for_losses(model)
    assert model.training and not bn.training
