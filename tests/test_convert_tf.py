"""convert-tf without TensorFlow: the committed Model Garden fixture and checkpoint errors."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import spinedet
from spinedet.convert import ConversionError, TFCheckpoint, convert_checkpoint, convert_tf
from spinedet.convert.tf_checkpoint import CheckpointError
from spinedet.convert.tf_mapping import model_garden_head_outputs

FIXTURE = Path(__file__).parent / "fixtures" / "tf"
CONFIG = json.loads((FIXTURE / "fixture.json").read_text())
OUTPUTS = np.load(FIXTURE / "outputs.npz")


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
    with pytest.raises(ConversionError, match="2 convs per tower, the model 4"):
        convert_tf(FIXTURE, "spinenet49s_retinanet", tmp_path / "w.safetensors")
    assert not (tmp_path / "w.safetensors").exists()
