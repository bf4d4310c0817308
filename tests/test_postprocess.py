"""Whole-batch post-processing (spinedet.models.postprocess) selects the detections
torchvision's per-image loops select, and pastes the masks it pastes: each is compared with
torchvision's own method on the same inputs."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import same_detections
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.roi_heads import RoIHeads, paste_masks_in_image
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.transforms.v2 import functional as TF

import spinedet
from spinedet.models import postprocess
from spinedet.models.postprocess import DetectionTransform, paste_masks, pasting_crops
from spinedet.models.rcnn import BatchedRoIHeads

SIZE = 128


def torchvision_retinanet_detections(model, head_outputs, anchors, image_shapes):
    """torchvision's selection with the background logit removed, as BackgroundFreeRetinaNet
    reports detections."""
    background = torch.zeros(1, dtype=torch.long, device=anchors[0][0].device)
    logits = [x.index_fill(-1, background, float("-inf")) for x in head_outputs["cls_logits"]]
    outputs = {"cls_logits": logits, "bbox_regression": head_outputs["bbox_regression"]}
    return RetinaNet.postprocess_detections(model, outputs, anchors, image_shapes)


@pytest.mark.parametrize(
    "options",
    [
        {"score_thresh": 0.0, "detections_per_img": 30},  # every candidate, the best 4 k first
        {"score_thresh": 0.0, "detections_per_img": 30, "nms_thresh": 0.01},  # must look further
        {"score_thresh": 0.3, "detections_per_img": 300},  # few candidates: all at once
        {"score_thresh": 0.0, "detections_per_img": 30, "box_convention": "tpu"},
    ],
)
def test_retinanet_batch_selection_equals_torchvision(options, device, monkeypatch):
    torch.manual_seed(0)
    model = spinedet.create_model(
        "spinenet49s_retinanet", num_classes=6, image_size=SIZE, filter_scale=0.25, **options
    )
    # Class scores that vary from place to place (an untrained head's are all 0.01).
    torch.nn.init.normal_(model.head.classification_head.cls_logits.weight, std=3.0)
    model = model.eval().to(device)
    calls = []
    original = type(model).postprocess_detections

    def both(self, head_outputs, anchors, image_shapes):
        ours = original(self, head_outputs, anchors, image_shapes)
        if options.get("box_convention") == "tpu":  # the per-image masking it replaced
            theirs = tpu_reference(self, head_outputs, anchors, image_shapes)
        else:
            theirs = torchvision_retinanet_detections(self, head_outputs, anchors, image_shapes)
        calls.append((ours, theirs))
        return ours

    monkeypatch.setattr(type(model), "postprocess_detections", both)
    images = [torch.rand(3, SIZE, SIZE), torch.rand(3, 96, SIZE), torch.rand(3, SIZE, 80)]
    with torch.no_grad():
        model([i.to(device) for i in images])
    (ours, theirs), *_ = calls
    counts = [len(d["boxes"]) for d in ours]
    assert counts == [len(d["boxes"]) for d in theirs]
    assert max(counts) > 0 and (options["detections_per_img"] < 300 or max(counts) < 300)
    for a, b in zip(ours, theirs, strict=True):
        assert same_detections(a, b)
        assert not (a["labels"] == 0).any()
        assert torch.equal(a["scores"], a["scores"].sort(descending=True).values)


def tpu_reference(model, head_outputs, anchors, image_shapes):
    """The tensorflow/tpu convention's masking image by image: no all-zero box from any class."""
    from torchvision.ops import clip_boxes_to_image

    from spinedet.models.pixel_boxes import corner_boxes

    logits = [x.clone() for x in head_outputs["cls_logits"]]
    for i, shape in enumerate(image_shapes):
        for x, d, a in zip(logits, head_outputs["bbox_regression"], anchors[i], strict=True):
            boxes = clip_boxes_to_image(model.box_coder.decode_single(d[i], a), shape)
            x[i, corner_boxes(boxes)] = float("-inf")
    outputs = {"cls_logits": logits, "bbox_regression": head_outputs["bbox_regression"]}
    return torchvision_retinanet_detections(model, outputs, anchors, image_shapes)


