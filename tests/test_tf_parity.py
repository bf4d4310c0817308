"""Parity with TensorFlow Model Garden: full-size models with random weights and BN statistics,
converted from their checkpoints. Runs where TensorFlow is installed (``.ci/tf-parity.sh``)."""

import numpy as np
import pytest
import torch
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

import spinedet  # before TensorFlow: see tf_reference
from spinedet.convert import TFCheckpoint, convert_checkpoint
from spinedet.convert.tf_mapping import (
    _model_garden_layout,
    model_garden_head_outputs,
    model_garden_roi_outputs,
)

pytest.importorskip("tensorflow")
pytest.importorskip("official")
ref = pytest.importorskip("tf_reference")  # tests/tf_reference.py

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


def rois_on_every_level(size, rng):
    """RoIs (y1, x1, y2, x2) inside an image of ``size``: smaller than one P3 cell, one per
    level 3..7 (sqrt area 100, 300, 600, 1000, 1850) and random ones."""
    h, w = size
    fixed = [(5, 7, 8.5, 12), (40, 30, 43, 36)]  # 3.5 x 5 and 3 x 6 px
    for side in (100, 300, 600, 1000, 1850):
        y, x = rng.uniform(0, h - side), rng.uniform(0, w - side)
        fixed.append((y, x, y + side, x + side))
    sides = np.exp(rng.uniform(np.log(4), np.log(min(size)), size=(25, 2)))
    y, x = rng.uniform(0, h - sides[:, 0]), rng.uniform(0, w - sides[:, 1])
    rois = np.concatenate([fixed, np.stack([y, x, y + sides[:, 0], x + sides[:, 1]], 1)])
    return rois.astype(np.float32)


def to_model_garden_boxes(boxes: torch.Tensor, generator, shape) -> np.ndarray:
    """torchvision-ordered ``x1, y1, x2, y2`` per-anchor boxes of one level -> Model Garden's
    ``[H, W, A * 4]`` ``y1, x1, y2, x2`` layout (swapping x and y is the box-delta reorder)."""
    as_output = boxes.reshape(1, *shape, -1).permute(0, 3, 1, 2)  # (1, A * 4, H, W)
    return _model_garden_layout(as_output, generator, box=True)[0].numpy()


