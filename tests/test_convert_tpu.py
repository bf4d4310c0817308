"""convert-tf of tensorflow/tpu (TF1 name-based) checkpoints without TensorFlow: the committed
fixtures (scripts/make_tpu_fixture.py) against the outputs tensorflow/tpu's code computed."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

import spinedet
from spinedet.cli import main
from spinedet.convert import ConversionError, TFCheckpoint, api, convert_tf
from spinedet.convert.tf_checkpoint import CheckpointError, TensorBundle, open_checkpoint
from spinedet.convert.tf_mapping import model_garden_head_outputs, model_garden_roi_outputs
from spinedet.convert.tpu_mapping import TPU_ANCHOR_RATIOS, convert_tpu_checkpoint
from spinedet.errors import ModelError
from spinedet.models import describe, read_description
from spinedet.models.classifier import spinenet_classifier
from spinedet.models.pixel_boxes import PixelBoxCoder
from spinedet.models.registry import build_from_description
from spinedet.models.weights import WeightsError

FIXTURES = Path(__file__).parent / "fixtures"
CLASSIFIER = FIXTURES / "tpu_classifier"
RETINANET = FIXTURES / "tpu_retinanet"
MASKRCNN = FIXTURES / "tpu_maskrcnn"
MOBILE = FIXTURES / "tpu_mobile"
MOBILE_SCALING = {"filter_scale": 0.2, "endpoint_filters": 16}
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


def check_retinanet(model: torch.nn.Module, images: torch.Tensor, outputs: dict) -> None:
    """A converted RetinaNet's pyramid and head outputs (in tensorflow/tpu's layout) against
    TensorFlow's, within TOLERANCE."""
    with torch.no_grad():
        features = model.backbone(images)
        scores, boxes = model_garden_head_outputs(model, features, TPU_ANCHOR_RATIOS)
    check_pyramid(features, outputs)
    for i, level in enumerate(range(3, 8)):
        assert rel_diff(scores[i], outputs[f"scores{level}"]) < TOLERANCE, level
        assert rel_diff(boxes[i], outputs[f"boxes{level}"]) < TOLERANCE, level


def load_classifier(path: Path) -> torch.nn.Module:
    """A converted classifier rebuilt from its file."""
    return spinedet.load_model(path)


def run_detector(model: torch.nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """spinedet's whole inference (transform, proposals, NMS, ...) on the fixture's normalised
    image, given as the raw image the transform normalises back. For an R-CNN, the box head's
    results before the transform pastes the masks (28 x 28 per box, as tensorflow/tpu's) and
    the RPN's ``proposals``."""
    t = model.transform
    mean, std = torch.tensor(t.image_mean)[:, None, None], torch.tensor(t.image_std)[:, None, None]
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    if hasattr(model, "roi_heads"):  # copies: the transform pastes masks into the same dict
        hooks.append(model.roi_heads.register_forward_hook(lambda m, i, o: seen.update(o[0][0])))
        hooks.append(
            model.rpn.register_forward_hook(lambda m, i, o: seen.update(proposals=o[0][0]))
        )
    with torch.no_grad():
        out = model([images[0] * std + mean])[0]
    for hook in hooks:
        hook.remove()
    return seen or out


def match_detections(
    ours: dict[str, torch.Tensor], outputs: dict[str, np.ndarray]
) -> tuple[list[tuple[int, int]], list[int]]:
    """Pairs (tensorflow/tpu's index, ours) of equal detections: same class, score within
    TOLERANCE, box corners within TOLERANCE of the image's larger side; and the indices of
    tensorflow/tpu's that have none."""
    size = max(outputs["images"].shape[1:3])
    boxes = torch.from_numpy(outputs["detection_boxes"][:, [1, 0, 3, 2]])
    pairs, missing = [], []
    for i, (box, score, label) in enumerate(
        zip(boxes, outputs["detection_scores"], outputs["detection_classes"], strict=True)
    ):
        same = (ours["labels"] == int(label)) & ((ours["scores"] - float(score)).abs() < TOLERANCE)
        same &= (ours["boxes"] - box).abs().amax(1) < TOLERANCE * size
        if same.any():
            pairs.append((i, int(same.nonzero()[0, 0])))
        else:
            missing.append(i)
    return pairs, missing


def degenerate(boxes: np.ndarray) -> np.ndarray:
    """``y1, x1, y2, x2`` boxes without area: wholly outside the image, clipped to its border."""
    return (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])


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


