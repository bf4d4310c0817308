"""Parity with the tensorflow/tpu model zoo's code: full-size models with random weights and BN
statistics, saved as TF1 checkpoints by tensorflow/tpu's own graph and converted by
``convert_tf``. Runs where TensorFlow is installed and ``SPINEDET_TPU_DIR`` points at a
tensorflow/tpu checkout's ``models/official/detection`` (see tests/tpu_reference.py)."""

import numpy as np
import pytest
import torch
from test_convert_tpu import (
    check_retinanet,
    degenerate,
    load_classifier,
    match_detections,
    run_detector,
)

import spinedet  # before TensorFlow: see spinedet.convert.tf_reference
from spinedet.convert import convert_tf
from spinedet.convert.tf_mapping import model_garden_head_outputs, model_garden_roi_outputs
from spinedet.convert.tpu_mapping import TPU_ANCHOR_RATIOS

pytest.importorskip("tensorflow")
ref = pytest.importorskip("tpu_reference")
if not ref.available():
    pytest.skip("SPINEDET_TPU_DIR names no tensorflow/tpu checkout", allow_module_level=True)

TOLERANCE = 1e-4  # max |diff| relative to the output's max |value|


def rel_diff(ours: torch.Tensor, theirs: np.ndarray) -> float:
    return float(np.abs(ours.numpy() - theirs).max() / np.abs(theirs).max())


def run_tpu(tmp_path, size, activation, **kwargs) -> tuple[str, np.ndarray, dict]:
    """The checkpoint prefix, input and outputs (with ``num_parameters``, the TF model's
    trainable parameters) of a randomised tensorflow/tpu model."""
    tf_model = ref.TpuModel(size, activation, **kwargs)
    tf_model.randomize(seed=1)
    images = np.random.default_rng(0).normal(size=(1, *size, 3)).astype(np.float32)
    if "num_classes" not in kwargs:
        tf_model.calibrate(images)  # detections worth comparing end to end
    prefix = tf_model.save(tmp_path)
    outputs = tf_model.run(images)
    return prefix, images, outputs | {"images": images, "num_parameters": tf_model.num_parameters()}


def check_detections(model, images, expected, near_ties: float = 0.0) -> dict[str, torch.Tensor]:
    """tensorflow/tpu's 100 detections are ours in the same order (class, score within
    TOLERANCE, box corners within TOLERANCE of the image's larger side), except where NMS
    breaks near-ties the other way: every detection only one side has must then score within
    ``near_ties`` of all others of that kind (a chain of overlapping boxes whose scores lie a
    few float32 roundings apart, so greedy NMS keeps every other one, starting from another)."""
    ours = run_detector(model.eval(), torch.from_numpy(images).permute(0, 3, 1, 2))
    pairs, missing = match_detections(ours, expected)
    extra = sorted(set(range(len(ours["scores"]))) - {j for _, j in pairs})
    assert len(ours["scores"]) == 100 and len(missing) == len(extra), (missing, extra)
    assert [j for _, j in pairs] == sorted(j for _, j in pairs)
    tied = np.concatenate([expected["detection_scores"][missing], ours["scores"][extra].numpy()])
    assert len(tied) == 0 or np.ptp(tied) <= near_ties, (missing, extra, tied)
    return ours


def check_pyramid(features, outputs) -> None:
    for level, value in features.items():
        diff = rel_diff(value.permute(0, 2, 3, 1), outputs[level])
        assert diff < TOLERANCE, (level, diff)


@pytest.mark.parametrize("variant,activation", [("49", "relu"), ("96", "swish")])
def test_classifier_matches_tensorflow_tpu(variant, activation, tmp_path):
    prefix, images, expected = run_tpu(
        tmp_path, (224, 224), activation, model_id=variant, num_classes=1001
    )
    out = tmp_path / "classifier.safetensors"
    convert_tf(prefix, f"spinenet{variant}_classifier", out, activation=activation)
    model = load_classifier(out).eval()
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    with torch.no_grad():
        check_pyramid(model.backbone(x), expected)
        assert rel_diff(model(x), expected["logits"]) < TOLERANCE


