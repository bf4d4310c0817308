"""Detectors: sizes against Model Garden, every registered model trains and infers, errors."""

import pytest
import torch

import spinedet
from spinedet.info import count_macs, model_info

# Model Garden's trainable parameters at 91 classes (its factory, the paper's head sizes, 3 RPN
# anchor scales for 143/190 as in its configs) and how many of them are conv biases followed by
# BatchNorm, which spinedet folds into the BN (RetinaNet: every tower conv; R-CNN: RPN conv,
# 4 box-head and 4 mask-head convs and the mask upsampling, 256 or 128 wide).
MODEL_GARDEN_DETECTORS = {
    "spinenet49s_retinanet": (11_265_942, 8 * 128),
    "spinenet49_retinanet": (28_543_383, 8 * 256),
    "spinenet96_retinanet": (42_974_871, 8 * 256),
    "spinenet143_retinanet": (66_959_511, 8 * 256),
    "spinenet190_retinanet": (163_637_351, 14 * 512),
    "spinenet49s_maskrcnn": (13_946_608, 10 * 128),
    "spinenet49_maskrcnn": (40_753_521, 10 * 256),
    "spinenet96_maskrcnn": (55_185_009, 10 * 256),
    "spinenet143_maskrcnn": (79_177_359, 10 * 256),
    "spinenet190_maskrcnn": (175_118_687, 10 * 512),
    # SpineNet-Mobile: separable tower convs whose pointwise bias precedes BN.
    "spinenet_mobile49_retinanet": (2_337_579, 8 * 48),
    "spinenet_mobile49s_retinanet": (1_030_653, 8 * 40),
    "spinenet_mobile49xs_retinanet": (872_711, 8 * 24),
}

SMALL = {"filter_scale": 0.25, "endpoint_filters": 32, "image_size": 96}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,counts", list(MODEL_GARDEN_DETECTORS.items()))
def test_detector_size_equals_model_garden(name, counts):
    model_garden, folded_biases = counts
    assert n_params(spinedet.create_model(name)) == model_garden - folded_biases


def test_head_structure_follows_paper():
    r190 = spinedet.create_model("spinenet190_retinanet")
    assert len(r190.head.classification_head.conv) == 7
    assert r190.head.classification_head.conv[0][0].out_channels == 512
    assert r190.anchor_generator.sizes[0][0] == pytest.approx(4 * 8)
    r49s = spinedet.create_model("spinenet49s_retinanet")
    assert len(r49s.head.regression_head.conv) == 4
    assert r49s.head.classification_head.conv[0][0].out_channels == 128
    assert r49s.head.classification_head.gamma == 1.5
    assert r49s.anchor_generator.num_anchors_per_location() == [9] * 5
    m = spinedet.create_model("spinenet49s_maskrcnn")
    assert m.roi_heads.box_head[-3].out_features == 512
    assert isinstance(m.roi_heads.box_head[-2], torch.nn.BatchNorm1d)
    assert m.roi_heads.mask_roi_pool.output_size == (14, 14)
    assert isinstance(m.roi_heads.box_head[0][1], torch.nn.BatchNorm2d)
    assert isinstance(m.roi_heads.mask_predictor.norm, torch.nn.BatchNorm2d)
    assert len(m.rpn.head.conv[0][1]) == 5  # a BatchNorm per level in the RPN
    assert m.rpn.anchor_generator.num_anchors_per_location() == [3] * 5
    m143 = spinedet.create_model("spinenet143_fasterrcnn", rpn_depth=2)
    assert m143.rpn.anchor_generator.num_anchors_per_location() == [9] * 5
    assert len(m143.rpn.head.conv) == 2