def test_zoo_classifiers_are_named_with_imagenet_classes(tmp_path, monkeypatch):
    names = api._imagenet_names(1001)  # the zoo's: class 0 is background
    assert len(names) == 1001 and names[:3] == ["background", "tench", "goldfish"]
    assert names[-1] == "toilet tissue" and api._imagenet_names(1000) == names[1:]
    assert api._imagenet_names(5089) is None  # iNaturalist: numbered
    # The fixture has 5 classes: name them as if they were ImageNet's, to follow the names.
    monkeypatch.setattr(api, "_imagenet_names", lambda n: [f"synset{i}" for i in range(n)])
    out = tmp_path / "classifier.safetensors"
    convert_tf(CLASSIFIER, "spinenet49_classifier", out, **SCALING)
    assert read_description(out).class_names == [f"synset{i}" for i in range(5)]
    assert load_classifier(out).class_names[4] == "synset4"


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
    check_retinanet(model, *expected(RETINANET))


def test_retinanet_detections_match_tensorflow_tpu(tmp_path):
    """End to end: tensorflow/tpu's MultilevelDetectionGenerator (as its RetinaNet configs set
    it) against spinedet's inference on the converted file, which records the options."""
    out = tmp_path / "retinanet.safetensors"
    convert_tf(RETINANET, "spinenet49s_retinanet", out, **SCALING)
    kwargs = read_description(out).options_dict()
    assert kwargs["box_convention"] == "tpu" and kwargs["detections_per_img"] == 100
    images, outputs = expected(RETINANET)
    model = spinedet.load_model(out, image_size=max(images.shape[-2:])).eval()
    ours = run_detector(model, images)
    pairs, missing = match_detections(ours, outputs)
    assert len(ours["scores"]) == 100 and not missing, missing
    assert [j for _, j in pairs] == list(range(100))  # same order
    assert (ours["labels"] > 0).all()  # the background output is never a detection
    # Many boxes reach the image's last pixel (clipped to size - 1, not size).
    assert (ours["boxes"][:, 2] == images.shape[-1] - 1).sum() >= 10


def test_torchvision_box_convention_would_differ(tmp_path):
    """Decoded and clipped the torchvision way, the same detections move by up to a pixel: none
    is tensorflow/tpu's any more."""
    out = tmp_path / "retinanet.safetensors"
    convert_tf(RETINANET, "spinenet49s_retinanet", out, **SCALING)
    images, outputs = expected(RETINANET)
    model = spinedet.load_model(
        out, image_size=max(images.shape[-2:]), box_convention="torchvision"
    ).eval()
    ours = run_detector(model, images)
    iou = box_iou(torch.from_numpy(outputs["detection_boxes"][:, [1, 0, 3, 2]]), ours["boxes"])
    assert len(match_detections(ours, outputs)[1]) == 100 and iou.amax(1).median() > 0.95
    with pytest.raises(ModelError, match="unknown box_convention 'tf'"):
        spinedet.create_model("spinenet49s_retinanet", box_convention="tf")