@pytest.mark.parametrize(
    "variant,activation,size", [("49S", "relu", (256, 384)), ("49", "relu", (384, 384))]
)
def test_retinanet_matches_tensorflow_tpu(variant, activation, size, tmp_path):
    filters = 128 if variant == "49S" else 256
    head = {"num_classes": 91, "num_convs": 4, "num_filters": filters, "anchor_size": 3.0}
    prefix, images, expected = run_tpu(
        tmp_path, size, activation, model_id=variant, retinanet=head, bn_eps=1e-4
    )
    out = tmp_path / "retinanet.safetensors"
    convert_tf(prefix, f"spinenet{variant.lower()}_retinanet", out, activation=activation)
    model = spinedet.load_model(out).eval()
    check_retinanet(model, torch.from_numpy(images).permute(0, 3, 1, 2), expected)
    check_detections(spinedet.load_model(out, image_size=max(size)), images, expected)


def test_mobile_retinanet_matches_tensorflow_tpu(tmp_path):
    """The zoo's SpineNetMB-49 RetinaNet (spinenet-mbconv49_retinanet.yaml: swish, 384 x 384,
    separable head convs 48 wide)."""
    size = (384, 384)
    head = {"num_classes": 91, "num_convs": 4, "num_filters": 48, "anchor_size": 3.0}
    prefix, images, expected = run_tpu(
        tmp_path,
        size,
        "swish",
        model_id="49",
        retinanet=head | {"separable": True},
        bn_eps=1e-4,
        backbone="spinenet_mbconv",
    )
    out = tmp_path / "mobile.safetensors"
    convert_tf(prefix, "spinenet_mobile49_retinanet", out, activation="swish")
    model = spinedet.load_model(out).eval()
    # The zoo's 2.34M: spinedet folds the 8 x 48 tower conv biases into their BatchNorms.
    assert expected["num_parameters"] == 2_337_579
    assert sum(p.numel() for p in model.parameters()) == 2_337_579 - 8 * 48
    check_retinanet(model, torch.from_numpy(images).permute(0, 3, 1, 2), expected)
    # Measured: 97 of 100 detections equal; the other 3 on each side are of one chain of
    # class-32 boxes 8 px apart along the left border (IoU 0.71 with each neighbour), their
    # probabilities within 3e-6 of each other and tensorflow/tpu's and spinedet's for the same
    # anchor 1 float32 rounding (6e-8) apart at two of them: NMS keeps every other box of the
    # chain, starting one box later. The 6 scores lie within 1.6e-5.
    check_detections(
        spinedet.load_model(out, image_size=max(size)), images, expected, near_ties=2e-5
    )


def test_maskrcnn_matches_tensorflow_tpu(tmp_path):
    size = (256, 384)
    rois = [[5, 7, 8.5, 12], [10, 20, 60, 90], [0, 0, 256, 384], [64, 100, 250, 380]]
    roi_classes = [1, 90, 0, 45]
    heads = {"num_classes": 91, "num_filters": 256, "fc_dims": 1024, "anchor_size": 3.0}
    heads |= {"rois": rois, "roi_classes": roi_classes}
    prefix, images, expected = run_tpu(
        tmp_path, size, "relu", model_id="49", maskrcnn=heads, bn_eps=1e-3
    )
    out = tmp_path / "maskrcnn.safetensors"
    convert_tf(prefix, "spinenet49_maskrcnn", out, activation="relu")
    model = spinedet.load_model(out).eval()
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    with torch.no_grad():
        features = model.backbone(x)
        scores, boxes = model_garden_head_outputs(model, features, TPU_ANCHOR_RATIOS)
        second = model_garden_roi_outputs(
            model, features, size, torch.tensor(rois), torch.tensor(roi_classes)
        )
    check_pyramid(features, expected)
    for i, level in enumerate(range(3, 8)):
        assert rel_diff(scores[i], expected[f"rpn_scores{level}"]) < TOLERANCE, level
        assert rel_diff(boxes[i], expected[f"rpn_boxes{level}"]) < TOLERANCE, level
    for key, value in second.items():
        assert rel_diff(value, expected[key]) < TOLERANCE, key
    model = spinedet.load_model(out, image_size=max(size))
    ours = check_detections(model, images, expected)
    # Proposals: the same 1000 (ties of probability 1.0 and repeated boxes may come in another
    # order), among them those clipping squeezed to the image's border (without continuous
    # area: torchvision's RPN would drop them).
    theirs = torch.from_numpy(expected["proposals"][:, [1, 0, 3, 2]])
    dist = (theirs[:, None] - ours["proposals"][None]).abs().amax(-1)
    assert len(ours["proposals"]) == 1000 and degenerate(expected["proposals"]).sum() == 41
    assert dist.amin(1).max() < 1e-2 and dist.amin(0).max() < 1e-2
    mine = ours["masks"][:, 0].numpy()
    assert np.abs(mine - expected["detection_masks"]).max() < 1e-3
