"""Export: the whole detector to ONNX and TorchScript matches PyTorch detection for detection
at two sizes and batch sizes other than the traced one; the dense part still exports."""

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
import torchvision
from conftest import TINY_MODEL
from torch import nn
from torchvision.models.detection.image_list import ImageList

import spinedet.export as export
import spinedet.export.graph as graph_module
from spinedet import create_model, save_weights
from spinedet.cli.export import add_export_commands
from spinedet.errors import SpinedetError
from spinedet.export import ExportError, export_onnx, export_torchscript

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

SMALL = {"filter_scale": 0.25, "endpoint_filters": 32}
CATEGORIES = [{"id": 3, "name": "circle"}, {"id": 7, "name": "square"}]


def spread_scores(model: nn.Module) -> nn.Module:
    """Random weights give every box the same score; a wider class head spreads the scores
    over (0, 1) like a trained model's, so a wrong ranking or NMS changes the detections."""
    with torch.no_grad():
        if hasattr(model, "roi_heads"):
            model.roi_heads.box_predictor.cls_score.weight *= 20
            return model.eval()
        head = model.head.classification_head
        for m in head.conv.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
        head.cls_logits.weight *= 3
        head.cls_logits.bias.view(-1, head.num_classes)[:, 0] = -20  # no background label
    return model.eval()


@pytest.fixture(scope="module")
def retinanet():
    torch.manual_seed(0)
    model = create_model("spinenet49s_retinanet", categories=CATEGORIES, image_size=64,
                         detections_per_img=20, topk_candidates=100, **SMALL)  # fmt: skip
    return spread_scores(model)


@pytest.fixture(scope="module")
def maskrcnn():
    torch.manual_seed(0)
    model = create_model("spinenet49s_maskrcnn", categories=CATEGORIES, image_size=64,
                         box_detections_per_img=20, **TINY_MODEL)  # fmt: skip
    return spread_scores(model)


def test_retinanet_command_exports_onnx_with_metadata(retinanet, tmp_path, capsys):
    weights = tmp_path / "retina.safetensors"
    save_weights(retinanet, weights)
    parser = argparse.ArgumentParser()
    add_export_commands(parser.add_subparsers(dest="command"))
    out = tmp_path / "retina.onnx"
    args = parser.parse_args(["export", str(weights), "--out", str(out)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    # Traced on one 64 x 64 image, checked on batches of 2 at 64 x 48 and 41 x 64.
    assert "onnxruntime matches PyTorch on 4 images (batches of 2, 64x48 and 41x64)" in printed
    detections = int(printed.split(" detections")[0].rsplit(" ", 1)[-1])
    assert detections >= 60  # 20 per image, less those near a score cut-off
    model = onnx.load(str(out))
    meta = {p.key: json.loads(p.value) for p in model.metadata_props}
    assert meta["class_names"] == ["circle", "square"] and meta["category_ids"] == [3, 7]
    assert meta["spinedet_description"]["task"] == "retinanet"
    assert meta["input"]["dtype"] == "uint8" and meta["input"]["image_size"] == 64
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 3, "H", "W"]
    # A batch of 3 at yet another size: category ids, padding after num_detections.
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 50, 64), dtype=np.uint8)
    boxes, scores, labels, count = session.run(None, {"images": images})
    assert boxes.shape == (3, 20, 4) and scores.shape == labels.shape == (3, 20)
    for i, n in enumerate(count):
        assert set(labels[i, :n]) <= {3, 7} and (labels[i, n:] == -1).all()
        assert (scores[i, n:] == 0).all() and (np.diff(scores[i, :n]) <= 0).all()
        assert (boxes[i, :n, 2:] <= [64, 50]).all() and (boxes[i, :n] >= 0).all()


def test_export_with_its_own_thresholds_and_detections_per_image(retinanet, tmp_path):
    weights = tmp_path / "retina.safetensors"
    save_weights(retinanet, weights)
    out = tmp_path / "five.onnx"
    result = export_onnx(weights, out, score_threshold=0.3, nms_threshold=0.2, max_detections=5)
    assert result["check"]["detections"] > 0  # onnxruntime agreed with the model so changed
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).integers(0, 256, (2, 3, 64, 64), dtype=np.uint8)
    boxes, scores, labels, count = session.run(None, {"images": images})
    assert boxes.shape == (2, 5, 4) and count.max() > 0
    for i, n in enumerate(count):
        assert (scores[i, :n] > 0.3).all()
        for a in range(n):  # no two of a class overlap by more than 0.2
            for b in range(a + 1, n):
                if labels[i, a] == labels[i, b]:
                    iou = torchvision.ops.box_iou(torch.tensor(boxes[i, a : a + 1]),
                                                  torch.tensor(boxes[i, b : b + 1]))  # fmt: skip
                    assert float(iou) <= 0.2
    meta = {m.key: json.loads(m.value) for m in onnx.load(str(out)).metadata_props}
    assert meta["selection"] == {"score_thresh": 0.3, "nms_thresh": 0.2, "detections_per_img": 5}
    assert retinanet.detections_per_img == 20  # the weights' model; the module is untouched
    with pytest.raises(ExportError, match="detections_per_img: export from the weights' path"):
        export_onnx(retinanet, tmp_path / "x.onnx", max_detections=5)
    with pytest.raises(ExportError, match="the dense part selects no detections"):
        export_onnx(weights, tmp_path / "y.onnx", dense=True, max_detections=5)


