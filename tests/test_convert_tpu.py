"""convert-tf of tensorflow/tpu (TF1 name-based) checkpoints without TensorFlow: the committed
fixtures (scripts/make_tpu_fixture.py) against the outputs tensorflow/tpu's code computed."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import spinedet
from spinedet.cli import main
from spinedet.convert import ConversionError, TFCheckpoint, convert_tf
from spinedet.convert.tf_checkpoint import CheckpointError, TensorBundle, open_checkpoint
from spinedet.convert.tf_mapping import model_garden_head_outputs, model_garden_roi_outputs
from spinedet.convert.tpu_mapping import TPU_ANCHOR_RATIOS, convert_tpu_checkpoint
from spinedet.models import describe, read_description
from spinedet.models.classifier import spinenet_classifier

FIXTURES = Path(__file__).parent / "fixtures"
CLASSIFIER = FIXTURES / "tpu_classifier"
RETINANET = FIXTURES / "tpu_retinanet"
MASKRCNN = FIXTURES / "tpu_maskrcnn"
SCALING = {"filter_scale": 0.125, "endpoint_filters": 16}
TOLERANCE = 1e-4  # max |diff| relative to the output's max |value|


def rel_diff(ours: torch.Tensor, theirs: np.ndarray) -> float:
    return float(np.abs(ours.numpy() - theirs).max() / np.abs(theirs).max())


def expected(fixture: Path) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    outputs = dict(np.load(fixture / "outputs.npz"))
    return torch.from_numpy(outputs["images"]).permute(0, 3, 1, 2), outputs


def check_pyramid(features: dict[str, torch.Tensor], outputs: dict[str, np.ndarray]) -> None:
    for level, value in features.items():
        diff = rel_diff(value.permute(0, 2, 3, 1), outputs[level])
        assert diff < TOLERANCE, (level, diff)


def load_classifier(path: Path) -> torch.nn.Module:
    """A converted classifier rebuilt from its file."""
    return spinedet.load_model(path)


def without_params(fixture: Path, tmp_path: Path) -> Path:
    """The fixture's checkpoint without the params.yaml beside it."""
    out = tmp_path / fixture.name
    shutil.copytree(fixture, out, ignore=shutil.ignore_patterns("params.yaml"))
    return out


def test_tf1_checkpoints_are_told_apart_from_tf2():
    ckpt = open_checkpoint(CLASSIFIER)
    assert type(ckpt) is TensorBundle and not ckpt.object_based
    assert ckpt.shape("spinenet/conv2d/kernel") == (7, 7, 3, 64)
    assert isinstance(open_checkpoint(FIXTURES / "tf"), TFCheckpoint)
    with pytest.raises(CheckpointError, match="no object graph"):
        TFCheckpoint(CLASSIFIER)


def test_classifier_matches_tensorflow_tpu(tmp_path):
    out = tmp_path / "classifier.safetensors"
    summary = convert_tf(CLASSIFIER, "spinenet49_classifier", out, **SCALING)
    # params.yaml beside the checkpoint gave the activation and BN epsilon.
    assert "activation=relu" in summary and "bn_eps=1e-05" in summary
    description = read_description(out)
    assert description.name == "spinenet49_classifier"
    kwargs = description.options_dict()
    assert kwargs["padding"] == "fixed" and kwargs["downsample"] == "tpu"
    assert description.num_classes == 5
    model = load_classifier(out)
    images, outputs = expected(CLASSIFIER)
    with torch.no_grad():
        check_pyramid(model.eval().backbone(images), outputs)
        assert rel_diff(model(images), outputs["logits"]) < TOLERANCE


def test_model_garden_downsampling_or_padding_would_differ():
    """Both tensorflow/tpu options change the outputs: neither is a no-op."""
    images, outputs = expected(CLASSIFIER)
    ckpt = open_checkpoint(CLASSIFIER)
    for option in [{"padding": "same"}, {"downsample": "model_garden"}]:
        model = spinenet_classifier("49", 5, **SCALING, **option).eval()
        model.load_state_dict(convert_tpu_checkpoint(ckpt, model), strict=False)
        with torch.no_grad():
            features = model.backbone(images)
        diffs = [rel_diff(v.permute(0, 2, 3, 1), outputs[k]) for k, v in features.items()]
        assert max(diffs) > 100 * TOLERANCE, (option, diffs)