@pytest.mark.parametrize(
    "variant,activation,task",
    [
        ("49s", "relu", "maskrcnn"),
        ("49", "relu", "maskrcnn"),
        ("49", "swish", "maskrcnn"),
        ("143", "swish", "maskrcnn"),
        ("49s", "swish", "fasterrcnn"),
    ],
)
def test_rcnn_matches_model_garden(variant, activation, task, tmp_path):
    masks = task == "maskrcnn"
    model = spinedet.create_model(f"spinenet{variant}_{task}", 91, activation=activation)
    model.eval()
    channels, fc_dim = model.backbone.out_channels, model.roi_heads.box_head[-3].out_features
    generator = model.rpn.anchor_generator
    scales, anchor_size = len(generator.sizes[0]), generator.sizes[0][0] / 8
    size = SIZES[1]
    backbone = ref.build_spinenet(variant, size, activation)
    tf_model = ref.build_maskrcnn(
        backbone,
        91,
        channels,
        fc_dim,
        activation,
        include_mask=masks,
        rpn_scales=scales,
        anchor_size=anchor_size,
    )
    ref.randomize(tf_model, seed=4)
    ckpt = TFCheckpoint(ref.save(tf_model, str(tmp_path)))
    model.load_state_dict(convert_checkpoint(ckpt, model), strict=False)
    # Same layers: Model Garden's parameters less the conv biases folded into BN means
    # (1 RPN and 4 box-head convs, and 4 mask-head convs and the mask upsampling).
    tf_params = sum(int(np.prod(v.shape)) for v in tf_model.trainable_variables)
    folded = (10 if masks else 5) * channels
    assert sum(p.numel() for p in model.parameters()) == tf_params - folded

    # First stage on a real image: RPN outputs, anchors and decoded proposals.
    x = images(size)
    features = ref.run_backbone(backbone, x)
    expected = ref.run_rcnn_heads(tf_model, features, np.asarray([[8.0, 8, 60, 80]]), [1])
    tf_anchors = ref.anchors(size, scales, anchor_size)
    with torch.no_grad():
        ours = model.backbone(torch_images(x))
        scores, deltas = model_garden_head_outputs(model, ours)
        image_list = ImageList(torch.zeros(1, 3, *size), [size])
        anchors = generator(image_list, list(ours.values()))[0]
        raw_deltas = model.rpn.head(list(ours.values()))[1]
    start = 0
    for i, level in enumerate(map(str, model.backbone.levels)):
        assert rel_diff(scores[i], expected[f"rpn_scores{level}"]) < TOLERANCE, level
        assert rel_diff(deltas[i], expected[f"rpn_boxes{level}"]) < TOLERANCE, level
        shape = tf_anchors[level].shape[:2]
        n = int(np.prod(shape)) * generator.num_anchors_per_location()[0]
        level_anchors = anchors[start : start + n]
        start += n
        mine = to_model_garden_boxes(level_anchors, generator, shape)
        assert np.abs(mine - tf_anchors[level]).max() < 1e-3, level
        # Proposals before NMS: torchvision's decoder on torchvision's layout vs Model Garden's.
        tv_deltas = raw_deltas[i][0].reshape(-1, 4, *shape).permute(2, 3, 0, 1).reshape(-1, 4)
        decoded = model.rpn.box_coder.decode_single(tv_deltas, level_anchors)
        tf_decoded = ref.decode_boxes(
            expected[f"rpn_boxes{level}"][0].reshape(-1, 4), tf_anchors[level].reshape(-1, 4)
        )
        mine = to_model_garden_boxes(decoded, generator, shape).reshape(-1, 4)
        assert rel_diff(torch.from_numpy(mine), tf_decoded) < TOLERANCE, level

    # Second stage on synthetic features of a 2048 x 1920 image, RoIs on every level.
    rng = np.random.default_rng(5)
    big = (2048, 1920)
    synthetic = {
        str(lvl): rng.normal(size=(1, big[0] >> lvl, big[1] >> lvl, channels)).astype(np.float32)
        for lvl in model.backbone.levels
    }
    rois = rois_on_every_level(big, rng)
    classes = rng.integers(0, 91, len(rois))
    expected = ref.run_rcnn_heads(tf_model, synthetic, rois, classes)
    with torch.no_grad():
        feats = {f"p{k}": torch_images(v) for k, v in synthetic.items()}
        out = model_garden_roi_outputs(
            model, feats, big, torch.from_numpy(rois), torch.from_numpy(classes)
        )
        tv_deltas = model.roi_heads.box_predictor(
            model.roi_heads.box_head(
                model.roi_heads.box_roi_pool(
                    feats, [torch.from_numpy(rois[:, [1, 0, 3, 2]])], [big]
                )
            )
        )[1]
        decoded = model.roi_heads.box_coder.decode(
            tv_deltas, [torch.from_numpy(rois[:, [1, 0, 3, 2]])]
        )
    keys = ("box_features", "classes", "deltas") + (("mask_features", "masks") if masks else ())
    assert set(out) == set(expected) - {k for k in expected if k.startswith("rpn")}
    for key in keys:
        assert rel_diff(out[key], expected[key]) < TOLERANCE, key
    tf_decoded = ref.decode_boxes(
        expected["deltas"].reshape(len(rois), -1, 4), rois[:, None], [10.0, 10.0, 5.0, 5.0]
    )
    assert rel_diff(decoded[..., [1, 0, 3, 2]], tf_decoded) < TOLERANCE


