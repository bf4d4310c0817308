"""Training targets for the whole batch (spinedet.models.matching, spinedet.models.rcnn) equal
torchvision's image-by-image ones: the same matches, labels, proposals and losses. Sampling
draws from another random stream, so the losses are compared where every candidate is sampled,
and the samples' counts where not."""

import copy

import pytest
import torch
from torchvision.models.detection import RetinaNet
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import box_iou

import spinedet
from spinedet.models.matching import balanced_sample, match, pad_boxes, pairwise_iou
from spinedet.models.rcnn import BatchedRoIHeads, BatchedRPN

SIZE = 128
EVERYTHING = 10**6  # a sample size above every candidate count: every candidate is sampled


def gt_boxes(counts: list[int], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    boxes = []
    for n in counts:
        corner = torch.rand(n, 2, generator=g) * 90
        boxes.append(torch.cat([corner, corner + 8 + torch.rand(n, 2, generator=g) * 40], 1))
    if counts[0] > 1:  # the same box twice: ties between ground truths
        boxes[0][1] = boxes[0][0]
    return boxes


def boxes_batch(n: int, count: int, seed: int) -> torch.Tensor:
    return torch.stack(gt_boxes([count] * n, seed))


@pytest.mark.parametrize("low_quality", [True, False])
def test_match_equals_torchvision_matcher(low_quality, device):
    matcher = Matcher(0.7, 0.3, allow_low_quality_matches=low_quality)
    gts = [b.to(device) for b in gt_boxes([5, 1, 0, 3])]
    boxes = boxes_batch(4, 300, seed=1).to(device)
    boxes[0, :2] = gts[0][0]  # boxes equal to a ground truth
    gt, real = pad_boxes(gts)
    assert gt.shape == (4, 5, 4) and real.sum(1).tolist() == [5, 1, 0, 3]
    ours = match(matcher, pairwise_iou(gt, boxes), real)
    for i, g in enumerate(gts):
        if len(g):
            assert torch.equal(pairwise_iou(gt, boxes)[i, : len(g)], box_iou(g, boxes[i]))
            assert torch.equal(ours[i], matcher(box_iou(g, boxes[i])))
        else:  # torchvision's detectors: all background
            assert (ours[i] == Matcher.BELOW_LOW_THRESHOLD).all()
    assert (ours >= 0).any() and (ours == -2).any() and (ours == -1).any()


def test_balanced_sample_takes_torchvision_counts(device):
    torch.manual_seed(0)
    labels = torch.randint(-1, 3, (3, 1000), device=device)
    labels[1, :990] = 0  # few positives: negatives fill the sample
    labels[2] = -1  # nothing to sample
    positive, negative = balanced_sample(labels, 256, 0.25)
    assert not (positive & negative).any()
    assert (labels[positive] >= 1).all() and (labels[negative] == 0).all()
    pos, neg = positive.sum(1).tolist(), negative.sum(1).tolist()
    available = [(labels[i] >= 1).sum().item() for i in range(3)]
    assert pos == [64, min(64, available[1]), 0] and neg == [192, 256 - pos[1], 0]
    again = balanced_sample(labels, 256, 0.25)[0]
    assert not torch.equal(again, positive)  # a random subset, not the first ones


def small(name: str, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    return spinedet.create_model(
        name, num_classes=5, image_size=SIZE, filter_scale=0.25, **options
    ).train()


def batch(device: torch.device, heights: tuple[int, ...] = (SIZE,) * 3) -> tuple[list, list]:
    g = torch.Generator().manual_seed(3)
    images = [torch.rand(3, h, SIZE, generator=g).to(device) for h in heights]
    targets = []
    for count, height in zip((3, 1, 0), heights, strict=True):
        boxes = gt_boxes([count], seed=count)[0].clamp(max=height)
        masks = torch.zeros(count, height, SIZE, dtype=torch.uint8)
        for m, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist(), strict=True):
            m[y0:y1, x0:x1] = 1
        labels = torch.randint(1, 5, (count,), generator=g)
        targets.append({"boxes": boxes, "labels": labels, "masks": masks})
    return images, [{k: v.to(device) for k, v in t.items()} for t in targets]


def as_torchvision(model: torch.nn.Module) -> torch.nn.Module:
    """A copy computing with torchvision's own classes (the same parameters)."""
    plain = copy.deepcopy(model)
    if hasattr(plain, "rpn"):
        plain.rpn.__class__, plain.roi_heads.__class__ = RegionProposalNetwork, RoIHeads
    else:
        plain.compute_loss = lambda *args: RetinaNet.compute_loss(plain, *args)
    return plain


@pytest.mark.parametrize(
    ("name", "heights"),
    [
        ("spinenet49s_maskrcnn", (SIZE, SIZE, SIZE)),  # one RoIAlign cuts every mask target
        ("spinenet49s_maskrcnn", (SIZE, 100, SIZE)),  # masks of two sizes: image by image
        ("spinenet49s_retinanet", (SIZE, SIZE, SIZE)),
    ],
)
def test_batched_training_losses_and_gradients_equal_torchvision(name, heights, device):
    options = {}
    if name.endswith("maskrcnn"):  # every anchor and proposal sampled, on both sides
        options = {"rpn_batch_size_per_image": EVERYTHING, "box_batch_size_per_image": EVERYTHING,
                   "rpn_pre_nms_top_n_train": 300, "rpn_post_nms_top_n_train": 200}  # fmt: skip
    model = small(name, **options).to(device)
    assert isinstance(getattr(model, "rpn", BatchedRPN.__new__(BatchedRPN)), BatchedRPN)
    plain = as_torchvision(model)
    images, targets = batch(device, heights)
    results = []
    for m in (model, plain):
        losses = m(images, targets)
        m.zero_grad()
        sum(losses.values()).backward()
        grads = torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])
        results.append((losses, grads))
    (ours, ours_grads), (theirs, their_grads) = results
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.allclose(ours[key], theirs[key], rtol=1e-4, atol=1e-6), key
    # Within 1e-3 of the largest gradient: on a GPU, TF32 convolutions and RoIAlign's atomic
    # adds round differently from call to call (measured: 2.4e-4 of it on an H100).
    assert (ours_grads - their_grads).abs().max() <= 1e-3 * their_grads.abs().max()


