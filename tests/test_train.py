"""Training: loss goes down, exact resume, DDP on gloo, clear stops on bad data or NaN."""

import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import TINY_MODEL, free_port, tiny_config
from safetensors.torch import load_file

import spinedet
from spinedet.cli import main as cli_main
from spinedet.config import ConfigError, load_config
from spinedet.convert import convert_tf
from spinedet.data import CocoDataset, DataError, eval_transforms
from spinedet.engine import TrainingError, evaluate, loop, train, trainer
from spinedet.engine.checkpoint import Checkpointer
from spinedet.engine.distributed import lost_peer
from spinedet.engine.evaluate import flat_metrics, sharded_val_loss
from spinedet.models import rcnn
from spinedet.models.weights import save_weights


def _losses(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def test_loss_goes_down_and_run_directory_is_complete(shapes, tmp_path):
    cfg = tiny_config(shapes, epochs=8, base_lr=0.05, schedule="cosine", clip_grad=0)
    cfg["data"]["val"] = {"annotations": str(shapes["val"]), "images": str(shapes["images"])}
    cfg["train"]["eval_every"] = 3
    train(cfg, tmp_path, device="cpu")
    losses = _losses(tmp_path)
    assert len(losses) == 8 * 3  # 6 training images, batch 2
    assert sum(losses[-6:]) / 6 < 0.8 * sum(losses[:6]) / 6
    for name in (
        "config.yaml",
        "last.safetensors",
        "best.safetensors",
        "curves.png",
        "checkpoints/last.pt",
    ):
        assert (tmp_path / name).is_file(), name
    assert list((tmp_path / "tb").iterdir())
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if r["kind"] == "val"] == [3, 6, 8]
    assert all("segm/AP" in r and "val_loss" in r for r in rows if r["kind"] == "val")
    model = spinedet.load_model(tmp_path / "last.safetensors")
    assert model.class_names == ["circle", "square", "triangle", "star"]


