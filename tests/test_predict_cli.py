"""eval / predict from the command line, with the user's category ids and names."""

import json

import pytest
from conftest import TINY_MODEL
from PIL import Image

import spinedet
from spinedet.cli import main


@pytest.fixture(scope="module")
def checkpoint(shapes, tmp_path_factory):
    """Untrained tiny weights with the shapes categories, saved as training would save them."""
    categories = json.loads(shapes["annotations"].read_text())["categories"]
    model = spinedet.create_model("spinenet49s_maskrcnn", categories=categories, image_size=64,
                                  box_score_thresh=0.0, **TINY_MODEL)  # fmt: skip
    path = tmp_path_factory.mktemp("ckpt") / "best.safetensors"
    spinedet.save_weights(model, path)
    return path


def test_predict_draws_images_and_writes_user_ids(checkpoint, shapes, tmp_path):
    images = sorted(shapes["images"].iterdir())[:3]
    code = main(["predict", str(checkpoint), *map(str, images), "--out", str(tmp_path),
                 "--score-threshold", "0"])  # fmt: skip
    assert code == 0
    for image in images:
        drawn = Image.open(tmp_path / f"{image.stem}.png")
        assert drawn.size == Image.open(image).size
    results = json.loads((tmp_path / "predictions.json").read_text())
    assert results, "an untrained model with threshold 0 still returns detections"
    names = {3: "circle", 7: "square", 11: "triangle", 20: "star"}
    assert all(names[r["category_id"]] == r["category_name"] for r in results)
    assert {"bbox", "score", "segmentation", "file_name"} <= set(results[0])


def test_eval_writes_metrics_and_results(checkpoint, shapes, tmp_path, capsys):
    code = main(["eval", str(checkpoint.parent), "--annotations", str(shapes["val"]),
                 "--images", str(shapes["images"]), "--out", str(tmp_path)])  # fmt: skip
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) == {"bbox", "segm"}
    assert set(metrics["segm"]["per_class"]) == {"circle", "square", "triangle", "star"}
    assert isinstance(json.loads((tmp_path / "results.json").read_text()), list)
    for name in ("pr_curve_segm.png", "confusion_bbox.csv", "per_class.csv"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "per-class segm AP" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["info", "spinenet49_maskrnn"], "did you mean spinenet49_maskrcnn"),
        (["predict", "missing.safetensors", "x.png", "--out", "o"], "missing.safetensors: no such"),
        (["train", "nope.yaml", "--out", "o"], "nope.yaml: no such config file"),
    ],
)
def test_cli_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_info_json(capsys):
    assert main(["info", "spinenet49s", "--size", "128", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == 9_089_215 and len(info["levels"]) == 5


def test_export_from_run_directory_checks_with_onnxruntime(checkpoint, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    assert main(["export", str(checkpoint.parent), "--format", "onnx", "--out", str(out)]) == 0
    assert out.stat().st_size > 0 and out.stat().st_mode & 0o044  # readable like any file
    assert "diff" in capsys.readouterr().out