def test_mobile_retinanet_matches_tensorflow_tpu(tmp_path):
    """The zoo's SpineNetMB-49 RetinaNet (reduced): tensorflow/tpu's SpineNetMBConv gates its
    squeeze-excitation with swish and sigmoid (Model Garden: ReLU, hard-sigmoid), pads strided
    convs its fixed way and has separable head convs; the file records all of it."""
    out = tmp_path / "mobile.safetensors"
    summary = convert_tf(MOBILE, "spinenet_mobile49_retinanet", out, **MOBILE_SCALING)
    assert "activation=swish" in summary and "squeeze_excite=tpu" in summary
    kwargs = read_description(out).options_dict()
    assert kwargs["padding"] == "fixed" and kwargs["box_convention"] == "tpu"
    assert kwargs["head_depth"] == 2 and kwargs["bn_eps"] == 1e-4
    images, outputs = expected(MOBILE)
    model = spinedet.load_model(out, image_size=max(images.shape[-2:])).eval()
    check_retinanet(model, images, outputs)
    ours = run_detector(model, images)
    pairs, missing = match_detections(ours, outputs)
    assert len(ours["scores"]) == 100 and not missing, missing
    assert [j for _, j in pairs] == list(range(100))
    # Model Garden's squeeze-excitation would not match (measured: 0.7% to 4% off), with every
    # shape equal: loading the file into such a model is refused.
    with pytest.raises(WeightsError, match="squeeze_excite='tpu', this model uses squeeze_exci"):
        spinedet.load_model(out, squeeze_excite="model_garden")
    other = build_from_description(read_description(out), squeeze_excite="model_garden").eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        diffs = [
            rel_diff(v.permute(0, 2, 3, 1), outputs[k]) for k, v in other.backbone(images).items()
        ]
    assert min(diffs) > 10 * TOLERANCE, diffs


def test_mobile_and_spinenet_checkpoints_are_told_apart(tmp_path):
    out = tmp_path / "w.safetensors"
    with pytest.raises(ConversionError, match="tensorflow/tpu SpineNet-Mobile, not a spinenet49s_"):
        convert_tf(MOBILE, "spinenet49s_retinanet", out, **SCALING)
    with pytest.raises(ConversionError, match="--model spinenet49_retinanet"):
        convert_tf(RETINANET, "spinenet_mobile49_retinanet", out, **SCALING)
    assert not out.exists()


def test_pixel_box_coder_is_tensorflow_tpus():
    """tensorflow/tpu's decode_boxes: a box from 0 to 9 is 10 pixels wide; doubled about its
    centre 5 it spans -5..14 (torchvision's coder: 9 wide, -4.5..13.5)."""
    coder = PixelBoxCoder((1.0, 1.0, 1.0, 1.0))
    anchors = torch.tensor([[0.0, 0.0, 9.0, 9.0], [10.0, 20.0, 29.0, 59.0]])
    deltas = torch.tensor([[0.0, 0.0, 0.6931472, 0.6931472], [0.1, -0.2, 0.0, 0.3]])
    decoded = coder.decode_single(deltas, anchors)
    assert torch.allclose(decoded[0], torch.tensor([-5.0, -5.0, 14.0, 14.0]), atol=1e-5)
    assert torch.allclose(coder.encode_single(decoded, anchors), deltas, atol=1e-5)


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


