"""The trainer's parts one at a time: accumulation, guards on the run directory, resume rules,
logs, and a backbone started from a weights file."""

import errno
import json
import logging
import math
import os
import signal
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from conftest import TINY_MODEL, free_port, tiny_config
from safetensors.torch import load_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import spinedet
from spinedet.cli import main as cli
from spinedet.config import load_config
from spinedet.engine import checkpoint, train
from spinedet.engine.builders import build_datasets, build_model, build_optimizer, lr_lambda
from spinedet.engine.checkpoint import Checkpointer, RunLock
from spinedet.engine.distributed import DistInfo, any_rank
from spinedet.engine.logger import RunLogger
from spinedet.engine.loop import Stepper, StopSignal
from spinedet.engine.plots import plot_curves, read_metrics
from spinedet.engine.trainer import _check_data
from spinedet.errors import SpinedetError, Stopped
from spinedet.models import create_model
from spinedet.models.weights import read_metadata, save_weights


class _Regressor(nn.Module):
    """Conv + BN + linear with the detector's interface and a per-image mean loss."""

    def __init__(self) -> None:
        super().__init__()
        layers = [nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1)]
        self.body = nn.Sequential(*layers, nn.Flatten(), nn.Linear(4, 1))

    def forward(self, images, targets):
        out = self.body(torch.stack(list(images))).squeeze(1)
        goal = torch.stack([t["y"] for t in targets])
        return {"mse": ((out - goal) ** 2).mean(), "l1": (out - goal).abs().mean()}


def test_accumulating_two_batches_of_four_gives_the_gradients_of_one_batch_of_eight():
    torch.manual_seed(0)
    images = list(torch.randn(8, 3, 9, 9))
    targets = [{"y": y} for y in torch.randn(8)]
    grads = []
    for groups in ([(images, targets)], [(images[:4], targets[:4]), (images[4:], targets[4:])]):
        torch.manual_seed(1)
        net = _Regressor().eval()  # BN on its running statistics
        stepper = Stepper(net, torch.optim.SGD(net.parameters(), lr=0.1), torch.device("cpu"),
                          DistInfo())  # fmt: skip
        losses = stepper.backward(groups, step=0)
        grads.append(([p.grad.clone() for p in net.parameters()], losses))
    (one, loss_one), (two, loss_two) = grads
    # float32 sums in another order (and, with one thread, other kernels' blocking) differ by a
    # few ulps; a wrong micro-batch weighting would differ by a factor.
    for a, b in zip(one, two, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert loss_one == pytest.approx(loss_two, rel=1e-6)
    assert set(loss_one) == {"loss", "mse", "l1"}


def test_non_finite_loss_clears_gradients_and_reports_none():
    net = _Regressor()
    stepper = Stepper(net, torch.optim.SGD(net.parameters(), lr=0.1), torch.device("cpu"),
                      DistInfo())  # fmt: skip
    batch = ([torch.randn(3, 9, 9)], [{"y": torch.tensor(float("nan"))}])
    assert stepper.backward([batch], step=0) is None
    assert all(p.grad is None for p in net.parameters())
    good = ([torch.randn(3, 9, 9)], [{"y": torch.tensor(1.0)}])
    assert set(stepper.backward([good], step=0)) == {"loss", "mse", "l1"}
    assert stepper.backward([good, batch], step=1) is None  # one bad micro-batch spoils the step
    assert all(p.grad is None for p in net.parameters())


def _stop_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    net = DistributedDataParallel(_Regressor())
    info = DistInfo(rank, rank, 2)
    stepper = Stepper(net, torch.optim.SGD(net.parameters(), lr=0.1), torch.device("cpu"), info)
    batch = ([torch.randn(3, 9, 9)], [{"y": torch.tensor(1.0)}])
    seen = []
    for step, asked in enumerate([False, rank == 1, False]):  # a signal reaches rank 1 only
        stepper.backward([batch], step, stop=asked)
        seen.append(stepper.stopping)
    # Between steps (epoch ends, validation batches) the ranks agree with any_rank.
    seen += [any_rank(rank == 1, info), any_rank(False, info)]
    Path(f"{out}.{rank}").write_text(json.dumps(seen))
    dist.destroy_process_group()


def test_a_stop_on_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """Else the signalled rank leaves and the others wait in DDP's next collective."""
    mp.spawn(_stop_worker, (free_port(), str(tmp_path / "rank")), nprocs=2)
    seen = [json.loads((tmp_path / f"rank.{r}").read_text()) for r in range(2)]
    assert seen == [[False, True, False, True, False]] * 2


def test_accumulation_scales_steps_and_lr_and_the_logs_say_so(shapes, tmp_path):
    train(tiny_config(shapes, epochs=2, accumulate=2), tmp_path, device="cpu")
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert len(rows) == 2  # 6 images make one step of 2 x 2 per epoch
    # effective LR 0.04, warm-up at step 1 of 2, both step milestones (at 0.9 and 0.967) passed
    assert rows[0]["lr"] == pytest.approx(0.02 * 2 * 2 / 2 * (0.1 + 0.9 * 0.5) * 0.1**2)
    for key in ("images_per_s", "data_time", "step_time", "loss"):
        assert rows[0][key] > 0
    log = (tmp_path / "log.txt").read_text()
    assert "\r" not in log
    assert "global batch 2 x accumulate 2 = 4 images per step, effective LR 0.04" in log
    assert "6 training / 0 validation images, 4 classes" in log
    assert "step 2/2 epoch 1 loss" in log


def test_empty_data_set_and_zero_steps_are_refused(shapes, tmp_path):
    data = json.loads(shapes["train"].read_text())
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({**data, "images": [], "annotations": []}))
    cfg = tiny_config(shapes)
    cfg["data"]["train"]["annotations"] = str(empty)
    with pytest.raises(SpinedetError, match=r"empty.json: the data set has no images"):
        train(cfg, tmp_path / "a", device="cpu")
    cfg["data"]["check"] = False  # the trainer refuses it by itself too
    with pytest.raises(SpinedetError, match=r"empty.json: the data set has no images"):
        train(cfg, tmp_path / "a", device="cpu")
    with pytest.raises(SpinedetError, match=r"6 training images make no step of 8 images"):
        train(tiny_config(shapes, batch_size=4, accumulate=2), tmp_path / "b", device="cpu")
    assert not (tmp_path / "a" / "checkpoints").exists()


