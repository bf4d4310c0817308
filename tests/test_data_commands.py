import argparse
import json
import subprocess
import sys

import pytest

from spinedet.cli import main
from spinedet.cli.data import add_data_commands


def _run(*argv):
    parser = argparse.ArgumentParser(prog="spinedet")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", *argv])
    return args.func(args)


def test_shapes_check_split_round_trip(tmp_path, capsys):
    out = tmp_path / "shapes"
    argv = ["--num-images", "12", "--size", "64x48", "--max-instances", "2"]
    assert _run("shapes", "--out", str(out), *argv) == 0
    data = json.loads((out / "annotations.json").read_text())
    assert len(data["images"]) == 12 and data["images"][0]["width"] == 64
    assert len(data["annotations"]) <= 24

    assert _run("check", str(out / "annotations.json"), "--images", str(out / "images")) == 0
    assert "no problems found" in capsys.readouterr().out

    split = tmp_path / "split"
    argv = ["split", str(out / "annotations.json"), "--ratios", "2", "1", "--out", str(split)]
    assert _run(*argv, "--seed", "5") == 0
    assert f"val: {split / 'val.json'}" in capsys.readouterr().out
    assert sorted(p.name for p in split.iterdir()) == ["train.json", "val.json"]


def test_help_and_data_commands_do_not_load_torch(tmp_path):
    # Loading torch and torchvision takes ~5 s: `--help`, `data shapes`, `check` and `split` need
    # neither, and a package import that slipped back to eager would bring them in.
    out, ann = tmp_path / "shapes", tmp_path / "shapes" / "annotations.json"
    script = f"""
import sys
from spinedet.cli import build_parser, main
try:
    build_parser().parse_args(["--help"])
except SystemExit:
    pass
assert main(["data", "shapes", "--out", {str(out)!r}, "--num-images", "6", "--size", "48"]) == 0
assert main(["data", "check", {str(ann)!r}, "--images", {str(out / "images")!r}]) == 0
assert main(["data", "split", {str(ann)!r}, "--ratios", "1", "1", "--out", {str(tmp_path)!r}]) == 0
print("loaded:", sorted(m for m in ("torch", "torchvision") if m in sys.modules))
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "loaded: []" in proc.stdout
    assert (out / "annotations.json").is_file() and (tmp_path / "val.json").is_file()


def test_check_exits_1_and_prints_problems(tmp_path, capsys):
    (tmp_path / "a.json").write_text('{"images": [{"id": 1, "file_name": "x.png", '
                                     '"width": 4, "height": 4}], "annotations": [], '
                                     '"categories": []}')  # fmt: skip
    assert _run("check", str(tmp_path / "a.json"), "--images", str(tmp_path)) == 1
    out = capsys.readouterr().out
    assert f"{tmp_path / 'x.png'}: image 1: file not found" in out
    assert out.strip().endswith("1 problem: 1 missing file")


def test_errors_exit_2_with_one_line(tmp_path, capsys):
    (tmp_path / "a.json").write_text("{")
    assert main(["data", "split", str(tmp_path / "a.json"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"spinedet: error: {tmp_path / 'a.json'}: invalid JSON")
    assert len(err.strip().splitlines()) == 1
    (tmp_path / "b.json").write_text('{"images": [], "annotations": [], "categories": []}')
    argv = ["data", "split", str(tmp_path / "b.json"), "--ratios", "1", "0", "--out", "x"]
    assert main(argv) == 2
    assert "positive" in capsys.readouterr().err
    assert main(["data", "shapes", "--out", str(tmp_path), "--num-images", "0"]) == 2
    assert main(["data", "shapes", "--out", str(tmp_path), "--max-instances", "0"]) == 2
    assert "max_instances 0" in capsys.readouterr().err


def test_bad_size_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit):
        _run("shapes", "--out", str(tmp_path), "--size", "big")


def test_show_draws_ground_truth_and_augmentations(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    data = tmp_path / "shapes"
    assert _run("shapes", "--out", str(data), "--num-images", "3", "--size", "96") == 0
    ann = str(data / "annotations.json")
    out = tmp_path / "show"
    argv = ["show", ann, "--images", str(data / "images"), "--out", str(out), "--num", "2",
            "--augmented", "2", "--set", "model.image_size=64"]  # fmt: skip
    assert _run(*argv) == 0
    assert "drew 6 image(s)" in capsys.readouterr().out
    drawn = sorted(p.name for p in out.rglob("*.png"))
    assert len(drawn) == 6 and sum("_aug" in name for name in drawn) == 4
    gt = next(p for p in out.rglob("*.png") if "_aug" not in p.name)
    original = np.asarray(Image.open(data / "images" / gt.name))
    shown = np.asarray(Image.open(gt))
    assert shown.shape == original.shape and (shown != original).any()  # something drawn
    aug = next(p for p in out.rglob("*.png") if "_aug" in p.name)
    assert Image.open(aug).size == (64, 64)  # the training crop of model.image_size
    again = tmp_path / "again"
    assert _run(*argv[:5], str(again), *argv[6:]) == 0  # the same drawings every run
    assert (np.asarray(Image.open(aug)) == np.asarray(Image.open(again / aug.name))).all()
    assert main(["data", *argv]) == 2  # never replaces drawings without --overwrite
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["data", "show", ann, "--images", str(data), "--out", str(out),
                 "--ids", "999"]) == 2  # fmt: skip
    assert "no image with id 999" in capsys.readouterr().err


def test_show_draws_boxes_where_the_loader_takes_no_masks(tmp_path, capsys):
    """A crowd without its region: the loader refuses its masks, so show draws boxes only."""
    import json

    data = tmp_path / "shapes"
    assert _run("shapes", "--out", str(data), "--num-images", "2", "--size", "64") == 0
    ann = data / "annotations.json"
    content = json.loads(ann.read_text())
    crowd = {**content["annotations"][0], "id": 999, "iscrowd": 1}
    del crowd["segmentation"]
    content["annotations"].append(crowd)
    ann.write_text(json.dumps(content))
    out = tmp_path / "show"
    assert _run("show", str(ann), "--images", str(data / "images"), "--out", str(out)) == 0
    assert "drew 2 image(s)" in capsys.readouterr().out


def test_every_option_has_help():
    from spinedet.cli import build_parser

    def options(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from options(sub, [*path, name])
            else:
                yield " ".join(path), action

    found = list(options(build_parser(), ["spinedet"]))
    assert len(found) > 80  # every command was walked
    assert [(cmd, a.dest) for cmd, a in found if not a.help] == []