def test_rcnn_head_depths_are_options(tmp_path):
    # One 3x3 conv + BatchNorm of a 128-wide 49S head: kernel and BN scale/shift.
    conv = 128 * 128 * 9 + 2 * 128
    default = n_params(spinedet.create_model("spinenet49s_maskrcnn"))
    shallow = spinedet.create_model("spinenet49s_maskrcnn", box_convs=2, mask_convs=1)
    assert default - n_params(shallow) == (2 + 3) * conv
    assert len(shallow.roi_heads.mask_head) == 1
    spinedet.save_weights(shallow, tmp_path / "m.safetensors")
    assert n_params(spinedet.load_model(tmp_path / "m.safetensors")) == n_params(shallow)
    # No box convs: the pooled 7 x 7 RoI features go straight into the FC.
    pooled = spinedet.create_model("spinenet49s_fasterrcnn", box_convs=0, head_channels=64)
    assert pooled.roi_heads.box_head[1].in_features == 128 * 7 * 7
    pooled.eval()
    with torch.no_grad():
        assert pooled([torch.rand(3, 96, 96)])[0]["boxes"].shape[1] == 4
    with pytest.raises(ValueError, match="mask_convs=0: the mask head needs at least one conv"):
        spinedet.create_model("spinenet49s_maskrcnn", mask_convs=0)


def test_mask_samples_per_image_bounds_the_mask_heads_positives():
    """Six objects per image, all positives: the mask head sees every one by default, a random
    two per image with ``mask_samples_per_image=2``; the option leaves the weights alone."""
    torch.manual_seed(0)
    images = [torch.rand(3, 96, 96), torch.rand(3, 96, 96)]
    boxes = torch.tensor([[x, y, x + 28.0, y + 28.0] for x in (4, 34, 64) for y in (8, 52)])
    masks = torch.zeros(6, 96, 96, dtype=torch.uint8)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist(), strict=True):
        mask[y0:y1, x0:x1] = 1
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 2] * 3), "masks": masks}] * 2
    seen = {}
    for samples in (None, 2):
        model = spinedet.create_model("spinenet49s_maskrcnn", num_classes=3,
                                      mask_samples_per_image=samples, **SMALL)  # fmt: skip
        model.roi_heads.mask_head.register_forward_pre_hook(
            lambda module, args, key=samples: seen.__setitem__(key, len(args[0]))
        )
        losses = model(images, targets)
        assert torch.isfinite(losses["loss_mask"])
        assert model.description.option("mask_samples_per_image") == samples
    # Ground-truth boxes join the proposals, so each image has at least 6 positives.
    assert seen[None] >= 12 and seen[2] == 4
    # A training option: a model fine-tuned from these weights does not inherit it.
    assert "mask_samples_per_image" in spinedet.models.TASKS["maskrcnn"].runtime_options
    with pytest.raises(ValueError, match="mask_samples_per_image=0: expected 1 or more"):
        spinedet.create_model("spinenet49s_maskrcnn", mask_samples_per_image=0)