def test_a_check_that_compared_no_detections_says_so(tmp_path, capsys):
    torch.manual_seed(0)
    model = create_model("spinenet49s_retinanet", categories=CATEGORIES, image_size=64,
                         score_thresh=0.999, **SMALL).eval()  # fmt: skip
    weights = tmp_path / "none.safetensors"
    save_weights(model, weights)
    parser = argparse.ArgumentParser()
    add_export_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", str(weights), "--out", str(tmp_path / "none.onnx")])
    assert args.func(args) == 0
    captured = capsys.readouterr()
    assert ": 0 detections" in captured.out
    assert "the check compared no detections" in captured.err


def test_maskrcnn_exports_to_onnx_and_torchscript(maskrcnn, tmp_path):
    out = tmp_path / "mask.onnx"
    result = export_onnx(maskrcnn, out)
    check = result["check"]
    assert check["images"] == 4 and check["detections"] == 80
    assert check["box"] < 1e-3 and check["score"] < 1e-4 and check["mask_iou"] > 0.99
    names = [o.name for o in onnx.load(str(out)).graph.output]
    assert names == ["boxes", "scores", "labels", "num_detections", "masks"]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    masks = session.run(["masks"], {"images": np.zeros((1, 3, 40, 56), np.uint8)})[0]
    assert masks.shape == (1, 20, 40, 56) and masks.dtype == np.uint8

    pt = tmp_path / "mask.pt"
    check = export_torchscript(maskrcnn, pt)["check"]
    assert check["detections"] == 80 and check["mask_iou"] > 0.99
    files = {"spinedet.json": ""}
    loaded = torch.jit.load(str(pt), _extra_files=files)
    assert json.loads(json.loads(files["spinedet.json"])["category_ids"]) == [3, 7]
    assert loaded(torch.zeros(3, 3, 64, 32, dtype=torch.uint8))[4].shape == (3, 20, 64, 32)
    with zipfile.ZipFile(pt) as archive:  # an ordinary TorchScript archive
        assert any(n.endswith("extra/spinedet.json") for n in archive.namelist())


TPU = {"downsample": "tpu", "padding": "fixed", "box_convention": "tpu"}


@pytest.mark.parametrize("task", ["retinanet", "maskrcnn"])
def test_tensorflow_tpu_models_export(task, tmp_path):
    """Converted tensorflow/tpu models: pools sized by level ratios (exact, so the same at every
    size, on inputs padded to 128) and boxes clipped to the last pixel."""
    torch.manual_seed(0)
    heads = {"detections_per_img": 20} if task == "retinanet" else {"box_detections_per_img": 20}
    model = create_model(f"spinenet49s_{task}", categories=CATEGORIES, image_size=384,
                         **heads, **TPU, **SMALL)  # fmt: skip
    assert model.transform.size_divisible == 128
    exporter = export_onnx if task == "retinanet" else export_torchscript
    check = exporter(spread_scores(model), tmp_path / "model")["check"]
    # Traced at 384 x 384; 241 x 384 runs padded to 256 x 384, where a pool sized for the
    # traced widths would be wrong (as it was at a padding to 32).
    assert check["sizes"] == [(384, 288), (241, 384)]
    assert check["detections"] == 80 and check["box"] < 1e-3


def test_tensorflow_tpu_retinanet_corner_boxes_hold_their_places(tmp_path):
    """tensorflow/tpu's NMS skips all-zero boxes after its top-k: eager and exported RetinaNet
    both keep them among each level's best candidates and report none of them."""
    torch.manual_seed(0)
    model = create_model("spinenet49s_retinanet", categories=CATEGORIES, image_size=128,
                         detections_per_img=20, topk_candidates=100, **TPU, **SMALL)  # fmt: skip
    spread_scores(model)
    with torch.no_grad():  # every location's first anchor: far above-left, and the best scored
        model.head.regression_head.bbox_reg.bias.view(-1, 4)[0, :2] = -20
        model.head.classification_head.cls_logits.bias.view(-1, 3)[0, 1:] = 40
    images = [torch.rand(3, 128, 128), torch.rand(3, 96, 128)]
    with torch.no_grad():
        detections = model(images)
    # P3 and P4 hold over 100 such candidates, which fill their top 100; P5 to P7 fewer.
    for d in detections:
        assert 0 < len(d["boxes"]) and not d["boxes"].eq(0).all(1).any()
    check = export_torchscript(model, tmp_path / "model.pt")["check"]
    assert check["detections"] > 0 and check["box"] < 1e-3


