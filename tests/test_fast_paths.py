"""Fast paths compute what the plain ones do: host-counted BatchNorm, batched head outputs and
losses, level-sorted RoIAlign, RoIAlign as matrix products for CPU training, box coding and
normalisation with constants copied to the device once, the mask head on RoI batches
padded to a few sizes. Each is compared
with the plain computation (torchvision's where it has one, else the per-level / per-image loop
written out here)."""

import copy
import inspect
import traceback
import warnings

import pytest
import torch
from test_matching import batch, small
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.retinanet import (
    RetinaNetClassificationHead,
    RetinaNetRegressionHead,
)
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import roi_align

import spinedet
from spinedet.models.heads import PyramidRoIAlign, _per_anchor, conv_tower, rcnn_mask_predictor
from spinedet.models.host_data import DeviceBoxCoder, device_tensor, gpu_waits
from spinedet.models.layers import BatchNorm2d
from spinedet.models.pixel_boxes import PixelBoxCoder
from spinedet.models.row_buckets import bucket_size, bucketed
from spinedet.models.separable_roi_align import separable_roi_align


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return torch.allclose(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_counts_batches_on_host_and_computes_like_torch(momentum, device):
    torch.manual_seed(0)
    plain = nn.BatchNorm2d(6, eps=1e-3, momentum=momentum)
    nn.init.normal_(plain.weight)
    fast = BatchNorm2d(6, eps=1e-3, momentum=momentum)
    fast.load_state_dict(plain.state_dict())
    plain, fast = plain.to(device), fast.to(device)
    weights = torch.arange(7.0, device=device)
    for _ in range(3):
        x = torch.randn(4, 6, 5, 7).to(device).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        y, y2 = plain(x), fast(x2)
        (y * weights).sum().backward()
        (y2 * weights).sum().backward()
        assert torch.equal(y, y2)
        assert torch.equal(x.grad, x2.grad)
        assert torch.equal(plain.weight.grad, fast.weight.grad)
    if momentum is not None:  # the count has not reached the buffer yet...
        assert fast.num_batches_tracked.item() == 0
    state = fast.state_dict()  # ...and reaches it with the state
    assert set(state) == set(plain.state_dict())
    for key, value in plain.state_dict().items():
        assert torch.equal(state[key], value), key
    assert state["num_batches_tracked"].item() == 3
    fast.eval(), plain.eval()
    x = torch.randn(2, 6, 3, 3, device=device)
    assert torch.equal(fast(x), plain(x))


def test_batchnorm_count_survives_copies_and_loading():
    fast = BatchNorm2d(3)
    fast(torch.randn(2, 3, 4, 4))
    assert copy.deepcopy(fast).state_dict()["num_batches_tracked"].item() == 1
    fast(torch.randn(2, 3, 4, 4))
    other = BatchNorm2d(3)
    other(torch.randn(2, 3, 4, 4))
    other.load_state_dict(fast.state_dict())  # the loaded count replaces other's own
    assert other.state_dict()["num_batches_tracked"].item() == 2


def test_backbone_uses_host_counted_batchnorm():
    model = spinedet.create_model("spinenet49s", filter_scale=0.25, endpoint_filters=16)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(isinstance(m, BatchNorm2d) for m in norms)


def test_per_anchor_layout_matches_per_level_permutes():
    torch.manual_seed(0)
    outs = [torch.randn(2, 9 * 5, s, s + 1) for s in (8, 4, 2, 1)]

    def plain(out, size):
        n, _, h, w = out.shape
        return out.view(n, -1, size, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, size)

    assert torch.equal(_per_anchor(outs, 5), torch.cat([plain(o, 5) for o in outs], dim=1))


def _retinanet_loss_inputs(device: torch.device):
    """Head outputs, anchors, targets (one image without boxes) and matches with every kind
    of anchor: foreground, background (-1) and between thresholds (-2), on ``device``."""
    g = torch.Generator().manual_seed(0)
    n_anchors, num_classes = 60, 7
    anchors = torch.rand(n_anchors, 2, generator=g) * 50
    anchors = torch.cat([anchors, anchors + 5 + torch.rand(n_anchors, 2, generator=g) * 20], 1)
    targets, matched = [], []
    for n_boxes in (3, 0, 5):
        xy = torch.rand(n_boxes, 2, generator=g) * 40
        boxes = torch.cat([xy, xy + 4 + torch.rand(n_boxes, 2, generator=g) * 20], 1)
        labels = torch.randint(1, num_classes, (n_boxes,), generator=g)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
        m = torch.randint(-2, max(n_boxes, 1), (n_anchors,), generator=g)
        matched.append((m if n_boxes else m.clamp(max=-1)).to(device))
    outputs = {
        "cls_logits": torch.randn(3, n_anchors, num_classes, generator=g),
        "bbox_regression": torch.randn(3, n_anchors, 4, generator=g),
    }
    outputs = {k: v.to(device).requires_grad_() for k, v in outputs.items()}
    return outputs, [anchors.to(device)] * 3, targets, matched


def _loss_and_grads(loss_fn, outputs):
    loss = loss_fn()
    return loss.detach(), torch.autograd.grad(loss, list(outputs.values()), allow_unused=True)


def test_batched_retinanet_losses_equal_torchvision_per_image_losses(device):
    model = spinedet.create_model("spinenet49s_retinanet", num_classes=7, filter_scale=0.25)
    model = model.to(device)
    cls_head = model.head.classification_head
    reg_head = model.head.regression_head
    outputs, anchors, targets, matched = _retinanet_loss_inputs(device)
    assert (torch.cat(matched) == -2).any() and (torch.cat(matched) >= 0).any()

    # torchvision's classification loss is the focal loss with alpha 0.25 and gamma 2.
    cls_head.alpha, cls_head.gamma = 0.25, 2.0
    fast = _loss_and_grads(lambda: cls_head.compute_loss(targets, outputs, matched), outputs)
    plain = _loss_and_grads(
        lambda: RetinaNetClassificationHead.compute_loss(cls_head, targets, outputs, matched),
        outputs,
    )
    assert close(fast[0], plain[0]) and close(fast[1][0], plain[1][0])

    fast = _loss_and_grads(
        lambda: reg_head.compute_loss(targets, outputs, anchors, matched), outputs
    )
    plain = _loss_and_grads(
        lambda: RetinaNetRegressionHead.compute_loss(reg_head, targets, outputs, anchors, matched),
        outputs,
    )
    assert close(fast[0], plain[0]) and close(fast[1][1], plain[1][1])


def _roi_align_per_level(pool, x, boxes):
    """PyramidRoIAlign as a loop over levels selecting each level's boxes."""
    rois = torch.cat([torch.cat([b.new_full((len(b), 1), i), b], 1) for i, b in enumerate(boxes)])
    sides = ((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])).sqrt()
    target = (torch.log2(sides / 224).floor() + 4).clamp(pool.levels[0], pool.levels[-1])
    first = x[pool.featmap_names[0]]
    result = first.new_zeros((len(rois), first.shape[1], *pool.output_size))
    for level, name in zip(pool.levels, pool.featmap_names, strict=True):
        idx = torch.where(target == level)[0]
        level_rois = rois[idx].clone()
        level_rois[:, 1:] += 2 ** (level - 1)
        result[idx] = roi_align(x[name], level_rois, pool.output_size, 2.0**-level, 1, True)
    return result