@pytest.mark.parametrize(
    "name",
    [
        n
        for n in spinedet.list_models()
        if spinedet.models.model_task(n) not in (None, "classifier")
    ],
)
def test_every_detector_trains_and_predicts_at_small_size(name):
    torch.manual_seed(0)
    model = spinedet.create_model(name, class_names=["a", "b"], **SMALL)
    images = [torch.rand(3, 96, 80), torch.rand(3, 70, 96)]
    targets = []
    for img in images:
        mask = torch.zeros(img.shape[1:], dtype=torch.uint8)
        mask[10:50, 20:60] = 1
        targets.append(
            {
                "boxes": torch.tensor([[20.0, 10.0, 60.0, 50.0]]),
                "labels": torch.tensor([1]),
                "masks": mask[None],
            }
        )
    losses = model(images, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in model.backbone.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2 and out[0]["boxes"].shape[1] == 4
    if name.endswith("maskrcnn"):
        assert out[1]["masks"].shape[-2:] == (70, 96)
    assert model.class_names == ["a", "b"] and model.num_classes == 3


@pytest.mark.parametrize(
    "name", [n for n in spinedet.list_models() if spinedet.models.model_task(n) is None]
)
def test_every_backbone_forward_backward(name):
    model = spinedet.create_model(name, filter_scale=0.2, endpoint_filters=8)
    out = model(torch.randn(2, 3, 64, 48))
    sum(v.sum() for v in out.values()).backward()
    assert out["p7"].shape == (2, 8, 1, 1)


def test_anchors_use_true_strides_for_odd_sizes():
    model = spinedet.create_model("spinenet49s_retinanet", num_classes=2, **SMALL).eval()
    from torchvision.models.detection.image_list import ImageList

    feats = model.backbone(torch.zeros(1, 3, 100, 100))
    anchors = model.anchor_generator(
        ImageList(torch.zeros(1, 3, 100, 100), [(100, 100)]), list(feats.values())
    )[0]
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    # Anchors sit at cell centres (i + 0.5) * stride: P3's on an 8 px grid starting at 4,
    # and the single P7 cell of a 100 px image at 64.
    assert anchors.shape[0] == 9 * sum((-(-100 // s)) ** 2 for s in (8, 16, 32, 64, 128))
    assert torch.allclose(centres[:9], torch.full((9, 2), 4.0), atol=1e-4)
    assert torch.allclose(centres[9 * 13 * 13 - 9], torch.tensor([100.0, 100.0]), atol=1e-4)
    assert torch.allclose(centres[-9:], torch.full((9, 2), 64.0), atol=1e-4)


@pytest.mark.parametrize(
    "name,size,paper",
    [
        ("spinenet49s_retinanet", 640, 33.8),
        ("spinenet49_retinanet", 640, 85.4),
        ("spinenet_mobile49_retinanet", 384, 1.0),
    ],
)
def test_retinanet_flops_within_10_percent_of_paper(name, size, paper):
    macs = count_macs(spinedet.create_model(name), size)
    assert abs(macs / 1e9 - paper) / paper < 0.10


def test_model_info_keys():
    info = model_info("spinenet49s", 224)
    assert info["params"] == info["backbone_params"] == 9_089_215
    assert [lvl["stride"] for lvl in info["levels"]] == [8, 16, 32, 64, 128]
    assert info["gflops"] > 0


def test_unknown_model_lists_close_matches():
    with pytest.raises(ValueError, match="did you mean spinenet49_maskrcnn"):
        spinedet.create_model("spinenet49_maskrnn")


@pytest.mark.parametrize("num_classes", [0, 1, -3, 2.5, True])
def test_bad_num_classes(num_classes):
    with pytest.raises(ValueError, match="num_classes"):
        spinedet.create_model("spinenet49s_retinanet", num_classes=num_classes)


def test_num_classes_must_agree_with_class_names():
    with pytest.raises(ValueError, match="does not match 2 class names"):
        spinedet.create_model("spinenet49s_fasterrcnn", num_classes=5, class_names=["a", "b"])


def test_backbone_rejects_num_classes():
    with pytest.raises(ValueError, match="backbone"):
        spinedet.create_model("spinenet49", num_classes=3)


def test_weights_round_trip_and_mismatch(tmp_path):
    model = spinedet.create_model("spinenet49s_retinanet", class_names=["x"], **SMALL)
    path = tmp_path / "w.safetensors"
    spinedet.save_weights(model, path)
    again = spinedet.create_model("spinenet49s_retinanet", num_classes=2, weights=path, **SMALL)
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])
    with pytest.raises(
        spinedet.models.WeightsError,
        match=r"with 2 classes\): 2 with another shape: head.classification_head.cls_logits",
    ):
        spinedet.create_model("spinenet49s_retinanet", num_classes=5, weights=path, **SMALL)
    (tmp_path / "bad.safetensors").write_bytes(b"not a file at all")
    with pytest.raises(spinedet.models.WeightsError, match="bad.safetensors: not a readable"):
        spinedet.create_model("spinenet49s", weights=tmp_path / "bad.safetensors")
    torch.save({"model": model.state_dict()}, tmp_path / "last.pt")  # a run's checkpoint
    with pytest.raises(spinedet.models.WeightsError, match="last.pt: a torch.save file .* run"):
        spinedet.create_model("spinenet49s_retinanet", weights=tmp_path / "last.pt", **SMALL)


def test_backbone_weights_load_into_detector(tmp_path):
    backbone = spinedet.create_model("spinenet49s", filter_scale=0.25, endpoint_filters=32)
    spinedet.save_weights(backbone, tmp_path / "b.safetensors")
    det = spinedet.create_model(
        "spinenet49s_maskrcnn", num_classes=3, weights=tmp_path / "b.safetensors", **SMALL
    )
    assert torch.equal(det.backbone.stem[0].conv.weight, backbone.stem[0].conv.weight)


def test_load_model_rebuilds_from_file_metadata(tmp_path):
    model = spinedet.create_model("spinenet49s_maskrcnn", class_names=["cat", "dog"], **SMALL)
    categories = [{"id": 3, "name": "cat"}, {"id": 9, "name": "dog"}]
    spinedet.save_weights(model, tmp_path / "m.safetensors", {"categories": categories})
    again = spinedet.load_model(tmp_path / "m.safetensors", box_score_thresh=0.5)
    assert again.class_names == ["cat", "dog"] and again.roi_heads.score_thresh == 0.5
    assert again.transform.min_size == (96,)
    assert torch.equal(again.backbone.stem[0].conv.weight, model.backbone.stem[0].conv.weight)
    assert (
        spinedet.models.weights.read_metadata(tmp_path / "m.safetensors")["categories"]
        == categories
    )


def test_detector_options_reach_torchvision_and_unknown_options_are_named():
    model = spinedet.create_model(
        "spinenet49s_maskrcnn", num_classes=3, box_batch_size_per_image=64, activation="swish"
    )
    assert model.roi_heads.fg_bg_sampler.batch_size_per_image == 64
    assert isinstance(model.backbone.act, torch.nn.SiLU)
    fast = spinedet.create_model("spinenet49s_retinanet", num_classes=3, bn_momentum=0.1)
    assert {m.momentum for m in fast.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.1}
    with pytest.raises(ValueError, match="unknown option 'box_size'"):
        spinedet.create_model("spinenet49s_maskrcnn", num_classes=3, box_size=3)


def test_roi_align_samples_small_boxes_like_model_garden():
    """Features equal to their x index make RoIAlign's bilinear samples exact: bin centres of a
    box (x1, x2) on level l are x1 / 2**l + (i + 0.5) * (x2 - x1) / 2**l / 7. torchvision's
    default RoIAlign would stretch the 4 px box below to a whole 8 px cell."""
    from spinedet.models.heads import PyramidRoIAlign

    pool = PyramidRoIAlign(range(3, 8), output_size=7)
    feats = {
        f"p{lvl}": torch.arange(512 >> lvl, dtype=torch.float32).expand(1, 2, 512 >> lvl, -1)
        for lvl in range(3, 8)
    }
    # x1, y1, x2, y2: 4 x 4 px (level 3), 120 x 100 (3), 500 x 500 (5: sqrt area 500 -> 5)
    boxes = torch.tensor([[100.0, 40, 104, 44], [10, 20, 130, 120], [6, 8, 506, 508]])
    out = pool(feats, [boxes], [(512, 512)])
    for box, crop, level in zip(boxes, out, (3, 3, 5), strict=True):
        x1, x2 = box[0] / 2**level, box[2] / 2**level
        centres = x1 + (torch.arange(7) + 0.5) * (x2 - x1) / 7
        assert torch.allclose(crop[0, 3], centres, atol=1e-5), (box, crop[0, 3])