def test_broken_postprocessing_fails_the_check_and_writes_nothing(retinanet, tmp_path, monkeypatch):
    # Without NMS the graph returns overlapping boxes PyTorch removes.
    select = graph_module.select_detections
    monkeypatch.setattr(graph_module, "select_detections", lambda *a: select(*a[:5], 1.0, a[6]))
    out = tmp_path / "retina.pt"
    with pytest.raises(ExportError, match=r"disagrees with PyTorch on image 0 at 64x48: "):
        export_torchscript(retinanet, out)
    assert list(tmp_path.iterdir()) == []


def test_float_input_and_size_mismatch(retinanet, tmp_path):
    result = export_torchscript(retinanet, tmp_path / "f.pt", input_dtype="float32")
    assert result["check"]["detections"] >= 60
    # A trace takes any dtype: uint8 images would be read as 0..1 and silently find nothing.
    loaded = torch.jit.load(tmp_path / "f.pt")
    assert int(loaded(torch.rand(1, 3, 64, 48))[3][0]) > 0
    with pytest.raises(torch.jit.Error, match=r"images must be float32 0\.\.1"):
        loaded(torch.zeros(1, 3, 64, 48, dtype=torch.uint8))
    with pytest.raises(ExportError, match="image_size 128 differs from the model's 64"):
        export_onnx(retinanet, tmp_path / "r.onnx", image_size=128)