@pytest.mark.parametrize(
    "options",
    [
        {},  # 1,500 candidates an image for up to 2,000 proposals: one NMS over them all
        {"rpn_post_nms_top_n_train": 60, "rpn_post_nms_top_n_test": 60},  # NMS on the best 120
        {"rpn_post_nms_top_n_train": 60, "rpn_post_nms_top_n_test": 60, "rpn_nms_thresh": 0.05},
    ],  # the last keeps few: NMS on more candidates
)
def test_rpn_proposals_equal_torchvision(options, device):
    model = small("spinenet49s_maskrcnn", rpn_pre_nms_top_n_train=300, **options).to(device)
    rpn, plain = model.rpn, as_torchvision(model).rpn
    image_list, targets = model.transform(*batch(device))
    features = model.backbone(image_list.tensors)
    for mode in ("train", "eval"):
        rpn.train(mode == "train"), plain.train(mode == "train")
        with torch.no_grad():
            ours = rpn(image_list, features, targets)[0]
            theirs = plain(image_list, features, targets)[0]
        assert [len(b) for b in ours] == [len(b) for b in theirs]
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True)), mode


def test_roi_training_samples_equal_torchvision(device):
    model = small("spinenet49s_maskrcnn", box_batch_size_per_image=EVERYTHING).to(device)
    heads = model.roi_heads
    assert isinstance(heads, BatchedRoIHeads)
    _, targets = batch(device)
    proposals = [b.to(device) for b in gt_boxes([40, 25, 30], seed=5)]
    ours = heads.select_training_samples(proposals, targets)
    theirs = RoIHeads.select_training_samples(heads, proposals, targets)
    for a, b in zip(ours, theirs, strict=True):  # boxes, matched index, labels, targets
        assert [len(x) for x in a] == [len(x) for x in b]
        assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a, b, strict=True))
    assert (torch.cat(ours[2]) > 0).any() and (torch.cat(ours[2]) == 0).any()
    heads.fg_bg_sampler.batch_size_per_image = 16  # a sample: up to 4 positives, then negatives
    boxes, _, labels, _ = heads.select_training_samples(proposals, targets)
    assert [len(b) for b in boxes] == [16, 16, 16]
    available = [(x > 0).sum().item() for x in ours[2]]
    assert [(x > 0).sum().item() for x in labels] == [min(4, n) for n in available]