@pytest.mark.parametrize("score_thresh", [0.0, 0.05])
def test_roi_heads_batch_selection_equals_torchvision(score_thresh, device):
    torch.manual_seed(0)
    model = spinedet.create_model(
        "spinenet49s_maskrcnn", num_classes=8, image_size=SIZE, filter_scale=0.25,
        box_score_thresh=score_thresh, box_detections_per_img=25,
    )  # fmt: skip
    heads = model.roi_heads
    assert isinstance(heads, BatchedRoIHeads)
    counts, classes = [40, 33, 0], 8  # images with different numbers of proposals, one none
    proposals = []
    for n in counts:
        corner = torch.rand(n, 2) * 100
        proposals.append(torch.cat([corner, corner + 4 + torch.rand(n, 2) * 40], 1).to(device))
    logits = (torch.randn(sum(counts), classes) * 3).to(device)
    regression = (torch.randn(sum(counts), classes * 4) * 0.5).to(device)
    shapes = [(SIZE, SIZE), (100, 120), (SIZE, 64)]
    ours = heads.postprocess_detections(logits, regression, proposals, shapes)
    theirs = RoIHeads.postprocess_detections(heads, logits, regression, proposals, shapes)
    found = [len(b) for b in ours[0]]
    assert found == [len(b) for b in theirs[0]] and found[0] == 25 and found[2] == 0
    for i in range(len(counts)):
        a = dict(zip(("boxes", "scores", "labels"), (o[i] for o in ours), strict=True))
        b = dict(zip(("boxes", "scores", "labels"), (t[i] for t in theirs), strict=True))
        assert same_detections(a, b)
    nothing = [p[:0] for p in proposals]  # no image has a proposal
    ours = heads.postprocess_detections(logits[:0], regression[:0], nothing, shapes)
    assert [len(b) for b in ours[0]] == [0, 0, 0] and ours[0][0].shape == (0, 4)


def test_batched_mask_pasting_equals_torchvision(device):
    g = torch.Generator().manual_seed(0)
    transform = spinedet.create_model(
        "spinenet49s_maskrcnn", num_classes=3, image_size=SIZE, filter_scale=0.25
    ).transform.eval()
    assert isinstance(transform, DetectionTransform)

    def result():
        boxes = torch.tensor([[3.2, 4.9, 60.1, 40.0], [-5.0, 10.0, 12.3, 70.0], [0, 0, 127.9, 95.2],
                              [40.0, 30.0, 40.5, 30.2]])  # fmt: skip
        masks = torch.rand(4, 1, 28, 28, generator=g)
        return [{"boxes": boxes.to(device), "masks": masks.to(device)}]

    args = ([(96, SIZE)], [(150, 200)])  # resized from a 150 x 200 image
    ours = transform.postprocess(result(), *args)[0]
    g.manual_seed(0)
    theirs = GeneralizedRCNNTransform.postprocess(transform, result(), *args)[0]
    assert ours["masks"].shape == theirs["masks"].shape == (4, 1, 150, 200)
    assert torch.equal(ours["boxes"], theirs["boxes"])
    assert torch.allclose(ours["masks"], theirs["masks"], atol=1e-5)
    assert (theirs["masks"] > 0).sum() > 1000  # masks were pasted, not only zeros


@pytest.mark.parametrize("training", [True, False])
def test_transform_equals_torchvision_and_skips_resizing_at_scale_one(training, monkeypatch):
    transform = spinedet.create_model(
        "spinenet49s_maskrcnn", num_classes=3, image_size=SIZE, filter_scale=0.25
    ).transform.train(training)
    g = torch.Generator().manual_seed(0)
    sizes = [(SIZE, SIZE), (100, SIZE), (SIZE, 77), (64, 96)]  # the last is scaled by 4/3

    def inputs():
        images = [torch.rand(3, h, w, generator=g) for h, w in sizes]
        targets = [{"boxes": torch.tensor([[2.0, 3.0, 40.5, 50.0]]), "labels": torch.tensor([1]),
                    "masks": (torch.rand(1, h, w, generator=g) > 0.5).to(torch.uint8)}
                   for h, w in sizes]  # fmt: skip
        return images, targets

    t = transform
    plain = GeneralizedRCNNTransform(t.min_size, t.max_size, t.image_mean, t.image_std,
                                     t.size_divisible).train(training)  # fmt: skip
    resized, original = [], GeneralizedRCNNTransform.resize

    def counted(self, image, target):
        resized.append(image.shape)
        return original(self, image, target)

    monkeypatch.setattr(GeneralizedRCNNTransform, "resize", counted)
    ours = transform(*inputs())
    assert resized == [(3, 64, 96)]  # only the image not at its size
    monkeypatch.undo()
    g.manual_seed(0)
    theirs = plain(*inputs())
    assert ours[0].image_sizes == theirs[0].image_sizes
    assert torch.equal(ours[0].tensors, theirs[0].tensors)
    for a, b in zip(ours[1], theirs[1], strict=True):
        assert all(torch.equal(a[k], b[k]) for k in b)


