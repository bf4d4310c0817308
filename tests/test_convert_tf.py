"""convert-tf without TensorFlow: the committed Model Garden fixture and checkpoint errors."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import spinedet
from spinedet.convert import ConversionError, TFCheckpoint, convert_checkpoint, convert_tf
from spinedet.convert.tf_checkpoint import CheckpointError, TrackableNode
from spinedet.convert.tf_mapping import (
    find_backbone,
    model_garden_head_outputs,
    model_garden_roi_outputs,
)
from spinedet.data import DataError
from spinedet.engine.api import load_checkpoint
from spinedet.errors import SpinedetError

FIXTURE = Path(__file__).parent / "fixtures" / "tf"
CONFIG = json.loads((FIXTURE / "fixture.json").read_text())
OUTPUTS = np.load(FIXTURE / "outputs.npz")
MASK_FIXTURE = Path(__file__).parent / "fixtures" / "tf_maskrcnn"
MASK_CONFIG = json.loads((MASK_FIXTURE / "fixture.json").read_text())
MASK_OUTPUTS = np.load(MASK_FIXTURE / "outputs.npz")


def build(**overrides):
    kwargs = {**CONFIG["kwargs"], "activation": CONFIG["activation"], **overrides}
    return spinedet.create_model(CONFIG["model"], CONFIG["num_classes"], **kwargs).eval()


def rel_diff(ours: torch.Tensor, theirs: np.ndarray) -> float:
    return float(np.abs(ours.numpy() - theirs).max() / np.abs(theirs).max())


def test_reader_finds_object_graph_and_tensors():
    ckpt = TFCheckpoint(FIXTURE)  # the directory resolves to ckpt-1 via its "checkpoint" file
    assert ckpt.prefix.name == CONFIG["prefix"]
    stem = ckpt.child(ckpt.root, "model", "_backbone", "layer_with_weights-0", "kernel")
    assert ckpt.tensor(stem.tensor).shape == (7, 7, 3, 64)
    assert TFCheckpoint(FIXTURE / f"{CONFIG['prefix']}.index").prefix == ckpt.prefix


def test_fixture_outputs_match_tensorflow():
    model = build()
    model.load_state_dict(convert_checkpoint(TFCheckpoint(FIXTURE), model), strict=False)
    images = torch.from_numpy(OUTPUTS["images"]).permute(0, 3, 1, 2)
    with torch.no_grad():
        features = model.backbone(images)
        scores, boxes = model_garden_head_outputs(model, features)
    for i, (name, value) in enumerate(features.items()):
        level = name[1:]
        assert rel_diff(value.permute(0, 2, 3, 1), OUTPUTS[name]) < 1e-4, name
        assert rel_diff(scores[i], OUTPUTS[f"scores{level}"]) < 1e-4, name
        assert rel_diff(boxes[i], OUTPUTS[f"boxes{level}"]) < 1e-4, name


def test_backbone_only_conversion_loads_into_detector(tmp_path):
    backbone = spinedet.create_model(
        "spinenet49s",
        filter_scale=CONFIG["kwargs"]["filter_scale"],
        endpoint_filters=CONFIG["kwargs"]["endpoint_filters"],
        activation=CONFIG["activation"],
    ).eval()
    backbone.load_state_dict(convert_checkpoint(TFCheckpoint(FIXTURE), backbone), strict=False)
    spinedet.save_weights(backbone, tmp_path / "b.safetensors")
    detector = build(weights=tmp_path / "b.safetensors")
    images = torch.from_numpy(OUTPUTS["images"]).permute(0, 3, 1, 2)
    with torch.no_grad():
        p3 = detector.backbone(images)["p3"]
    assert rel_diff(p3.permute(0, 2, 3, 1), OUTPUTS["p3"]) < 1e-4


def test_other_variant_is_rejected_naming_variables():
    model = build(filter_scale=0.25)
    with pytest.raises(ConversionError, match=r"mis-shaped: model/_backbone/layer_with_weights"):
        convert_checkpoint(TFCheckpoint(FIXTURE), model)


def test_other_block_repeats_is_rejected():
    with pytest.raises(ConversionError, match="layers with weights"):
        convert_checkpoint(TFCheckpoint(FIXTURE), build(block_repeats=2))


def test_other_num_classes_is_rejected():
    model = spinedet.create_model(
        CONFIG["model"], 5, **CONFIG["kwargs"], activation=CONFIG["activation"]
    )
    with pytest.raises(ConversionError, match=r"_classifier/kernel.*cls_logits"):
        convert_checkpoint(TFCheckpoint(FIXTURE), model)


def test_missing_checkpoint_and_cli_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no TensorFlow checkpoint"):
        TFCheckpoint(tmp_path / "ckpt-3")
    shutil.copy(FIXTURE / "outputs.npz", tmp_path / "x.index")
    with pytest.raises(CheckpointError, match="not an SSTable"):
        TFCheckpoint(tmp_path / "x")
    # Head sizes are read from the checkpoint, the reduced backbone is another variant.
    with pytest.raises(ConversionError, match="mis-shaped: model/_backbone/layer_with_weights"):
        convert_tf(FIXTURE, "spinenet49s_retinanet", tmp_path / "w.safetensors", activation="swish")
    assert not (tmp_path / "w.safetensors").exists()
    with pytest.raises(ConversionError, match="has 3 classes .*, not 5"):
        convert_tf(
            FIXTURE, "spinenet49s_retinanet", tmp_path / "w.safetensors", 5, activation="swish"
        )
    with pytest.raises(ConversionError, match=r"2 _cls_convs layers, the model 4"):
        convert_checkpoint(TFCheckpoint(FIXTURE), build(head_depth=4))


def mask_kwargs():
    return {**MASK_CONFIG["kwargs"], "activation": MASK_CONFIG["activation"]}


def mask_rcnn_outputs(model):
    """RPN and second-stage outputs on the fixture image and RoIs, in Model Garden's layout."""
    images = torch.from_numpy(MASK_OUTPUTS["images"]).permute(0, 3, 1, 2)
    with torch.no_grad():
        features = model.backbone(images)
        scores, boxes = model_garden_head_outputs(model, features)
        out = model_garden_roi_outputs(
            model,
            features,
            tuple(MASK_CONFIG["size"]),
            torch.tensor(MASK_CONFIG["rois"]),
            torch.tensor(MASK_CONFIG["roi_classes"]),
        )
    for i, level in enumerate(model.backbone.levels):
        out[f"rpn_scores{level}"], out[f"rpn_boxes{level}"] = scores[i], boxes[i]
    return out


