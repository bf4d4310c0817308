"""Training and evaluating classifiers: the loss the engine trains, ImageFolder data (the shapes
tree, one-line errors) and a run through ``train()`` whose accuracy evaluation agrees with a
separate one."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from spinedet.cli import main
from spinedet.config import load_config
from spinedet.data import DataError, ImageFolderDataset, make_shape_classes
from spinedet.data.transforms import classification_eval_transforms
from spinedet.engine.builders import build_datasets
from spinedet.engine.classification import evaluate_classifier
from spinedet.engine.trainer import train
from spinedet.errors import SpinedetError
from spinedet.models import load_model
from spinedet.models.classifier import spinenet_classifier
from spinedet.predictor import Predictor

SMALL = {"filter_scale": 0.25, "endpoint_filters": 32}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shape_classes(tmp_path_factory.mktemp("cls"), num_images=40, size=32)


def test_training_loss_is_cross_entropy_with_label_smoothing():
    torch.manual_seed(0)
    model = spinenet_classifier("49s", 4, label_smoothing=0.1, **SMALL).train()
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 3, 1])
    torch.manual_seed(1)
    losses = model(list(images), [{"labels": y} for y in labels])
    torch.manual_seed(1)  # the same drop-path and BN batch as above
    logits = model(images)
    assert set(losses) == {"loss_classifier"} and logits.shape == (3, 4)
    expected = F.cross_entropy(logits, labels, label_smoothing=0.1)
    torch.testing.assert_close(losses["loss_classifier"], expected)
    assert not torch.allclose(expected, F.cross_entropy(logits, labels))


def test_shapes_tree_has_one_balanced_class_folder_per_shape(shapes, tmp_path):
    counts = {s: {c.name: len(list(c.iterdir())) for c in p.iterdir()} for s, p in shapes.items()}
    assert counts["train"] == dict.fromkeys(["circle", "square", "triangle", "star"], 8)
    assert sum(counts["val"].values()) == 4 and sum(counts["test"].values()) == 4
    assert main(["data", "shapes", "--classification", "--out", str(tmp_path), "--num-images",
                 "8", "--size", "32", "--splits", "1"]) == 0  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]
    with pytest.raises(DataError, match="train: exists and is not empty"):
        make_shape_classes(tmp_path, num_images=8, size=32, splits=(1,))


def test_bad_image_folders_are_one_line_errors(shapes, tmp_path):
    with pytest.raises(DataError, match="nowhere: no such directory"):
        ImageFolderDataset(tmp_path / "nowhere")
    with pytest.raises(DataError, match="not an ImageFolder tree: Couldn't find any class"):
        ImageFolderDataset(tmp_path)
    with pytest.raises(DataError, match="class folder.s. circle, square, star, triangle not "):
        ImageFolderDataset(shapes["val"], classes=["cat", "dog"])
    cfg = load_config(None, ["model.name=spinenet49s_classifier"])
    with pytest.raises(SpinedetError, match=r"^data.train.images is not set"):
        build_datasets(cfg)
    for message in ("nowhere: no such directory", "Couldn't find any class"):
        try:
            ImageFolderDataset(tmp_path / "nowhere" if "nowhere" in message else tmp_path)
        except DataError as e:
            assert "\n" not in str(e)


def test_folders_map_by_order_after_a_background_class(shapes):
    classes = ["background", "a", "b", "c", "d"]
    data = ImageFolderDataset(shapes["val"], classes=classes, by_order=True)
    samples = zip(data.folder.samples, data.labels, strict=True)
    by_folder = {Path(path).parent.name: label for (path, _), label in samples}
    assert by_folder == {"circle": 1, "square": 2, "star": 3, "triangle": 4}
    assert ImageFolderDataset(shapes["val"], classes=classes[1:], by_order=True).labels == [
        y - 1 for y in data.labels
    ]
    for wrong in (["x", *classes[1:]], [*classes, "e"]):
        with pytest.raises(DataError, match="4 class folders for the model's . classes: by order"):
            ImageFolderDataset(shapes["val"], classes=wrong, by_order=True)


def test_val_classes_map_by_name(shapes):
    names = ["star", "circle", "square", "triangle", "hexagon"]
    data = ImageFolderDataset(shapes["val"], classes=names)
    samples = zip(data.folder.samples, data.labels, strict=True)
    by_folder = {Path(path).parent.name: label for (path, _), label in samples}
    assert by_folder == {"star": 0, "circle": 1, "square": 2, "triangle": 3}


def test_train_a_classifier_and_evaluate_it_the_same(shapes, tmp_path, capsys):
    cfg = load_config(None, [
        "model.name=spinenet49s_classifier", "model.image_size=32",
        f"model.options={json.dumps({**SMALL, 'label_smoothing': 0.1})}",
        f"data.train.images={shapes['train']}", f"data.val.images={shapes['val']}",
        "data.workers=0", "train.epochs=2", "train.batch_size=8", "train.base_batch=8",
        "train.base_lr=0.05", "train.warmup_steps=2", "train.schedule=cosine",
    ])  # fmt: skip
    result = train(cfg, tmp_path / "run", device="cpu")
    assert result["step"] == 8
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    val = [r for r in rows if r["kind"] == "val"]
    assert [r["epoch"] for r in val] == [1, 2]
    assert {"accuracy/top1", "accuracy/top5", "top1_per_class/star"} <= set(val[-1])
    assert val[-1]["accuracy/top5"] == 1.0  # 4 classes: the top 5 hold them all
    assert result["best"] == max(r["accuracy/top1"] for r in val)
    model = load_model(tmp_path / "run" / "last.safetensors")
    assert model.label_smoothing == 0.1
    data = ImageFolderDataset(shapes["val"], classification_eval_transforms(32),
                              [c.name for c in model.description.categories])  # fmt: skip
    metrics = evaluate_classifier(model, data, torch.device("cpu"), progress=False)
    assert metrics["top1"] == pytest.approx(val[-1]["accuracy/top1"])
    assert metrics["loss"] == pytest.approx(val[-1]["val_loss"], rel=1e-5)
    assert sum(r["images"] for r in metrics["per_class"].values()) == len(data) == 4
    # The command line gives the same numbers, worst class first.
    out = tmp_path / "eval"
    argv = ["eval", str(tmp_path / "run" / "last.safetensors"), "--images", str(shapes["val"]),
            "--out", str(out), "--workers", "0", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    written = json.loads((out / "metrics.json").read_text())
    assert written["top1"] == pytest.approx(metrics["top1"])
    assert written["per_class"] == metrics["per_class"]  # counts and 0/1 fractions: exact
    (tmp_path / "odd" / "hexagon").mkdir(parents=True)
    star = next((shapes["val"] / "star").iterdir())
    (tmp_path / "odd" / "hexagon" / "a.png").write_bytes(star.read_bytes())
    argv[3], argv[5] = str(tmp_path / "odd"), str(tmp_path / "odd_eval")  # out: a new folder
    capsys.readouterr()
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "class folder(s) hexagon not among the model's 4" in error
    assert main([*argv, "--tile", "64"]) == 2  # a classifier sees each image whole
    assert capsys.readouterr().err.endswith("tile (--tile): a classifier sees each image whole\n")
    # --by-order: folders named otherwise (ImageNet's synsets) are the classes in sorted order.
    for i, name in enumerate(["circle", "square", "star", "triangle"]):
        shutil.copytree(shapes["val"] / name, tmp_path / "synsets" / f"n0{i}")
    argv[3], argv[5] = str(tmp_path / "synsets"), str(tmp_path / "by_order")
    assert main([*argv, "--by-order"]) == 0
    by_order = json.loads((tmp_path / "by_order" / "metrics.json").read_text())
    assert by_order["per_class"] == written["per_class"]
    # predict prints each image's top-k names (all 4 classes at --top-k 9) and writes them.
    capsys.readouterr()
    images = str(shapes["test"] / "star")
    run = str(tmp_path / "run")
    assert main(["predict", run, images, "--out", str(tmp_path / "p"), "--device", "cpu",
                 "--top-k", "9"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("000039: ") and len(lines[0].split(", ")) == 4
    entries = json.loads((tmp_path / "p" / "predictions.json").read_text())
    assert {e["category_name"] for e in entries} == {"circle", "square", "star", "triangle"}
    assert sum(e["score"] for e in entries) == pytest.approx(1.0, abs=1e-4)
    top = Predictor(run, "cpu", top_k=2)(next(Path(images).iterdir()))
    assert top.names == [e["category_name"] for e in entries[:2]] and len(top) == 2


def test_a_small_classifier_learns_the_class_coloured_shapes(tmp_path, capsys):
    """The easy set (each class in its own hue): 64 training images at 32 px, 64 steps; chance
    is 0.25."""
    data = tmp_path / "data"
    argv = ["data", "shapes", "--classification", "--class-colours", "--out", str(data),
            "--num-images", "80", "--size", "32"]  # fmt: skip
    assert main(argv) == 0
    assert main(argv[:2] + argv[3:]) == 2  # --class-colours needs --classification
    assert "--class-colours applies with --classification" in capsys.readouterr().err
    cfg = load_config(None, [
        "model.name=spinenet49s_classifier", "model.image_size=32",
        f"model.options={json.dumps(SMALL)}", f"data.train.images={data / 'train'}",
        f"data.val.images={data / 'val'}", "data.workers=0", "train.epochs=8",
        "train.batch_size=8", "train.base_batch=8", "train.base_lr=0.2",
        "train.warmup_steps=2", "train.schedule=cosine", "train.clip_grad=0",
    ])  # fmt: skip
    result = train(cfg, tmp_path / "run", device="cpu")
    assert result["best"] >= 0.75  # top-1 on the 8 validation images
    model = load_model(tmp_path / "run" / "best.safetensors")
    test = ImageFolderDataset(data / "test", classification_eval_transforms(32),
                              [c.name for c in model.description.categories])  # fmt: skip
    assert evaluate_classifier(model, test, torch.device("cpu"), progress=False)["top1"] >= 0.75