def test_paste_masks_equals_torchvision():
    probs = torch.rand(5, 28, 28, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[3.2, 4.9, 30.1, 20.0], [-5.0, 10.0, 12.3, 70.0], [0, 0, 63.9, 47.2],
                          [40.0, 30.0, 40.5, 30.2], [20.0, 1.0, 90.0, 5.0]])  # fmt: skip
    ours = paste_masks(probs, boxes, 48, 64)
    theirs = paste_masks_in_image(probs[:, None], boxes, (48, 64))[:, 0]
    assert torch.allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_crops_equal_the_full_pastes_thresholded(dtype, device, monkeypatch):
    """Within pasting_crops the transform gives each image's masks as crops, bit for bit the
    full pastes above 0.5 in the probabilities' dtype, in any batching of the windows; elsewhere
    (after the block, in another thread during it) torchvision's probabilities as before."""
    g = torch.Generator().manual_seed(0)
    transform = spinedet.create_model(
        "spinenet49s_maskrcnn", num_classes=3, image_size=SIZE, filter_scale=0.25
    ).transform.eval()
    centre = torch.rand(40, 2, generator=g) * torch.tensor([360.0, 280.0]) - 20  # some outside
    half = torch.rand(40, 2, generator=g) * torch.tensor([90.0, 60.0]) + 0.1
    boxes = torch.cat(
        [torch.cat([centre - half, centre + half], 1), torch.tensor([[5.0, 5, 5.2, 5.1]])]
    )

    def result():  # the 41st box is under a pixel wide
        masks = torch.rand(41, 1, 28, 28, generator=g.manual_seed(1)).to(dtype)
        return [{"boxes": boxes.to(device), "masks": masks.to(device)}]

    args = ([(96, SIZE)], [(300, 400)])
    full = transform.postprocess(result(), *args)[0]["masks"][:, 0] > 0.5
    assert full.dtype == torch.bool and full.sum() > 10_000
    for budget in (postprocess.CROP_BUDGET, 3_000):  # one batch; batches of a few masks
        monkeypatch.setattr(postprocess, "CROP_BUDGET", budget)
        with pasting_crops():
            crops = transform.postprocess(result(), *args)[0]["masks"]
            elsewhere = ThreadPoolExecutor(1).submit(transform.postprocess, result(), *args)
            assert elsewhere.result()[0]["masks"].shape == (41, 1, 300, 400)
        assert crops.image_size == (300, 400) and len(crops) == 41
        assert torch.equal(crops.full(), full.cpu())
        assert sum(c.numel() for c in crops.crops) < 41 * 300 * 400 / 10  # crops, not the image
    assert transform.postprocess(result(), *args)[0]["masks"].shape == (41, 1, 300, 400)


def test_the_transform_takes_uint8_and_shrinks_larger_images_antialiased(device):
    transform = spinedet.create_model(
        "spinenet49s_retinanet", num_classes=3, image_size=64, filter_scale=0.25
    ).transform.eval()
    torchvisions = GeneralizedRCNNTransform(64, 64, transform.image_mean, transform.image_std,
                                            size_divisible=transform.size_divisible)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    at_size = torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8, generator=g).to(device)
    floats = TF.to_dtype(at_size, torch.float32, scale=True)
    ours = transform([at_size])[0]
    assert torch.equal(ours.tensors, torchvisions([floats])[0].tensors)
    assert torch.equal(ours.tensors, transform([floats])[0].tensors)
    # Larger: shrunk to torchvision's size (the floor of 0.32 x each side), antialiased.
    large = torch.randint(0, 256, (3, 150, 200), dtype=torch.uint8, generator=g).to(device)
    ours = transform([large])[0]
    shrunk = TF.to_dtype(TF.resize(large, [48, 64], antialias=True), torch.float32, scale=True)
    mean, std = (
        torch.tensor(v)[:, None, None] for v in (transform.image_mean, transform.image_std)
    )
    assert ours.image_sizes == [(48, 64)]
    torch.testing.assert_close(ours.tensors[0, :, :48, :64], (shrunk - mean) / std)
    aliased = torchvisions([TF.to_dtype(large, torch.float32, scale=True)])[0]
    assert aliased.image_sizes == [(48, 64)]
    assert not torch.allclose(ours.tensors, aliased.tensors, atol=0.1)