@pytest.mark.parametrize(
    "variant,activation", [("49", "swish"), ("49s", "relu"), ("49xs", "swish")]
)
def test_mobile_retinanet_matches_model_garden(variant, activation, tmp_path):
    model = spinedet.create_model(f"spinenet_mobile{variant}_retinanet", 91, activation=activation)
    model.eval()
    channels = model.backbone.out_channels
    for i, size in enumerate(SIZES):
        backbone = ref.build_spinenet_mobile(variant, size, activation)
        tf_model = ref.build_retinanet(backbone, 91, 4, channels, activation, separable=True)
        if i == 0:
            ref.randomize(tf_model, seed=6)
            ckpt = TFCheckpoint(ref.save(tf_model, str(tmp_path)))
            model.load_state_dict(convert_checkpoint(ckpt, model), strict=False)
            # Model Garden's count less the tower convs' pointwise biases, folded into BN.
            tf_params = sum(int(np.prod(v.shape)) for v in tf_model.trainable_variables)
            assert sum(p.numel() for p in model.parameters()) == tf_params - 8 * channels
        else:
            ref.restore(tf_model, ckpt.prefix)
        x = images(size)
        features = ref.run_backbone(backbone, x)
        scores, boxes = ref.run_head(tf_model, features)
        with torch.no_grad():
            ours = model.backbone(torch_images(x))
            ours_scores, ours_boxes = model_garden_head_outputs(model, ours)
        for j, level in enumerate(scores):
            out = ours[f"p{level}"].permute(0, 2, 3, 1)
            assert rel_diff(out, features[level]) < TOLERANCE, (variant, size, level)
            assert rel_diff(ours_scores[j], scores[level]) < TOLERANCE, (variant, size, level)
            assert rel_diff(ours_boxes[j], boxes[level]) < TOLERANCE, (variant, size, level)


@pytest.mark.parametrize(
    "variant,activation,task",
    [
        ("49s", "relu", "maskrcnn"),
        ("49", "swish", "maskrcnn"),
        ("49s", "relu", "retinanet"),
        ("49", "swish", "retinanet"),
    ],
)
def test_detections_match_model_garden(variant, activation, task, tmp_path):
    """End to end: Model Garden's inference (proposals, NMS, detection generator, masks) against
    spinedet's torchvision pipeline on the converted weights, from the raw image."""
    size = (256, 384)
    model = spinedet.create_model(
        f"spinenet{variant}_{task}", 91, activation=activation, image_size=max(size)
    ).eval()
    channels = model.backbone.out_channels
    backbone = ref.build_spinenet(variant, size, activation)
    if task == "retinanet":
        depth = len(model.head.classification_head.conv)
        anchor_size = model.anchor_generator.sizes[0][0] / 8
        tf_model = ref.build_retinanet(
            backbone, 91, depth, channels, activation, anchor_size=anchor_size
        )
    else:
        fc_dim = model.roi_heads.box_head[-3].out_features
        tf_model = ref.build_maskrcnn(backbone, 91, channels, fc_dim, activation)
    ref.randomize(tf_model, seed=7)
    image = np.random.default_rng(8).uniform(size=(*size, 3)).astype(np.float32)
    mean, std = np.asarray(model.transform.image_mean), np.asarray(model.transform.image_std)
    normalised = ((image - mean) / std).astype(np.float32)[None]
    ref.calibrate(tf_model, normalised)
    model.load_state_dict(
        convert_checkpoint(TFCheckpoint(ref.save(tf_model, str(tmp_path))), model), strict=False
    )
    expected = ref.run_detections(tf_model, normalised)
    tensor = torch.from_numpy(image).permute(2, 0, 1)
    with torch.no_grad():
        ours = model([tensor])[0]
    # Calibration makes both sides busy up to Model Garden's cap of 100 (torchvision's RetinaNet
    # keeps up to 300: the first 100 must be Model Garden's).
    n = len(expected["scores"])
    assert n == 100 and len(ours["scores"]) >= n
    iou = box_iou(torch.from_numpy(expected["boxes"][:, [1, 0, 3, 2]]), ours["boxes"])
    matched = []
    for i in range(n):
        same = (ours["labels"] == int(expected["classes"][i])) & (iou[i] > 0.99)
        same &= (ours["scores"] - float(expected["scores"][i])).abs() < 1e-3
        if same.any():
            matched.append((i, int(same.nonzero()[0, 0])))
    # All but near-ties at the 100-detection cut-off.
    assert len(matched) >= 0.95 * n, len(matched)
    if task == "maskrcnn":  # mask probabilities of the matched detections
        mine = [j for _, j in matched]
        roi = model.roi_heads
        with torch.no_grad():
            features = model.backbone(model.transform([tensor])[0].tensors)
            crops = roi.mask_roi_pool(features, [ours["boxes"][mine]], [size])
            logits = roi.mask_predictor(roi.mask_head(crops))
        probs = logits[torch.arange(len(mine)), ours["labels"][mine]].sigmoid()
        theirs = expected["masks"][[i for i, _ in matched]]
        assert np.abs(probs.numpy() - theirs).max() < 1e-3