def test_boxes_only_data_is_refused_by_the_check_for_a_mask_model_only(shapes, tmp_path):
    data = json.loads(shapes["train"].read_text())
    for a in data["annotations"]:
        a["segmentation"] = []
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps(data))
    cfg = tiny_config(shapes)
    cfg["data"]["train"]["annotations"] = str(boxes)
    # The data check refuses it before a model is built (it used to pass it, with a warning).
    with pytest.raises(SpinedetError, match=r"boxes.json: the data set has problems(.|\n)*"
                       r"have no segmentation; Mask R-CNN needs masks"):  # fmt: skip
        train(cfg, tmp_path / "a", device="cpu")
    assert not (tmp_path / "a" / "checkpoints").exists()
    cfg["model"]["name"] = "spinenet49s_retinanet"  # boxes are all a RetinaNet needs
    assert _check_data(cfg, tmp_path / "b") is None


def test_second_writer_is_refused_with_the_holders_pid_and_stale_temps_go(shapes, tmp_path):
    import os

    with RunLock(tmp_path):
        with pytest.raises(
            SpinedetError, match=rf"in use by another training run \(pid {os.getpid()}\)"
        ):
            train(tiny_config(shapes, max_steps=1), tmp_path, device="cpu")
    (tmp_path / "checkpoints").mkdir()
    stale = [tmp_path / "checkpoints" / ".last.pt.x1y2", tmp_path / ".last.safetensors.abc",
             tmp_path / "checkpoints" / ".last.json.q", tmp_path / ".metrics.jsonl.q",
             tmp_path / ".curves.png.q", tmp_path / ".data_check.json.q"]  # fmt: skip
    for path in stale:
        path.write_bytes(b"half")
    train(tiny_config(shapes, max_steps=1), tmp_path, device="cpu")
    assert not any(p.exists() for p in stale)


def test_an_out_that_is_a_file_is_named_as_such(shapes, tmp_path):
    (tmp_path / "run").write_text("")
    with pytest.raises(SpinedetError, match=r"run: exists and is not a folder"):
        train(tiny_config(shapes, max_steps=1), tmp_path / "run", device="cpu")