def test_level_sorted_roi_align_equals_per_level_selection(device):
    torch.manual_seed(0)
    pool = PyramidRoIAlign([3, 4, 5, 6, 7], output_size=7)
    x = {f"p{lvl}": torch.randn(2, 4, 512 // 2**lvl, 512 // 2**lvl) for lvl in range(3, 8)}
    x = {k: v.to(device) for k, v in x.items()}
    sides = torch.tensor([8.0, 60, 230, 470, 1000, 2000, 500, 20, 90, 250])  # levels 3..7
    xy = torch.rand(10, 2) * 10
    full = torch.cat([xy, xy + sides[:, None]], 1).to(device)
    boxes = [full[:6], full]
    features = {k: v.requires_grad_() for k, v in x.items()}
    fast = pool(features, boxes, [(512, 512)] * 2)
    grads = torch.autograd.grad((fast * fast).sum(), list(features.values()))
    plain = _roi_align_per_level(pool, features, boxes)
    plain_grads = torch.autograd.grad((plain * plain).sum(), list(features.values()))
    # On a CPU with gradients the crops come from separable_roi_align: equal up to rounding.
    assert torch.equal(fast, plain) if device.type != "cpu" else close(fast, plain)
    assert all(close(a, b) for a, b in zip(grads, plain_grads, strict=True))
    with torch.no_grad():
        assert torch.equal(pool(x, boxes, [(512, 512)] * 2), _roi_align_per_level(pool, x, boxes))
    empty = pool(x, [torch.zeros(0, 4, device=device)] * 2, [(512, 512)] * 2)
    assert empty.shape == (0, 4, 7, 7)


@pytest.mark.parametrize("sampling_ratio", [1, 2])
def test_separable_roi_align_equals_torchvision(sampling_ratio):
    """Forward and gradient of the matrix-product RoIAlign match torchvision's aligned RoIAlign,
    for boxes inside, across and beyond the border, under a cell, inverted, and an image with
    no boxes."""
    torch.manual_seed(0)
    features = torch.randn(3, 5, 12, 16, requires_grad=True)
    boxes = torch.tensor(
        [[8.0, 8, 40, 30], [-20, -6, 30, 20], [100, 70, 140, 110], [150, 100, 200, 130],
         [50, 50, 51, 50.5], [60, 40, 20, 10], [-90, -90, -40, -50], [0, 0, 128, 96]]
    )  # fmt: skip
    rois = torch.cat([torch.tensor([0.0, 2, 0, 2, 0, 2, 2, 0])[:, None], boxes], 1)
    size, scale = (7, 6), 0.125
    plain = roi_align(features, rois, size, scale, sampling_ratio, aligned=True)
    fast = separable_roi_align(features, rois, size, scale, sampling_ratio)
    assert fast.shape == (8, 5, 7, 6) and fast.is_contiguous(memory_format=torch.channels_last)
    assert close(fast, plain) and plain[6].abs().max() == fast[6].abs().max() == 0
    weights = torch.randn_like(plain)
    (grad,) = torch.autograd.grad((plain * weights).sum(), features)
    (fast_grad,) = torch.autograd.grad((fast * weights).sum(), features)
    assert close(fast_grad, grad) and fast_grad[1].abs().max() == 0
    assert separable_roi_align(features, rois[:0], size, scale, 1).shape == (0, 5, 7, 6)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_device_box_coder_equals_torchvision(weights, device):
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 1 + torch.rand(50, 2, generator=g) * 60], 1).to(device)
    gt = boxes.flip(0) + torch.rand(50, 4, generator=g).to(device)
    codes = (torch.randn(50, 4 * 3, generator=g) * 3).to(device)  # 3 classes, some clipped
    plain, fast = BoxCoder(weights), DeviceBoxCoder(weights)
    assert torch.equal(fast.encode_single(gt, boxes), plain.encode_single(gt, boxes))
    assert torch.equal(fast.decode_single(codes, boxes), plain.decode_single(codes, boxes))
    half = codes.to(torch.bfloat16)
    assert torch.equal(fast.decode_single(half, boxes), plain.decode_single(half, boxes))
    assert fast.decode_single(codes[:0], boxes[:0]).shape == (0, 12)  # no boxes

    # tensorflow/tpu's pixel-index boxes: torchvision's coder on boxes one pixel longer.
    pixel = PixelBoxCoder(weights)
    unit = torch.tensor([0.0, 0.0, 1.0, 1.0], device=device)
    encoded = plain.encode_single(gt + unit, boxes + unit)
    assert torch.equal(pixel.encode_single(gt, boxes), encoded)
    decoded = plain.decode_single(codes, boxes + unit) - unit.repeat(3)
    assert torch.equal(pixel.decode_single(codes, boxes), decoded)


