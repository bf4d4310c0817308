"""``spinedet info`` on every kind of source, the per-module table, ``config show``."""

import json

import pytest
import yaml
from conftest import TINY_MODEL
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

import spinedet
from spinedet.cli import main
from spinedet.info import count_macs, module_table


def test_info_on_weights_run_directory_and_recipe(tmp_path, capsys):
    model = spinedet.create_model("spinenet49s_retinanet", num_classes=3, filter_scale=0.25)
    spinedet.save_weights(model, tmp_path / "best.safetensors")
    for source in (tmp_path / "best.safetensors", tmp_path):
        assert main(["info", str(source), "--size", "64", "96", "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["model"] == "spinenet49s_retinanet" and info["image_size"] == [64, 96]
        assert info["params"] == sum(p.numel() for p in model.parameters())
        assert info["gflops"] == round(count_macs(model, (64, 96)) / 1e9, 2)
    assert main(["info", "quickstart", "--size", "64", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"] == "spinenet49s_maskrcnn" and info["image_size"] == [64, 64]


def test_info_on_a_missing_file_is_no_such_file_not_an_unknown_model(tmp_path, capsys):
    for missing in (tmp_path / "nonexist.safetensors", tmp_path / "run", "x.pt"):
        assert main(["info", str(missing)]) == 2
        assert f"{missing}: no such file" in capsys.readouterr().err
    assert main(["info", "spinenet49x"]) == 2
    assert "unknown model 'spinenet49x'" in capsys.readouterr().err


def test_an_error_under_torchrun_is_what_its_summary_of_failed_ranks_shows(
    tmp_path, capsys, monkeypatch
):
    error_file = tmp_path / "attempt_0" / "0" / "error.json"
    error_file.parent.mkdir(parents=True)
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))  # as torchrun sets it
    assert main(["info", str(tmp_path / "run.safetensors")]) == 2
    printed = capsys.readouterr().err.strip()
    assert printed == f"spinedet: error: {tmp_path / 'run.safetensors'}: no such file"
    # What torchrun's agent reads of a failed process, and prints when it stops the run.
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=2, error_file=str(error_file))
    summary = ChildFailedError("spinedet.cli", {0: failure}).format_msg()
    assert f"traceback : {printed}\n" in summary and "To enable traceback" not in summary


def test_module_table_adds_up():
    model = spinedet.create_model("spinenet49s_maskrcnn", num_classes=3, **TINY_MODEL)
    rows = module_table(model, (64, 96), depth=1)
    assert [r["name"] for r in rows] == ["MaskRCNN", "transform", "backbone", "rpn", "roi_heads"]
    assert rows[0]["macs"] == count_macs(model, (64, 96)) == sum(r["macs"] for r in rows[1:])
    assert rows[2]["macs"] == count_macs(model.backbone, (64, 96))
    assert rows[0]["params"] == sum(r["params"] for r in rows[1:])


def test_info_depth_table_and_config_show(capsys):
    assert main(["info", "spinenet49s", "--size", "64", "--depth", "1"]) == 0
    out = capsys.readouterr().out
    assert "mult-adds" in out and "  stem " in out
    assert main(["config", "show", "quickstart", "--set", "train.epochs=3"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["train"]["epochs"] == 3 and config["model"]["image_size"] == 192
    assert {"model", "data", "train"} <= set(config)
    assert main(["config", "show", "nope"]) == 2
    assert "nope: no such config file" in capsys.readouterr().err


def test_out_of_range_option_values_are_usage_errors_naming_the_option(capsys):
    cases = [
        (
            ["info", "spinenet49s", "--size", "0"],
            "argument --size: expected an integer >= 32, got 0",
        ),
        (["info", "spinenet49s", "--depth", "-1"], "argument --depth: expected an integer >= 0"),
        (
            ["eval", "run", "--images", "x", "--batch-size", "0"],
            "--batch-size: expected an integer >= 1",
        ),
        (
            ["eval", "run", "--images", "x", "--workers", "-1"],
            "--workers: expected an integer >= 0",
        ),
        (
            ["predict", "run", "a.mp4", "--out", "o", "--every", "0"],
            "--every: expected an integer >= 1",
        ),
        (
            ["predict", "run", "a.png", "--out", "o", "--top-k", "x"],
            "--top-k: expected an integer, got 'x'",
        ),
        (
            ["predict", "run", "a.png", "--out", "o", "--max-detections", "0"],
            "--max-detections: expected an integer >= 1, got 0",
        ),
        (
            ["data", "show", "a.json", "--images", "i", "--out", "o", "--num", "-1"],
            "--num: expected",
        ),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2
        assert message in capsys.readouterr().err.splitlines()[-1], argv