def test_dense_export_matches_pytorch(tmp_path):
    model = create_model("spinenet49s_retinanet", num_classes=3, image_size=128, **SMALL)
    out = tmp_path / "retina.onnx"
    result = export_onnx(model, out, image_size=128, dense=True)
    num_anchors = 9 * sum((128 // 2**lvl) ** 2 for lvl in range(3, 8))
    assert result["kind"] == "retinanet"
    assert result["outputs"] == {
        "cls_logits": [1, num_anchors, 3],
        "bbox_regression": [1, num_anchors, 4],
        "anchors": [num_anchors, 4],
    }
    assert set(result["max_abs_diff"]) == set(result["outputs"])
    assert max(result["max_abs_diff"].values()) <= 1e-4
    onnx.checker.check_model(str(out))
    # The anchors output is the model's own anchors for a 128 x 128 image.
    graph = export.DenseOutputs(model.eval(), 128)
    images = ImageList(torch.zeros(1, 3, 128, 128), [(128, 128)])
    features = [torch.zeros(1, 1, 128 // 2**lvl, 128 // 2**lvl) for lvl in range(3, 8)]
    assert torch.equal(graph.anchors, model.anchor_generator(images, features)[0])


def test_failed_dense_check_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "TOLERANCE", -1.0)  # any difference, even 0, fails
    out = tmp_path / "backbone.onnx"
    with pytest.raises(ExportError, match="disagrees"):
        export_onnx(create_model("spinenet49s", **SMALL), out, image_size=64)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_command_writes_beside_the_weights_and_never_replaces_a_file(retinanet, tmp_path):
    run = tmp_path / "run"
    save_weights(retinanet, run / "best.safetensors")
    parser = argparse.ArgumentParser()
    add_export_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", str(run), "--format", "torchscript", "--no-check"])
    assert args.func(args) == 0
    written = (run / "best.pt").read_bytes()
    assert torch.jit.load(run / "best.pt") is not None
    with pytest.raises(SpinedetError, match=r"best.pt: exists; pass --overwrite"):
        args.func(args)
    assert (run / "best.pt").read_bytes() == written
    args = parser.parse_args(
        ["export", str(run), "--format", "torchscript", "--out", str(run / "best.pt")]
    )
    with pytest.raises(SpinedetError, match=r"best.pt: exists"):
        args.func(args)  # refused before the export's slow trace and check
    # ONNX in a file named as TorchScript (was written so, without a word), and the reverse.
    for fmt, name, other in (("onnx", "m.pt", "torchscript"), ("torchscript", "m.onnx", "onnx")):
        args = parser.parse_args(["export", str(run), "--format", fmt, "--out", str(run / name)])
        with pytest.raises(SpinedetError, match=rf"{name}: a {other} file's name, but --format "):
            args.func(args)
        assert not (run / name).exists()


def test_a_missing_file_is_no_such_file_not_an_unknown_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default output lands here
    parser = argparse.ArgumentParser()
    add_export_commands(parser.add_subparsers(dest="command"))
    for missing in ("runs/q20/nonexist.safetensors", "nonexist.safetensors", "runs/q20"):
        args = parser.parse_args(["export", missing, "--no-check"])
        with pytest.raises(SpinedetError, match=rf"^{missing}: no such file$"):
            args.func(args)
    with pytest.raises(SpinedetError, match="unknown model 'spinenet49x'"):
        export.resolve_model("spinenet49x")


def test_torchscript_loads_with_torchvision_and_without_spinedet(retinanet, tmp_path, capsys):
    save_weights(retinanet, tmp_path / "best.safetensors")
    parser = argparse.ArgumentParser()
    add_export_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", str(tmp_path), "--format", "torchscript", "--no-check"])
    assert args.func(args) == 0
    assert "load: import torchvision" in capsys.readouterr().out
    # A fresh process, as a user's: torch.jit.load alone does not know torchvision::nms.
    load = (
        "import sys, torch\n{}m = torch.jit.load(sys.argv[1])\nassert 'spinedet' not in sys.modules"
    )
    for imports, ok in (("", False), ("import torchvision\n", True)):
        command = [sys.executable, "-W", "ignore", "-c", load.format(imports)]
        run = subprocess.run([*command, str(tmp_path / "best.pt")], capture_output=True, text=True)
        assert (run.returncode == 0) == ok, run.stderr
        assert ok or "Unknown builtin op: torchvision::nms" in run.stderr


def test_torchscript_on_a_full_disk_is_one_line_and_leaves_no_temp_file(retinanet, tmp_path):
    save_weights(retinanet, tmp_path / "best.safetensors")
    out = tmp_path / "out"
    out.mkdir()

    def small_files() -> None:  # the file system refuses what passes 64 kB, as a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead

    command = [sys.executable, "-m", "spinedet.cli", "export", str(tmp_path), "--format",
               "torchscript", "--no-check", "--out", str(out / "m.pt")]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, preexec_fn=small_files,
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})  # fmt: skip
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.strip().splitlines()[-1] == (
        f"spinedet: error: {out / 'm.pt'}: cannot write (File too large)"
    )
    assert list(out.iterdir()) == []


def test_help_names_run_directories():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_export_commands(sub)
    text = sub.choices["export"].format_help()
    assert "run directory" in text and "torchscript" in text and "--dense" in text


def test_torchscript_from_a_file_at_another_size_as_onnx_does(retinanet, tmp_path):
    weights = tmp_path / "retina.safetensors"
    save_weights(retinanet, weights)
    for write, suffix in ((export_torchscript, "pt"), (export_onnx, "onnx")):
        result = write(weights, tmp_path / f"r96.{suffix}", image_size=96, check=False)
        assert result["image_size"] == 96, suffix


def test_classifier_exports_at_its_own_size_with_its_classes(tmp_path, capsys):
    model = create_model("spinenet49s_classifier", class_names=["a", "b"], image_size=32, **SMALL)
    weights = tmp_path / "run" / "best.safetensors"
    save_weights(model, weights)
    parser = argparse.ArgumentParser()
    add_export_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", str(weights.parent)])
    assert args.func(args) == 0
    assert "exported classifier at 32 px" in capsys.readouterr().out  # was 640
    out = weights.with_suffix(".onnx")
    proto = onnx.load(str(out))
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 32, 32]
    meta = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert meta["class_names"] == ["a", "b"] and meta["category_ids"] == [0, 1]
    assert meta["spinedet_description"]["task"] == "classifier"
    assert meta["input"]["image_size"] == 32 and meta["input"]["dtype"] == "float32"
    assert meta["input"]["normalisation"]["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert set(meta["outputs"]) == {"logits"} and "(1, 2)" in meta["outputs"]["logits"]
    images = torch.randn(1, 3, 32, 32)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(logits, model.eval()(images).numpy(), atol=1e-4)


def test_dense_detector_and_backbone_metadata(tmp_path):
    model = create_model("spinenet49s_retinanet", categories=CATEGORIES, image_size=64, **SMALL)
    export_onnx(model, tmp_path / "d.onnx", dense=True, check=False)
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(tmp_path / "d.onnx")).metadata_props}
    assert meta["category_ids"] == [3, 7] and meta["input"]["range"] == [0.0, 1.0]
    assert meta["input"]["normalisation"]["applied"] == "inside the graph"
    assert "label 0 the background" in meta["outputs"]["cls_logits"]
    export_onnx(create_model("spinenet49s", **SMALL), tmp_path / "b.onnx", image_size=64)
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(tmp_path / "b.onnx")).metadata_props}
    assert "class_names" not in meta and set(meta["outputs"]) == {f"p{i}" for i in range(3, 8)}
    assert "stride 8" in meta["outputs"]["p3"]