def test_detection_transform_normalizes_as_torchvision(device):
    model = spinedet.create_model("spinenet49s_retinanet", num_classes=3, filter_scale=0.25)
    image = torch.rand(3, 20, 30, device=device)
    plain = GeneralizedRCNNTransform.normalize(model.transform, image)
    assert torch.equal(model.transform.normalize(image), plain)
    double = image.double()  # a constant per dtype
    plain = GeneralizedRCNNTransform.normalize(model.transform, double)
    assert torch.equal(model.transform.normalize(double), plain)


class _HostWaits(TorchDispatchMode):
    """Records the ops of a step that wait for a GPU: values read back, and tensors made from
    Python data other than by ``host_data.device_tensor`` (which queues its copy)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []
        self.copies: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("_local_scalar_dense", "nonzero"):
            self.reads.append(name)
        if name in ("lift_fresh", "lift_fresh_copy"):
            frames = traceback.extract_stack()
            if not any(f.name == "device_tensor" and f.filename.endswith("host_data.py")
                       for f in frames):  # fmt: skip
                self.copies.append(" <- ".join(f"{f.name}:{f.lineno}" for f in frames[-4:-1]))
        return func(*args, **(kwargs or {}))


def _step_batch(device: torch.device) -> tuple[list[torch.Tensor], list[dict]]:
    """Two 64 x 64 images with two boxes and masks each."""
    images = [torch.rand(3, 64, 64, device=device) for _ in range(2)]
    boxes = torch.tensor([[4.0, 6.0, 40.0, 30.0], [20.0, 10.0, 60.0, 58.0]], device=device)
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8, device=device)
    masks[0, 6:30, 4:40] = masks[1, 10:58, 20:60] = 1
    labels = torch.tensor([1, 3], device=device)
    return images, [{"boxes": boxes, "labels": labels, "masks": masks}] * 2


@pytest.mark.parametrize(
    "name,options",
    [
        ("spinenet49s_retinanet", {}),
        ("spinenet49s_maskrcnn", {}),
        ("spinenet49s_maskrcnn", {"box_convention": "tpu"}),
    ],
)
def test_training_step_copies_to_the_device_without_waiting(name, options):
    """On a GPU ``torch.tensor(values, device=...)`` waits for everything queued before it; a
    training step makes none of those (after its first, which caches the constants). A
    RetinaNet step reads nothing back but torchvision's check of each image's boxes."""
    torch.manual_seed(0)
    model = spinedet.create_model(name, num_classes=4, filter_scale=0.25, image_size=64, **options)
    model.train()
    images, targets = _step_batch(torch.device("cpu"))
    sum(model(images, targets).values()).backward()  # constants cached
    with _HostWaits() as waits:
        sum(model(images, targets).values()).backward()
    assert waits.copies == []
    if "retinanet" in name:
        assert waits.reads == ["_local_scalar_dense"] * len(images)


def test_gpu_waits_names_the_innermost_spinedet_or_torchvision_frame(monkeypatch):
    """Sync debug mode's warnings counted by where they come from; other warnings pass on."""
    modes, passed = [], []
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    monkeypatch.setattr(warnings, "showwarning", lambda message, *a, **k: passed.append(message))

    def read_back() -> None:  # stands for torch's warning at a wait
        warnings.warn("called a synchronizing CUDA operation", stacklevel=1)

    made = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: read_back() or made(*a, **k))

    def step() -> None:
        warnings.warn("an unrelated warning", stacklevel=1)
        for _ in range(3):
            device_tensor([1.0], torch.device("cpu"))  # spinedet's frame, innermost of ours
        read_back()  # no spinedet frame: the innermost frame

    waits = gpu_waits(step)
    lines, first = inspect.getsourcelines(device_tensor)
    line = first + next(i for i, text in enumerate(lines) if "return torch.tensor(" in text)
    own = read_back.__code__.co_firstlineno + 1
    assert waits == {
        f"spinedet/models/host_data.py:{line} device_tensor": 3,
        f"{__file__}:{own} read_back": 1,
    }
    assert modes == ["warn", 0]  # the mode found is restored
    assert [str(m) for m in passed] == ["an unrelated warning"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_retinanet_training_step_waits_for_the_gpu_only_at_torchvisions_check():
    """torch's own count of the waits in a CUDA RetinaNet training step (what a CPU run cannot
    see: copies that synchronise): torchvision's check of each image's boxes, nothing else."""
    torch.manual_seed(0)
    model = spinedet.create_model("spinenet49s_retinanet", num_classes=4, filter_scale=0.25)
    model.cuda().train()
    images, targets = _step_batch(torch.device("cuda"))
    step = lambda: sum(model(images, targets).values()).backward()  # noqa: E731
    step()  # constants cached
    waits = gpu_waits(step)
    check = "torchvision/models/detection/retinanet.py:"
    assert all(site.startswith(check) for site in waits), waits
    assert sum(waits.values()) == len(images), waits


def test_bucket_sizes_are_four_an_octave():
    assert [bucket_size(n) for n in (0, 1, 4, 5, 9, 100, 1000)] == [0, 4, 4, 5, 10, 112, 1024]
    for n in range(1, 5000):  # the smallest m * 2**k holding n: at most 25% more from 4 up
        size = bucket_size(n)
        assert size == min(m << k for m in (4, 5, 6, 7) for k in range(14) if m << k >= n)
        assert size <= max(4, 1.25 * n)


def _rows_seen(*modules: nn.Module) -> list[list[int]]:
    """The batch sizes each of ``modules`` is called on, recorded as the calls come."""
    seen = [[] for _ in modules]
    for m, rows in zip(modules, seen, strict=True):
        m.register_forward_pre_hook(lambda _, args, rows=rows: rows.append(len(args[0])))
    return seen


def test_bucketed_mask_head_trains_like_the_plain_one(device, monkeypatch):
    """Padded, the mask head's convolutions see a bucket's rows and its BatchNorms the real
    ones: the same losses, gradients and running statistics as unpadded."""
    if device.type == "cuda":  # TF32 convolutions round by algorithm, chosen per batch size
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = small("spinenet49s_maskrcnn").to(device)
    images, targets = batch(device)
    results = []
    for on in (False, True):
        m = copy.deepcopy(model)
        m.roi_heads.bucket_mask_rois = on
        first = m.roi_heads.mask_head[0]  # conv, norm, activation
        seen = _rows_seen(first[0], first[1], m.roi_heads.mask_predictor.norm)
        torch.manual_seed(1)
        losses = m(images, targets)
        sum(losses.values()).backward()
        grads = {k: p.grad for k, p in m.named_parameters() if p.grad is not None}
        results.append((losses, grads, m.state_dict(), seen))
    (losses, grads, state, seen), (fast_losses, fast_grads, fast_state, fast_seen) = results
    (n,), (bucket,) = seen[0], fast_seen[0][0:1]
    assert bucket == bucket_size(n) > n  # padded...
    assert seen == [[n]] * 3 and fast_seen == [[bucket], [n], [n]]  # ...but not for the norms
    tol = 1e-5 if device.type == "cpu" else 1e-4  # CUDA: RoIAlign's atomic adds
    assert losses.keys() == fast_losses.keys()
    assert all(close(fast_losses[k], losses[k], tol) for k in losses)
    assert grads.keys() == fast_grads.keys() and "roi_heads.mask_head.0.0.weight" in grads
    assert all(close(fast_grads[k], grads[k], tol) for k in grads), "gradients"
    assert state.keys() == fast_state.keys()
    assert all(close(fast_state[k].float(), state[k].float(), tol) for k in state), "statistics"


def test_bucketed_runs_unpadded_what_it_cannot_walk():
    """A chain with a module that is not a plain sequence of convolutions, norms and
    activations (a norm per level, a dropout, a hooked container) runs as called."""
    torch.manual_seed(0)
    x = torch.randn(9, 8, 6, 6)
    assert bucketed(x[:0], nn.Conv2d(8, 4, 1), enabled=True).shape == (0, 4, 6, 6)
    hooked = conv_tower(8, 1, BatchNorm2d, nn.ReLU)
    hooked.register_forward_hook(lambda *_: None)
    for chain in (
        conv_tower(8, 1, BatchNorm2d, nn.ReLU, num_levels=2),
        nn.Sequential(nn.Conv2d(8, 8, 1), nn.Dropout()),
        hooked,
    ):
        conv = next(m for m in chain.modules() if isinstance(m, nn.Conv2d))
        seen = _rows_seen(conv)
        bucketed(x, chain, enabled=True)
        assert seen == [[9]]
    chain = (
        conv_tower(8, 2, BatchNorm2d, nn.ReLU),
        rcnn_mask_predictor(8, 3, BatchNorm2d, nn.ReLU),
    )
    seen = _rows_seen(chain[0][0][0])
    out = bucketed(x, *chain, enabled=True)
    assert seen == [[10]] and out.shape == (9, 3, 12, 12)