def test_checkpointer_never_saves_non_finite_weights(tmp_path):
    model = create_model("spinenet49s_retinanet", num_classes=2, **{"filter_scale": 0.25})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = Checkpointer(tmp_path, model, {"optimizer": opt}, {})
    assert ckpt.save({"step": 1, "epoch": 0, "best": -1.0})
    good = load_file(tmp_path / "last.safetensors")
    with torch.no_grad():
        next(model.parameters())[0] = float("inf")
    assert not ckpt.save({"step": 2, "epoch": 0, "best": -1.0})
    after = load_file(tmp_path / "last.safetensors")
    assert all(torch.equal(good[k], after[k]) for k in good)
    assert torch.load(ckpt.path, weights_only=True)["step"] == 1


def test_a_second_save_at_a_step_writes_its_counters_alone(tmp_path):
    model = create_model("spinenet49s_retinanet", num_classes=2, **{"filter_scale": 0.25})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    parts = {"optimizer": opt, "scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1)}
    ckpt = Checkpointer(tmp_path, model, parts, {})
    assert ckpt.save({"step": 4, "epoch": 1, "best": None, "epoch_ended": False})
    stamps = {p: p.stat().st_mtime_ns for p in (ckpt.path, tmp_path / "last.safetensors")}
    time.sleep(0.01)
    # After validation: the same step, new counters; the state and weights are not rewritten.
    assert ckpt.save({"step": 4, "epoch": 1, "best": 0.5, "epoch_ended": True})
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert torch.load(ckpt.path, weights_only=True)["epoch_ended"] is False
    fresh = Checkpointer(tmp_path, model, parts, {})
    assert fresh.load() == {"step": 4, "epoch": 1, "best": 0.5, "epoch_ended": True}
    # A later step writes everything; counters left from an earlier step never override it.
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert ckpt.save({"step": 5, "epoch": 1, "best": 0.5, "epoch_ended": False})
    assert ckpt.path.stat().st_mtime_ns != stamps[ckpt.path]
    ckpt.counters_path.write_text('{"step": 4, "epoch": 1, "best": 0.9, "epoch_ended": true}')
    assert Checkpointer(tmp_path, model, parts, {}).load()["best"] == 0.5
    ckpt.counters_path.write_text("{")
    with pytest.raises(SpinedetError, match=r"last.json: unreadable .*delete it"):
        Checkpointer(tmp_path, model, parts, {}).load()


def test_a_kill_between_the_state_and_the_weights_is_made_good_on_resume(tmp_path, monkeypatch):
    model = create_model("spinenet49s_retinanet", num_classes=2, **{"filter_scale": 0.25})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    parts = {"optimizer": opt, "scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1)}
    ckpt = Checkpointer(tmp_path, model, parts, {})
    assert ckpt.save({"step": 3, "epoch": 1, "best": -1.0, "epoch_ended": True})
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    # Killed after last.pt of step 6, before last.safetensors and last.json.
    monkeypatch.setattr(checkpoint, "save_weights", _killed)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save({"step": 6, "epoch": 2, "best": -1.0, "epoch_ended": False})
    monkeypatch.undo()
    # A rank other than 0 writes nothing.
    assert Checkpointer(tmp_path, model, parts, {}).load(repair=False)["step"] == 6
    assert read_metadata(tmp_path / "last.safetensors")["step"] == 3
    fresh = Checkpointer(tmp_path, model, parts, {})
    assert fresh.load()["step"] == 6
    # The saves at step 6 (before and after its validation) write the counters alone.
    assert fresh.save({"step": 6, "epoch": 2, "best": 0.5, "epoch_ended": True})
    assert read_metadata(tmp_path / "last.safetensors")["step"] == 6
    weights = load_file(tmp_path / "last.safetensors")
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def _killed(*args) -> None:
    raise KeyboardInterrupt


def test_torn_metrics_line_is_dropped_and_a_bad_line_is_named(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1}\n{"kind": "train", "st')
    with caplog.at_level(logging.WARNING):
        assert read_metrics(path) == [{"kind": "train", "step": 1}]
    assert "metrics.jsonl:2: dropped a cut-off last line" in caplog.text
    path.write_text('{"kind": "train", "step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(SpinedetError, match=r"metrics.jsonl:2: not a JSON line"):
        read_metrics(path)


def test_tensorboard_drops_the_steps_a_resume_trains_again(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def attempt(resume_step, steps, loss):
        logger = RunLogger(tmp_path, main=True)
        logger.open(resume_step)
        for step in steps:
            logger.row({"kind": "train", "step": step, "loss": loss})
        logger.close()

    attempt(None, [1, 2], 9.0)  # killed before its first checkpoint: the run starts over
    attempt(None, [1, 2, 3, 4, 5], 1.0)  # killed at step 5, its checkpoint at step 3
    attempt(3, [4, 5, 6], 2.0)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert loss == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 2.0), (5, 2.0), (6, 2.0)]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_under_the_logs_is_one_line_naming_the_file(tmp_path, monkeypatch):
    logger = RunLogger(tmp_path, main=True)
    logger.open(None)
    try:
        for name, write in [("metrics.jsonl", lambda: logger.row({"kind": "train", "step": 1})),
                            ("log.txt", lambda: logger.text("epoch 1"))]:  # fmt: skip
            (tmp_path / name).unlink(missing_ok=True)
            (tmp_path / name).symlink_to("/dev/full")  # every write: no space left
            with pytest.raises(OSError, match=rf"{name}: cannot write \(No space left on device\)"):
                write()
            (tmp_path / name).unlink()
        # TensorBoard's writer thread fails alone; its next call raises the thread's error.
        monkeypatch.setattr(logger.writer, "add_scalar", _no_space)
        with pytest.raises(OSError, match=r"tb: cannot write \(No space left on device\)"):
            logger.row({"kind": "train", "step": 1, "loss": 1.0})
    finally:
        logger.close()


def test_tensorboard_s_writer_thread_leaves_its_error_to_the_one_line(tmp_path, monkeypatch):
    """The thread's traceback would precede the line the next call raises."""
    seen = []
    monkeypatch.setattr(threading, "excepthook", seen.append)  # what prints tracebacks
    logger = RunLogger(tmp_path, main=True)
    logger.open(None)
    records = logger.writer._get_file_writer().event_writer._async_writer._writer
    records.write = _no_space  # the disk fills under the thread
    with pytest.raises(OSError, match=r"tb: cannot write \(No space left on device\)"):
        try:
            logger.row({"kind": "train", "step": 1, "loss": 1.0})
        finally:
            logger.close()  # the thread's error surfaces at the row or here
    assert seen == []
    assert threading.excepthook == seen.append  # restored


def _no_space(*args) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_curves_are_written_atomically(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 2.0}\n')
    # Written in place, the new curves would go through the link into the full device.
    (tmp_path / "curves.png").symlink_to("/dev/full")
    plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert not (tmp_path / "curves.png").is_symlink()
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
    # Before the first logged step: no loss to label, and no matplotlib warning about it.
    (tmp_path / "metrics.jsonl").write_text("")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")


def test_resume_from_the_run_alone_and_refused_changes_write_nothing(shapes, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(shapes, max_steps=2), run, device="cpu")
    config = (run / "config.yaml").read_text()
    metrics = (run / "metrics.jsonl").read_text()
    capsys.readouterr()
    code = cli(["train", "--resume", "--out", str(run), "--device", "cpu",
                "--set", "train.batch_size=1", "--set", "train.base_lr=0.5"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "resuming would change the run" in err
    assert "train.base_lr: 0.02 -> 0.5" in err and "train.batch_size: 2 -> 1" in err
    assert (run / "config.yaml").read_text() == config
    assert (run / "metrics.jsonl").read_text() == metrics
    # extending the run by its length (and speed settings) alone continues from config.yaml
    code = cli(["train", "--resume", "--out", str(run), "--device", "cpu",
                "--set", "train.max_steps=3", "--set", "train.cuda_graphs=false"])  # fmt: skip
    assert code == 0
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 3 and saved["train"]["cuda_graphs"] is False
    # a length short of the steps trained would make config.yaml say a shorter run
    config = (run / "config.yaml").read_text()
    capsys.readouterr()
    code = cli(["train", "--resume", "--out", str(run), "--device", "cpu",
                "--set", "train.max_steps=2"])  # fmt: skip
    assert code == 2 and "is at step 3, past the 2 steps" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == config


def test_resume_with_other_classes_names_the_checkpoint_and_tensors(shapes, tmp_path, capsys):
    """The annotation file changed under the run (3 classes instead of 4)."""
    data = json.loads(shapes["train"].read_text())
    annotations = tmp_path / "train.json"
    annotations.write_text(json.dumps(data))
    cfg = tiny_config(shapes, max_steps=1)
    cfg["data"]["train"]["annotations"] = str(annotations)
    run = tmp_path / "run"
    train(cfg, run, device="cpu")
    config = (run / "config.yaml").read_text()
    data["categories"] = data["categories"][:3]
    kept = {c["id"] for c in data["categories"]}
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] in kept]
    annotations.write_text(json.dumps(data))
    capsys.readouterr()
    code = cli(["train", "--resume", "--out", str(run), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err, err
    assert "checkpoints/last.pt does not fit this run's model (6 tensors differ: " in err
    assert "roi_heads.box_predictor.cls_score.bias (checkpoint (5,), model (4,))" in err
    assert (run / "config.yaml").read_text() == config
    four = json.loads(shapes["train"].read_text())["categories"]
    ckpt = Checkpointer(run, create_model("spinenet49s_maskrcnn", categories=four, **TINY_MODEL),
                        {}, {})  # fmt: skip
    assert ckpt.load()["step"] == 1


@pytest.mark.parametrize("source", ["backbone", "detector"])
def test_backbone_weights_load_only_the_backbone(shapes, tmp_path, caplog, source):
    torch.manual_seed(3)
    if source == "backbone":
        donor = create_model("spinenet49s", filter_scale=0.25, endpoint_filters=32)
        expected = donor.state_dict()
    else:
        donor = create_model(
            "spinenet49s_retinanet", num_classes=7, filter_scale=0.25, endpoint_filters=32
        )
        expected = donor.backbone.state_dict()
    path = tmp_path / "donor.safetensors"
    save_weights(donor, path)
    cfg = tiny_config(shapes)
    cfg["model"]["backbone_weights"] = str(path)
    with caplog.at_level(logging.INFO):
        model = build_model(cfg, [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}])
    got = model.backbone.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    fresh = caplog.text.split("tensors start fresh: ")[1].splitlines()[0]
    assert fresh.startswith("roi_heads.") or fresh.startswith("rpn.")
    assert "backbone." not in fresh.split(" (")[0]
    # a backbone of another size is one line naming the file
    other = tmp_path / "other.safetensors"
    save_weights(create_model("spinenet49s", filter_scale=0.5), other)
    cfg["model"]["backbone_weights"] = str(other)
    with pytest.raises(SpinedetError) as err:
        build_model(cfg, [{"id": 1, "name": "a"}])
    assert "\n" not in str(err.value) and "other.safetensors" in str(err.value)


def test_backbone_weights_keep_the_donors_padding_and_norm(shapes, tmp_path, caplog):
    """A classifier's backbone (tensorflow/tpu's padding, downsampling and BN epsilon, its
    defaults, recorded nowhere) computes the same features in the detector built on it; a
    config that sets another padding is refused instead of loading silently."""
    torch.manual_seed(3)
    donor = create_model(
        "spinenet49s_classifier", num_classes=5, filter_scale=0.25, endpoint_filters=32
    ).eval()
    path = tmp_path / "classifier.safetensors"
    save_weights(donor, path)
    cfg = tiny_config(shapes)
    cfg["model"]["backbone_weights"] = str(path)
    with caplog.at_level(logging.INFO):
        model = build_model(cfg, [{"id": 1, "name": "a"}]).eval()
    assert "downsample='tpu'" in caplog.text and "padding='fixed'" in caplog.text
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        got, want = model.backbone(images), donor.backbone(images)
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    cfg["model"]["options"]["padding"] = "same"
    with pytest.raises(SpinedetError, match="classifier.safetensors was trained with .*"
                       "padding='fixed', this model uses .*padding='same'"):  # fmt: skip
        build_model(cfg, [{"id": 1, "name": "a"}])


def test_strict_json_rows(shapes, tmp_path):
    cfg = tiny_config(shapes, epochs=1)
    cfg["data"]["val"] = {"annotations": str(shapes["val"]), "images": str(shapes["images"])}
    train(cfg, tmp_path, device="cpu")
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    val = [r for r in map(json.loads, text.splitlines()) if r["kind"] == "val"][0]
    for name in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs",
                 "ARm", "ARl"):  # fmt: skip
        assert f"bbox/{name}" in val and f"segm/{name}" in val
    assert {f"segm_AP_per_class/{n}" for n in ("circle", "square", "triangle", "star")} <= set(val)
    model = spinedet.load_model(Path(tmp_path) / "best.safetensors")
    assert model.class_names == ["circle", "square", "triangle", "star"]


def test_classifier_recipe_warms_up_from_zero_then_follows_the_cosine():
    train_cfg = load_config("spinenet49_classifier")["train"]
    scale, total = lr_lambda(train_cfg, 62557), 62557
    cosine = [0.5 * (1 + math.cos(math.pi * s / total)) for s in (782, 1564, 40000)]
    assert scale(0) == 0.0  # tensorflow/tpu's warmup_learning_rate
    assert scale(782) == pytest.approx(0.5 * cosine[0])  # half-way up the linear ramp
    assert [scale(1564), scale(40000)] == pytest.approx(cosine[1:])


def test_optimizer_choice_keeps_the_lr_scaling_and_kernel_only_decay():
    model = _Regressor()
    cfg = load_config(None, ["train.optimizer=adamw", "train.base_lr=0.002",
                             "train.base_batch=8", "train.batch_size=16"])["train"]  # fmt: skip
    optimizer, _ = build_optimizer(cfg, model, 10)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"]  # CPU
    assert [g["initial_lr"] for g in optimizer.param_groups] == [0.004, 0.004]
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    kernels = [model.body[0].weight, model.body[-1].weight]
    assert decayed == {id(p) for p in kernels}
    assert optimizer.param_groups[1]["weight_decay"] == 0.0
    sgd, _ = build_optimizer(load_config(None)["train"], model, 10)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9
    assert sgd.defaults["fused"]
    with pytest.raises(SpinedetError, match="train.optimizer"):
        load_config(None, ["train.optimizer=adam"])


def test_a_forked_loader_worker_leaves_signals_to_the_training_process(capfd):
    """Ctrl-C reaches the whole process group; DataLoader workers forked with the handler
    neither announce the stop nor count it."""
    with StopSignal() as stop:
        pid = os.fork()
        if pid == 0:  # a worker
            os.kill(os.getpid(), signal.SIGINT)
            os._exit(3 if stop.requested() else 0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert "stopping" not in capfd.readouterr().err
        os.kill(os.getpid(), signal.SIGINT)  # the training process itself
        assert stop.requested()
    assert "stopping after the current step" in capfd.readouterr().err


def test_before_training_a_signal_stops_at_once_but_a_forked_worker_still_ignores_it():
    with StopSignal(early="stopped before training began") as stop:
        pid = os.fork()
        if pid == 0:  # a worker
            code = 3
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        with pytest.raises(Stopped, match="^stopped before training began$") as stopped:
            os.kill(os.getpid(), signal.SIGTERM)
        assert stopped.value.signum == signal.SIGTERM
        stop.begin()  # the first step: from here a signal asks for a stop after it
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested()


def test_photos_larger_than_the_model_load_at_the_size_each_pass_uses(shapes):
    cfg = tiny_config(shapes)
    for key, value in (("model.image_size", 32),  # the shapes are 64 px: twice the model
                       ("data.val", {"annotations": str(shapes["val"]),
                                     "images": str(shapes["images"])})):  # fmt: skip
        section, name = key.split(".")
        cfg[section][name] = value
    _, data = build_datasets(cfg)
    assert data.train.max_size == 64  # training: up to the largest jitter scale, 2.0 x 32
    # AP reads the ground truth from the json: its pass loads the images alone, as they are.
    image, target = data.val[0]
    assert image.shape[-2:] == (64, 64) and image.dtype == torch.uint8 and "masks" not in target
    # The loss pass: images and targets at the size the model shrinks them to.
    small, scaled = data.val_loss[0]
    assert small.shape[-2:] == (32, 32) and scaled["masks"].shape[-2:] == (32, 32)
    torch.testing.assert_close(scaled["boxes"], target["boxes"] / 2)


def test_a_wrong_model_is_refused_before_the_data_check_and_the_run_folder(shapes, tmp_path):
    """A wrong model name or option failed after the data check (minutes on a large set),
    leaving the run folder with a lock file and the check's report."""
    cases = [
        ({"name": "spinenet49x_maskrcnn"}, "unknown model 'spinenet49x_maskrcnn'"),
        ({"options": {"nonsense": 1}}, "unknown option 'nonsense'"),
        ({"name": "spinenet49s"}, "model.name=spinenet49s is a backbone"),
    ]
    for model, message in cases:
        config = tiny_config(shapes)
        config["model"] |= model
        with pytest.raises(SpinedetError, match=message):
            train(config, tmp_path / "run", device="cpu")
        assert not (tmp_path / "run").exists()