def test_interrupted_and_resumed_run_ends_with_identical_weights(shapes, tmp_path):
    train(tiny_config(shapes, max_steps=6), tmp_path / "straight", device="cpu")
    train(tiny_config(shapes, max_steps=3), tmp_path / "resumed", device="cpu")
    interrupted = load_file(tmp_path / "resumed" / "last.safetensors")
    train(tiny_config(shapes, max_steps=6), tmp_path / "resumed", resume=True, device="cpu")
    a = load_file(tmp_path / "straight" / "last.safetensors")
    b = load_file(tmp_path / "resumed" / "last.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], interrupted[k]) for k in a)  # it did train on
    assert _losses(tmp_path / "straight") == _losses(tmp_path / "resumed")


def test_a_crash_within_an_epoch_resumes_from_its_last_step_checkpoint(
    shapes, tmp_path, monkeypatch
):
    """``train.checkpoint_steps``: a crash mid-epoch loses the steps since the last multiple,
    not the epoch, and the resumed run equals the uninterrupted one."""
    cfg = tiny_config(shapes, epochs=2, checkpoint_steps=2)  # 2 epochs of 3 steps
    train(cfg, tmp_path / "straight", device="cpu")
    calls, original = [], loop.Stepper.step

    def crash_at_step_five(self):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("the machine went away")
        original(self)

    monkeypatch.setattr(loop.Stepper, "step", crash_at_step_five)
    with pytest.raises(RuntimeError, match="went away"):
        train(cfg, tmp_path / "crashed", device="cpu")
    monkeypatch.undo()
    counters = json.loads((tmp_path / "crashed" / "checkpoints" / "last.json").read_text())
    assert counters["step"] == 4  # within the second epoch
    train(cfg, tmp_path / "crashed", resume=True, device="cpu")
    assert _same_weights(tmp_path / "straight", tmp_path / "crashed", "last.safetensors")
    assert _losses(tmp_path / "straight") == _losses(tmp_path / "crashed")


def _validated(shapes):
    """2 epochs of 3 steps, each validated (3 + 3 batches of the 6 validation images)."""
    cfg = tiny_config(shapes, epochs=2)
    cfg["data"]["val"] = {"annotations": str(shapes["val"]), "images": str(shapes["images"])}
    return cfg


@pytest.fixture(scope="module")
def straight(shapes, tmp_path_factory):
    """The run of ``_validated`` never stopped, which every stopped and resumed one must equal."""
    run = tmp_path_factory.mktemp("straight")
    train(_validated(shapes), run, device="cpu")
    return run


def _val_rows(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time"} for r in rows if r["kind"] == "val"]


def _same_weights(run, other, name):
    a, b = (load_file(r / name) for r in (run, other))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_stop_at_an_epoch_end_is_evaluated_on_resume(shapes, straight, tmp_path, monkeypatch):
    """Stopped on an epoch's last step, before its evaluation: resuming evaluates that epoch
    first, so the metrics and the best weights are those of the run never stopped."""
    steps, original = [], loop.Stepper.step

    def step_then_stop(self):
        original(self)
        steps.append(1)
        if len(steps) == 3:
            signal.raise_signal(signal.SIGINT)  # what Ctrl-C during the third step does

    monkeypatch.setattr(loop.Stepper, "step", step_then_stop)
    with pytest.raises(KeyboardInterrupt, match="interrupted at step 3"):
        train(_validated(shapes), tmp_path / "stopped", device="cpu")
    monkeypatch.setattr(loop.Stepper, "step", original)
    assert not (tmp_path / "stopped" / "best.safetensors").exists()
    train(_validated(shapes), tmp_path / "stopped", resume=True, device="cpu")
    assert [r["epoch"] for r in _val_rows(tmp_path / "stopped")] == [1, 2]
    assert _val_rows(tmp_path / "stopped") == _val_rows(straight)
    assert _same_weights(tmp_path / "stopped", straight, "best.safetensors")
    assert (tmp_path / "stopped" / "curves.png").is_file()

    # A crash in validation (here once its row is logged) comes after the epoch's checkpoint:
    # resuming loses no step and validates the epoch again, its first row dropped.
    def crash(self, step):
        raise RuntimeError("crashed in validation")

    monkeypatch.setattr(Checkpointer, "save_best", crash)
    with pytest.raises(RuntimeError, match="crashed in validation"):
        train(_validated(shapes), tmp_path / "crashed", device="cpu")
    monkeypatch.undo()
    assert [r["epoch"] for r in _val_rows(tmp_path / "crashed")] == [1]
    state = torch.load(tmp_path / "crashed" / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 3
    train(_validated(shapes), tmp_path / "crashed", resume=True, device="cpu")
    assert _val_rows(tmp_path / "crashed") == _val_rows(straight)


def test_a_stop_during_validation_gives_it_up_and_resume_validates_again(
    shapes, straight, tmp_path, monkeypatch
):
    """A first signal in an epoch's validation (an hour on a large validation set) stops after
    the current batch: no row of that epoch, the checkpoint written before validation (epoch not
    ended) stands, and resuming validates the epoch again and ends as the run never stopped."""
    evaluation = importlib.import_module("spinedet.engine.evaluate")  # the package's is a function
    batches, original = [], evaluation.collate

    def collate_then_stop(samples):
        batches.append(len(samples))
        if len(batches) == 2:
            signal.raise_signal(signal.SIGINT)  # what Ctrl-C during the second batch does
        return original(samples)

    monkeypatch.setattr(evaluation, "collate", collate_then_stop)
    with pytest.raises(KeyboardInterrupt, match="validation of epoch 1 interrupted at step 3"):
        train(_validated(shapes), tmp_path, device="cpu")
    monkeypatch.undo()
    assert len(batches) == 2  # of 6: the validation loss's 3 and the COCO evaluation's 3
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 3 and state["epoch_ended"] is False
    assert _val_rows(tmp_path) == [] and not (tmp_path / "best.safetensors").exists()
    train(_validated(shapes), tmp_path, resume=True, device="cpu")
    assert _val_rows(tmp_path) == _val_rows(straight)
    assert _same_weights(tmp_path, straight, "best.safetensors")
    assert _same_weights(tmp_path, straight, "last.safetensors")
    assert _losses(tmp_path) == _losses(straight)


def test_train_takes_a_recipe_name_a_yaml_file_or_a_partial_dict(tmp_path, monkeypatch):
    seen = []

    class Recorder:  # the config the run would get, without training
        def __init__(self, config: dict, *args) -> None:
            seen.append(config)

        def run(self, stop, resume: bool) -> dict:
            return {}

    monkeypatch.setattr(trainer, "Trainer", Recorder)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  epochs: 7\n")
    partial = {"train": {"epochs": 3}, "model": {"options": {"fc_dim": 64}}}
    for config in ("quickstart", recipe, partial):
        train(config, tmp_path / "run", device="cpu")
    assert seen[0] == load_config("quickstart")
    assert seen[1] == load_config(None, ["train.epochs=7"])
    assert seen[2] == load_config(None, ["train.epochs=3", "model.options={fc_dim: 64}"])
    assert partial == {"train": {"epochs": 3}, "model": {"options": {"fc_dim": 64}}}
    with pytest.raises(ConfigError, match=r"^config: train\.epochs=0: expected an integer >= 1$"):
        train({"train": {"epochs": 0}}, tmp_path / "run", device="cpu")
    with pytest.raises(ConfigError, match="unknown config key 'train.epoch'"):
        train({"train": {"epoch": 3}}, tmp_path / "run", device="cpu")


def test_resume_without_checkpoint_and_reusing_a_run_are_clear_errors(shapes, tmp_path, capsys):
    with pytest.raises(ValueError, match="no checkpoint to resume from"):
        train(tiny_config(shapes), tmp_path, resume=True, device="cpu")
    train(tiny_config(shapes, max_steps=1), tmp_path, device="cpu")
    with pytest.raises(ValueError, match="already holds a run; continue it with --resume"):
        train(tiny_config(shapes), tmp_path, device="cpu")
    shutil.rmtree(tmp_path / "checkpoints")  # to start over; the weights stay
    with pytest.raises(ValueError, match="holds an earlier run's last.safetensors; remove"):
        train(tiny_config(shapes), tmp_path, device="cpu")
    (tmp_path / "config.yaml").write_text("")  # damaged: the defaults must not stand in for it
    assert cli_main(["train", "--resume", "--out", str(tmp_path)]) == 2
    assert "config.yaml: empty; give the run's config" in capsys.readouterr().err


def test_training_stops_on_broken_data_with_the_report(shapes, tmp_path):
    data = json.loads(shapes["train"].read_text())
    data["annotations"][0]["category_id"] = 99
    data["images"][1]["file_name"] = "missing.png"
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(data))
    cfg = tiny_config(shapes)
    cfg["data"]["train"]["annotations"] = str(broken)
    with pytest.raises(DataError) as err:
        train(cfg, tmp_path / "run", device="cpu")
    assert "broken.json" in str(err.value)
    assert "99" in str(err.value) and "missing.png" in str(err.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(shapes, tmp_path, monkeypatch):
    train(tiny_config(shapes, epochs=1), tmp_path, device="cpu")
    good = load_file(tmp_path / "last.safetensors")

    def nan_mask_loss(*args):
        return torch.tensor(float("nan"), requires_grad=True)

    monkeypatch.setattr(rcnn, "_mask_loss", nan_mask_loss)
    cfg = tiny_config(shapes, epochs=3, max_nonfinite=2)
    with pytest.raises(TrainingError, match="not finite for 2 steps in a row"):
        train(cfg, tmp_path, resume=True, device="cpu")
    after = load_file(tmp_path / "last.safetensors")
    assert all(torch.equal(good[k], after[k]) for k in good)


def test_two_process_ddp_on_gloo(shapes, tmp_path):
    """Two processes train, then share the validation loss and COCO evaluation: the logged
    numbers are exactly those of a single-process evaluation of the saved weights."""
    cfg = tiny_config(shapes, epochs=2, batch_size=4, eval_every=2, dist_timeout_min=5)
    cfg["data"]["val"] = {"annotations": str(shapes["val"]), "images": str(shapes["images"])}
    cfg_file = tmp_path / "cfg.yaml"
    spinedet.config.save_config(cfg, cfg_file)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "-m",
        "spinedet.cli",
        "train",
        str(cfg_file),
        "--out",
        str(tmp_path / "run"),
        "--device",
        "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 6 training images, 3 per process, batch 2 per process: one step per epoch
    assert len(_losses(tmp_path / "run")) == 2
    assert (tmp_path / "run" / "last.safetensors").is_file()
    assert "world size 2" in (tmp_path / "run" / "log.txt").read_text()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (val,) = [r for r in rows if r["kind"] == "val"]
    weights = tmp_path / "run" / "last.safetensors"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the arithmetic of the training processes (OMP_NUM_THREADS=1)
    try:
        single = evaluate(weights, shapes["val"], shapes["images"], batch_size=2, device="cpu",
                          workers=0)  # fmt: skip
        model = spinedet.load_model(weights)
        dataset = CocoDataset(shapes["val"], shapes["images"], eval_transforms(), masks=True)
        loss = sharded_val_loss(model, dataset, 2, torch.device("cpu"), seed=0)
    finally:
        torch.set_num_threads(threads)
    flat = flat_metrics(single)
    differ = {k: (val.get(k), v) for k, v in flat.items() if val.get(k) != v}
    assert flat and not differ, differ
    assert val["val_loss"] == pytest.approx(loss, rel=1e-9)


def _dying_peer_worker(rank: int, port: int, cfg: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2")  # fmt: skip
    torch.set_num_threads(1)
    if rank == 1:  # dies (as by SIGKILL) in its second step, after rank 0 saved the first
        steps, original = [], loop.Stepper.step

        def step_then_die(self):
            original(self)
            steps.append(1)
            if len(steps) == 2:
                os._exit(0)

        loop.Stepper.step = step_then_die
    try:
        train(cfg, out, device="cpu")
    except trainer.PeerLostError as e:
        Path(out, f"error.{rank}").write_text(str(e))


def test_a_dead_peer_is_one_line_naming_the_checkpoint_and_how_to_resume(shapes, tmp_path):
    """The survivor's next collective fails; it says so in one line (not gloo's traceback),
    with the checkpoint it leaves and the resume command."""
    cfg = tiny_config(shapes, epochs=4, batch_size=4, dist_timeout_min=1)  # a step an epoch
    run = tmp_path / "run"
    mp.spawn(_dying_peer_worker, (free_port(), cfg, str(run)), nprocs=2)
    (message,) = [p.read_text() for p in run.glob("error.*")]
    # gloo's reason (closed, reset, ...) depends on timing; its source line and advice are cut.
    assert re.fullmatch(
        r"rank 0: another process of the run ended or lost its connection \((?!\[)[^\n]+\); the "
        rf"last checkpoint is {re.escape(str(run / 'checkpoints' / 'last.pt'))} \(step 1\): "
        rf"continue with train --resume --out {re.escape(str(run))}, launched as before",
        message,
    ), message
    assert "gloo/transport" not in message and "remote worker" not in message
    assert lost_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None


def test_sigterm_checkpoints_and_resume_finishes_the_run(shapes, tmp_path):
    cfg = tiny_config(shapes, epochs=20)
    cfg_file = tmp_path / "cfg.yaml"
    spinedet.config.save_config(cfg, cfg_file)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "spinedet.cli", "train", str(cfg_file), "--out", str(run),
           "--device", "cpu"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(_read(run / "metrics.jsonl")) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # a scheduler's stop; Ctrl-C's SIGINT is the same but 130
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    assert "continue with --resume" in err
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert 2 <= state["step"] < 60
    code = subprocess.run([*cmd, "--resume"], capture_output=True, timeout=600).returncode
    assert code == 0
    assert len(_losses(run)) == 20 * 3


# Runs the CLI with SIG sent to itself when HOOK (module:function) is first called.
_SIGNAL_AT = """
import importlib, os, signal, sys
from spinedet.cli import main
module, name = os.environ["HOOK"].split(":")
module = importlib.import_module(module)
original = getattr(module, name)
def signal_then_call(*args, **kwargs):
    os.kill(os.getpid(), getattr(signal, os.environ["SIG"]))
    return original(*args, **kwargs)
setattr(module, name, signal_then_call)
sys.exit(main(sys.argv[1:]))
"""


def test_a_signal_before_training_stops_at_once_in_one_line(shapes, tmp_path):
    """SIGTERM in a run's first seconds (torch loading, data check, model building) was a silent
    kill: it now says, as SIGINT does, that training had not begun and what is on disk."""
    cfg_file = tmp_path / "cfg.yaml"
    spinedet.config.save_config(tiny_config(shapes, epochs=2), cfg_file)
    resumed = tmp_path / "resumed"
    train(tiny_config(shapes, epochs=1), resumed, device="cpu")
    runs = {  # run directory: (hook, signal, --resume, exit code, the line said)
        tmp_path / "fresh": ("spinedet.engine.runtime:configure_cpu_threads", "SIGTERM", False,
                             143, "stopped before training began; nothing was written"),
        tmp_path / "built": ("spinedet.engine.trainer:build_model", "SIGTERM", False, 143,
                             "stopped before training began; no checkpoint was written: start "
                             "the run again"),
        resumed: ("spinedet.engine.trainer:build_model", "SIGINT", True, 130,
                  f"stopped before training began; the last checkpoint is {resumed}/checkpoints"
                  f"/last.pt (step 3): continue with train --resume --out {resumed}"),
    }  # fmt: skip
    procs = {}
    for run, (hook, sig, resume, _, _) in runs.items():
        cmd = [sys.executable, "-c", _SIGNAL_AT, "train", str(cfg_file), "--out", str(run),
               "--device", "cpu", *(["--resume"] if resume else [])]  # fmt: skip
        env = {**os.environ, "HOOK": hook, "SIG": sig}
        procs[run] = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    for run, (_, _, _, code, said) in runs.items():
        _, err = procs[run].communicate(timeout=300)
        assert (procs[run].returncode, err.splitlines()[-1:]) == (code, [f"spinedet: {said}"]), err
        assert "Traceback" not in err
    assert not (tmp_path / "fresh").exists()
    assert not (tmp_path / "built" / "checkpoints").exists()
    state = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 3 and len(_losses(resumed)) == 3


def test_a_rank_waiting_for_its_peers_dies_at_once_on_a_signal(shapes, tmp_path):
    """Joining the process group waits in C++ for the peers, where Python's handlers would run
    only at its timeout: there SIGTERM keeps its default, a kill, as before any handler."""
    cfg_file = tmp_path / "cfg.yaml"
    spinedet.config.save_config(tiny_config(shapes, epochs=1), cfg_file)
    cmd = [sys.executable, "-c", _SIGNAL_AT, "train", str(cfg_file), "--out",
           str(tmp_path / "run"), "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "HOOK": "torch.distributed:init_process_group", "SIG": "SIGTERM",
           "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == -signal.SIGTERM, proc.stderr  # not 143 from a Python handler


def _read(path):
    return path.read_text().splitlines() if path.exists() else []


def test_fine_tuning_from_converted_model_garden_weights(shapes, tmp_path, caplog):
    """A converted Mask R-CNN with 3 classes fine-tunes on the 4 shapes classes: the file's
    architecture (head widths, activation, reduced backbone) is kept, every tensor but the
    class-dependent ones loads."""
    fixture = Path(__file__).parent / "fixtures" / "tf_maskrcnn"
    arch = json.loads((fixture / "fixture.json").read_text())["kwargs"]
    weights = tmp_path / "mg.safetensors"
    convert_tf(fixture, "spinenet49s_maskrcnn", weights, activation="swish", **arch)
    cfg = tiny_config(shapes, epochs=1)
    cfg["model"]["weights"] = str(weights)
    cfg["model"]["options"] = {"box_batch_size_per_image": 32}  # no architecture options
    with caplog.at_level("INFO"):
        train(cfg, tmp_path / "run", device="cpu")
    log = caplog.text
    assert "model options from" in log and "activation='swish'" in log and "fc_dim=32" in log
    fresh = log.split("kept 6 freshly initialised tensors: ")[1].splitlines()[0]
    assert fresh.startswith("roi_heads.box_predictor.") and "mask_fcn_logits" in fresh
    assert (
        f"kept 6 freshly initialised tensors: {fresh}" in (tmp_path / "run" / "log.txt").read_text()
    )
    model = spinedet.load_model(tmp_path / "run" / "last.safetensors")
    assert isinstance(model.backbone.act, torch.nn.SiLU)
    assert model.roi_heads.box_head[-3].out_features == 32
    assert model.class_names == ["circle", "square", "triangle", "star"]


def test_a_mask_model_evaluates_boxes_on_annotations_without_masks(shapes, tmp_path, caplog):
    model = spinedet.create_model("spinenet49s_maskrcnn", image_size=64, categories=json.loads(
        Path(shapes["val"]).read_text())["categories"], **TINY_MODEL)  # fmt: skip
    save_weights(model, tmp_path / "m.safetensors")
    boxes_only = json.loads(Path(shapes["val"]).read_text())
    for ann in boxes_only["annotations"]:
        del ann["segmentation"]
    (tmp_path / "boxes.json").write_text(json.dumps(boxes_only))
    with caplog.at_level("WARNING"):
        metrics = evaluate(tmp_path / "m.safetensors", tmp_path / "boxes.json", shapes["images"],
                           device="cpu", workers=0)  # fmt: skip
    assert set(metrics) == {"bbox"} and "box AP only" in caplog.text
    full = evaluate(tmp_path / "m.safetensors", shapes["val"], shapes["images"], device="cpu",
                    workers=0)  # fmt: skip
    assert set(full) == {"bbox", "segm"} and full["bbox"] == metrics["bbox"]
