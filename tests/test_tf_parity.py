"""Parity with TensorFlow Model Garden: full-size models with random weights and BN statistics,
converted from their checkpoints. Runs where TensorFlow is installed (``.ci/tf-parity.sh``)."""

import numpy as np
import pytest
import torch

import spinedet  # before TensorFlow: see spinedet.convert.tf_reference
from spinedet.convert import TFCheckpoint, convert_checkpoint
from spinedet.convert.tf_mapping import model_garden_head_outputs

pytest.importorskip("tensorflow")
pytest.importorskip("official")
ref = pytest.importorskip("spinedet.convert.tf_reference")

TOLERANCE = 1e-4  # max |diff| relative to the output's max |value|
SIZES = [(256, 256), (256, 384)]


def rel_diff(ours: torch.Tensor, theirs: np.ndarray) -> float:
    return float(np.abs(ours.numpy() - theirs).max() / np.abs(theirs).max())


def images(size):
    return np.random.default_rng(0).normal(size=(1, *size, 3)).astype(np.float32)


def torch_images(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2)


@pytest.mark.parametrize("activation", ["relu", "swish"])
@pytest.mark.parametrize(
    "variant,sizes",
    [("49s", SIZES), ("49", SIZES), ("96", SIZES), ("143", SIZES), ("190", [(128, 256)])],
)
def test_backbone_matches_model_garden(variant, sizes, activation, tmp_path):
    tf_model = ref.build_spinenet(variant, sizes[0], activation)
    ref.randomize(tf_model, seed=1)
    ckpt = TFCheckpoint(ref.save(tf_model, str(tmp_path)))
    model = spinedet.create_model(f"spinenet{variant}", activation=activation).eval()
    model.load_state_dict(convert_checkpoint(ckpt, model), strict=False)
    for size in sizes:
        if size != sizes[0]:  # another static input size: rebuild and restore the checkpoint
            tf_model = ref.build_spinenet(variant, size, activation)
            ref.restore(tf_model, ckpt.prefix)
        x = images(size)
        expected = ref.run_backbone(tf_model, x)
        with torch.no_grad():
            out = model(torch_images(x))
        for level, value in expected.items():
            diff = rel_diff(out[f"p{level}"].permute(0, 2, 3, 1), value)
            assert diff < TOLERANCE, (variant, activation, size, level, diff)


@pytest.mark.parametrize("activation", ["relu", "swish"])
@pytest.mark.parametrize("variant", ["49s", "49"])
def test_retinanet_matches_model_garden(variant, activation, tmp_path):
    name = f"spinenet{variant}_retinanet"
    model = spinedet.create_model(name, 91, activation=activation).eval()
    depth = len(model.head.classification_head.conv)
    for i, size in enumerate(SIZES):
        backbone = ref.build_spinenet(variant, size, activation)
        tf_model = ref.build_retinanet(backbone, 91, depth, model.backbone.out_channels, activation)
        if i == 0:
            ref.randomize(tf_model, seed=2)
            ckpt = TFCheckpoint(ref.save(tf_model, str(tmp_path)))
            model.load_state_dict(convert_checkpoint(ckpt, model), strict=False)
        else:
            ref.restore(tf_model, ckpt.prefix)
        x = images(size)
        scores, boxes = ref.run_head(tf_model, ref.run_backbone(backbone, x))
        with torch.no_grad():
            ours_scores, ours_boxes = model_garden_head_outputs(
                model, model.backbone(torch_images(x))
            )
        for j, level in enumerate(scores):
            assert rel_diff(ours_scores[j], scores[level]) < TOLERANCE, (name, size, level)
            assert rel_diff(ours_boxes[j], boxes[level]) < TOLERANCE, (name, size, level)
