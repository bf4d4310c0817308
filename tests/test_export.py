"""ONNX export: onnxruntime agrees with PyTorch on the raw outputs; the CLI command works."""

import argparse

import pytest
import torch
from torchvision.models.detection.image_list import ImageList

import spinedet.export as export
from spinedet import create_model, save_weights
from spinedet.cli.export import add_export_commands
from spinedet.export import ExportError, export_onnx

# The optional export dependencies (onnx, onnxscript, onnxruntime).
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

SMALL = {"filter_scale": 0.25, "endpoint_filters": 32}


def test_retinanet_export_matches_pytorch(tmp_path):
    model = create_model("spinenet49s_retinanet", num_classes=3, image_size=128, **SMALL)
    out = tmp_path / "retina.onnx"
    result = export_onnx(model, out, image_size=128)
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


def test_failed_check_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "TOLERANCE", -1.0)  # any difference, even 0, fails
    out = tmp_path / "backbone.onnx"
    with pytest.raises(ExportError, match="disagrees"):
        export_onnx(create_model("spinenet49s", **SMALL), out, image_size=64)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_export_command_on_checkpoint(tmp_path, capsys):
    weights = tmp_path / "mask.safetensors"
    model = create_model("spinenet49s_maskrcnn", num_classes=3, image_size=64, **SMALL)
    save_weights(model, weights)
    parser = argparse.ArgumentParser()
    add_export_commands(parser.add_subparsers(dest="command"))
    out = tmp_path / "mask.onnx"
    args = parser.parse_args(["export", str(weights), "--format", "onnx", "--out", str(out)])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "exported rcnn at 64 px" in printed and "max |diff|" in printed
    names = [o.name for o in onnx.load(str(out)).graph.output]
    assert names == ["p3", "p4", "p5", "p6", "p7", "objectness", "rpn_bbox_regression", "anchors"]