def test_retinanet_matches_tensorflow_tpu(tmp_path):
    out = tmp_path / "retinanet.safetensors"
    convert_tf(RETINANET, "spinenet49s_retinanet", out, **SCALING)
    model = spinedet.load_model(out).eval()
    assert model.backbone.bn_eps == 1e-4
    kwargs = describe(model).options_dict()
    assert kwargs["activation"] == "swish"
    assert kwargs["head_depth"] == 2 and len(model.class_names) == 2
    images, outputs = expected(RETINANET)
    with torch.no_grad():
        features = model.backbone(images)
        scores, boxes = model_garden_head_outputs(model, features, TPU_ANCHOR_RATIOS)
    check_pyramid(features, outputs)
    for i, level in enumerate(range(3, 8)):
        assert rel_diff(scores[i], outputs[f"scores{level}"]) < TOLERANCE
        assert rel_diff(boxes[i], outputs[f"boxes{level}"]) < TOLERANCE


def test_maskrcnn_matches_tensorflow_tpu(tmp_path):
    out = tmp_path / "maskrcnn.safetensors"
    convert_tf(MASKRCNN, "spinenet49s_maskrcnn", out, **SCALING)
    model = spinedet.load_model(out).eval()
    kwargs = describe(model).options_dict()
    assert (kwargs["head_channels"], kwargs["fc_dim"], kwargs["rpn_scales"]) == (16, 32, 1)
    assert kwargs["anchor_size"] == 3.0 and model.backbone.bn_eps == 1e-3
    images, outputs = expected(MASKRCNN)
    config = json.loads((MASKRCNN / "fixture.json").read_text())["maskrcnn"]
    with torch.no_grad():
        features = model.backbone(images)
        scores, boxes = model_garden_head_outputs(model, features, TPU_ANCHOR_RATIOS)
        rois = model_garden_roi_outputs(
            model,
            features,
            tuple(images.shape[-2:]),
            torch.tensor(config["rois"]),
            torch.tensor(config["roi_classes"]),
        )
    check_pyramid(features, outputs)
    for i, level in enumerate(range(3, 8)):
        assert rel_diff(scores[i], outputs[f"rpn_scores{level}"]) < TOLERANCE
        assert rel_diff(boxes[i], outputs[f"rpn_boxes{level}"]) < TOLERANCE
    for key, value in rois.items():
        assert rel_diff(value, outputs[key]) < TOLERANCE, key


def test_backbone_alone_from_a_classifier_or_retinanet(tmp_path):
    for fixture, outputs in [(CLASSIFIER, expected(CLASSIFIER)), (RETINANET, expected(RETINANET))]:
        out = tmp_path / f"{fixture.name}.safetensors"
        variant = "49" if fixture == CLASSIFIER else "49s"
        convert_tf(fixture, f"spinenet{variant}", out, **SCALING)
        model = spinedet.load_model(out).eval()
        with torch.no_grad():
            check_pyramid(model(outputs[0]), outputs[1])


def test_activation_must_be_known(tmp_path, capsys):
    bare = without_params(CLASSIFIER, tmp_path)
    out = tmp_path / "w.safetensors"
    with pytest.raises(ConversionError, match="does not record its activation: pass --activation"):
        convert_tf(bare, "spinenet49_classifier", out, **SCALING)
    code = main(["convert-tf", str(bare), "--model", "spinenet49", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--activation relu" in err
    assert not out.exists()
    # Given, it converts (the epsilon then is tensorflow/tpu's classification default).
    convert_tf(bare, "spinenet49_classifier", out, activation="relu", **SCALING)
    assert read_description(out).option("bn_eps") == 1e-5
    with pytest.raises(ConversionError, match="--activation swish contradicts .*params.yaml"):
        convert_tf(CLASSIFIER, "spinenet49_classifier", out, activation="swish", **SCALING)


def test_checkpoint_and_model_must_fit(tmp_path):
    out = tmp_path / "w.safetensors"
    with pytest.raises(
        ConversionError, match="tensorflow/tpu classifier checkpoint .* not a retinanet"
    ):
        convert_tf(CLASSIFIER, "spinenet49_retinanet", out, **SCALING)
    with pytest.raises(ConversionError, match="tensorflow/tpu maskrcnn checkpoint .* fasterrcnn"):
        convert_tf(MASKRCNN, "spinenet49s_fasterrcnn", out, **SCALING)
    with pytest.raises(ConversionError, match="has 5 classes .*, not 1000"):
        convert_tf(CLASSIFIER, "spinenet49_classifier", out, 1000, **SCALING)
    with pytest.raises(ConversionError, match="Model Garden .* classifiers convert from"):
        convert_tf(FIXTURES / "tf", "spinenet49_classifier", out, activation="swish")
    with pytest.raises(ConversionError, match=r"646 mis-shaped: .* \(32,\) -> backbone.stem"):
        convert_tf(CLASSIFIER, "spinenet49_classifier", out)  # full width: another scaling
    assert not out.exists()