def test_maskrcnn_detections_match_tensorflow_tpu(tmp_path):
    """End to end: tensorflow/tpu's ROIGenerator, GenericDetectionGenerator and mask head on
    its detections, as its Mask R-CNN configs set them, against spinedet's inference."""
    out = tmp_path / "maskrcnn.safetensors"
    convert_tf(MASKRCNN, "spinenet49s_maskrcnn", out, **SCALING)
    assert read_description(out).option("box_convention") == "tpu"
    images, outputs = expected(MASKRCNN)
    model = spinedet.load_model(out, image_size=max(images.shape[-2:])).eval()
    ours = run_detector(model, images)
    # Proposals: all 1000 are tensorflow/tpu's, with the 8 that clipping squeezed to the
    # image's border (no continuous area, one pixel wide as tensorflow/tpu counts: torchvision's
    # RPN would drop them and take others).
    assert degenerate(outputs["proposals"]).sum() == 8
    theirs = torch.from_numpy(outputs["proposals"][:, [1, 0, 3, 2]])
    dist = (theirs[:, None] - ours["proposals"][None]).abs().amax(-1)
    assert len(ours["proposals"]) == 1000
    assert dist.amin(1).max() < 1e-3 and dist.amin(0).max() < 1e-3
    # Detections: all 100 in the same order, the 3 without continuous area included.
    pairs, missing = match_detections(ours, outputs)
    assert len(ours["scores"]) == 100 and not missing, missing
    assert [j for _, j in pairs] == list(range(100))
    assert degenerate(outputs["detection_boxes"]).sum() == 3
    # Masks of the detections (28 x 28 probabilities): the boxes agree to ~1e-4 pixels, and
    # RoIAlign turns that into up to ~2e-4 (measured) on the probabilities.
    assert np.abs(ours["masks"][:, 0].numpy() - outputs["detection_masks"]).max() < 1e-3


def test_tpu_box_convention_rcnn_trains_and_pads_its_proposals():
    """A Mask R-CNN in tensorflow/tpu's convention trains, and its RPN, like tensorflow/tpu's,
    gives exactly ``post_nms_top_n`` proposals per image, zero boxes after the survivors."""
    torch.manual_seed(0)
    small = {"filter_scale": 0.25, "endpoint_filters": 16, "image_size": 64}
    model = spinedet.create_model("spinenet49s_maskrcnn", 3, box_convention="tpu", **small)
    assert type(model.rpn).__name__ == "PixelBoxRPN"
    images = [torch.rand(3, 64, 48), torch.rand(3, 40, 64)]
    mask = torch.zeros(64, 64, dtype=torch.uint8)
    target = {"boxes": torch.tensor([[8.0, 8.0, 30.0, 36.0]]), "labels": torch.tensor([2])}
    targets = [target | {"masks": mask[None, : im.shape[1], : im.shape[2]]} for im in images]
    loss = sum(model(images, targets).values())
    assert torch.isfinite(loss)
    loss.backward()
    model.eval()
    seen = []
    hook = model.rpn.register_forward_hook(lambda m, i, o: seen.extend(o[0]))
    with torch.no_grad():
        model(images)
    hook.remove()
    # 64 x 64 has 3 * (256 + 64 + 16 + 4 + 1) = 1023 anchors: NMS leaves fewer than 1000.
    assert [len(p) for p in seen] == [1000, 1000]
    padding = seen[0].eq(0).all(1)
    assert 0 < padding.sum() < 1000 and padding[-int(padding.sum()) :].all()


def test_backbone_alone_from_a_classifier_or_retinanet(tmp_path):
    for fixture, outputs in [(CLASSIFIER, expected(CLASSIFIER)), (RETINANET, expected(RETINANET))]:
        out = tmp_path / f"{fixture.name}.safetensors"
        variant = "49" if fixture == CLASSIFIER else "49s"
        convert_tf(fixture, f"spinenet{variant}", out, **SCALING)
        model = spinedet.load_model(out).eval()
        with torch.no_grad():
            check_pyramid(model(outputs[0]), outputs[1])
    # A detector built on the converted backbone takes its tensorflow/tpu padding, downsampling
    # and BN epsilon from the file (only the sizes given), and computes the same pyramid.
    detector = spinedet.create_model("spinenet49s_retinanet", 3, weights=out, **SCALING).eval()
    with torch.no_grad():
        check_pyramid(detector.backbone(outputs[0]), outputs[1])


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
        convert_tf(
            CLASSIFIER, "spinenet49_classifier", tmp_path / "x.safetensors", activation="swish",
            **SCALING,
        )  # fmt: skip


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


def test_help_says_mask_rcnn_converts_whole(capsys):
    with pytest.raises(SystemExit):
        main(["convert-tf", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "backbone only" not in text and "Mask R-CNN (backbone, RPN, box and mask heads)" in text