def test_maskrcnn_fixture_converts_through_the_cli_and_matches_tensorflow(tmp_path):
    out = tmp_path / "mrcnn.safetensors"
    summary = convert_tf(MASK_FIXTURE, "spinenet49s_maskrcnn", out, num_classes=3, **mask_kwargs())
    # Head sizes come from the checkpoint and are recorded, so load_model rebuilds the model.
    assert "num_classes=3, head_channels=16, rpn_depth=1, rpn_scales=1, fc_dim=32" in summary
    model = spinedet.load_model(out).eval()
    ours = mask_rcnn_outputs(model)
    expected = [k for k in MASK_OUTPUTS.files if not k.startswith(("images", "p"))]
    assert len(expected) == 15  # 5 levels x 2 RPN outputs, RoI features x 2, classes, boxes, masks
    for key in expected:
        assert rel_diff(ours[key], MASK_OUTPUTS[key]) < 1e-4, key
    # A second conversion to the same file is refused before the checkpoint is read.
    written = out.read_bytes()
    with pytest.raises(SpinedetError, match="mrcnn.safetensors: exists; pass --overwrite"):
        convert_tf(tmp_path / "missing", "spinenet49s_maskrcnn", out)
    assert out.read_bytes() == written


def test_maskrcnn_checkpoint_does_not_fit_other_detectors():
    ckpt = TFCheckpoint(MASK_FIXTURE)
    faster = spinedet.create_model("spinenet49s_fasterrcnn", 3, **mask_kwargs())
    with pytest.raises(ConversionError, match=r"unexpected: model/mask_head/"):
        convert_checkpoint(ckpt, faster)
    retinanet = spinedet.create_model("spinenet49s_retinanet", 3, **CONFIG["kwargs"])
    with pytest.raises(ConversionError, match="holds no RetinaNet head"):
        convert_checkpoint(ckpt, retinanet)
    wider = spinedet.create_model("spinenet49s_maskrcnn", 3, head_channels=32, **mask_kwargs())
    with pytest.raises(
        ConversionError, match=r"70 mis-shaped: .*-> roi_heads.box_head.0.1.bias \(32,\)"
    ):
        convert_checkpoint(ckpt, wider)
    with pytest.raises(ConversionError, match="holds no R-CNN heads"):
        convert_tf(FIXTURE, "spinenet49s_maskrcnn", "unused.safetensors", activation="swish")


def test_swish_weights_are_refused_by_a_relu_model(tmp_path):
    out = tmp_path / "mrcnn.safetensors"
    convert_tf(MASK_FIXTURE, "spinenet49s_maskrcnn", out, **mask_kwargs())
    relu = {**mask_kwargs(), "activation": "relu"}
    with pytest.raises(
        spinedet.models.WeightsError,
        match="trained with activation='swish', this model uses activation='relu'",
    ):
        spinedet.create_model("spinenet49s_maskrcnn", 3, weights=out, **relu)
    model = spinedet.create_model("spinenet49s_maskrcnn", 3, weights=out, **mask_kwargs())
    assert isinstance(model.backbone.act, torch.nn.SiLU)


def test_categories_name_converted_classes(tmp_path):
    coco = tmp_path / "instances.json"
    coco.write_text(json.dumps({"categories": [{"id": 2, "name": "bicycle"}]}))
    out = tmp_path / "mrcnn.safetensors"
    convert_tf(MASK_FIXTURE, "spinenet49s_maskrcnn", out, categories=coco, **mask_kwargs())
    model, categories = load_checkpoint(out)
    # Model Garden's class k is category id k; ids missing from the json keep a placeholder.
    assert categories == [{"id": 1, "name": "unused_1"}, {"id": 2, "name": "bicycle"}]
    assert model.class_names == ["unused_1", "bicycle"]
    coco.write_text(json.dumps({"categories": [{"id": 7, "name": "train"}]}))
    with pytest.raises(DataError, match=r"instances.json: category ids \[7\]"):
        convert_tf(
            MASK_FIXTURE, "spinenet49s_maskrcnn", out, categories=coco, overwrite=True,
            **mask_kwargs(),
        )  # fmt: skip


def test_a_cyclic_object_graph_without_a_backbone_is_refused():
    ckpt = TFCheckpoint(FIXTURE)
    ckpt.nodes = [TrackableNode(0, {"model": 1}), TrackableNode(1, {"backbone": 0})]
    ckpt.root = ckpt.nodes[0]
    with pytest.raises(ConversionError, match="no SpineNet backbone found"):
        find_backbone(ckpt)
