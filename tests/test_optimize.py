"""Inference optimisations give the plain model's outputs (<= 1e-4), bfloat16 close to them."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import spinedet.optimize as optimize
from spinedet import create_model
from spinedet.export import DenseOutputs
from spinedet.models.layers import SameConv2d, SameMaxPool2d, same_padding
from spinedet.optimize import OneDNNConv2d, fuse_bn, optimize_for_inference

SMALL = {"filter_scale": 0.25, "endpoint_filters": 32}
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, FrozenBatchNorm2d)


def calibrate(model: nn.Module, *inputs) -> nn.Module:
    """Set every BatchNorm's running statistics from its input in one eval pass, so activations
    stay O(1) as in a trained model: random statistics make them explode, and exact batch
    variances near 0 make a gain of 1 / sqrt(eps) per layer that amplifies float rounding."""

    def set_statistics(norm: nn.Module, args: tuple) -> None:
        dims = [d for d in range(args[0].dim()) if d != 1]
        norm.running_mean.copy_(args[0].mean(dims))
        norm.running_var.copy_(args[0].var(dims, unbiased=False).clamp(min=1.0))

    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    hooks = [m.register_forward_pre_hook(set_statistics) for m in norms]
    with torch.no_grad():
        model.eval()(*inputs)
    for hook in hooks:
        hook.remove()
    return model


def max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def padded_reference(x: torch.Tensor, kernel: int, stride: int, value: float) -> torch.Tensor:
    top, bottom = same_padding(x.shape[-2], kernel, stride)
    left, right = same_padding(x.shape[-1], kernel, stride)
    return F.pad(x, (left, right, top, bottom), value=value)


@pytest.mark.parametrize("h,w", [(1, 1), (2, 3), (5, 8), (16, 17), (33, 64)])
def test_same_layers_equal_explicit_padding(h, w):
    x = torch.randn(2, 4, h, w)
    pool = SameMaxPool2d()
    expected = F.max_pool2d(padded_reference(x, 3, 2, -torch.inf), 3, 2)
    assert torch.equal(pool(x), expected)
    for kernel in (3, 7):
        conv = SameConv2d(4, 5, kernel, 2, padding=0, bias=False)
        expected = F.conv2d(padded_reference(x, kernel, 2, 0.0), conv.weight, stride=2)
        torch.testing.assert_close(conv(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm", ["bn", "frozenbn"])
def test_fuse_bn_matches_backbone(norm):
    x = torch.randn(2, 3, 96, 80)
    model = calibrate(create_model("spinenet49s", **SMALL), x)
    if norm == "frozenbn":
        frozen = create_model("spinenet49s", norm="frozenbn", **SMALL).eval()
        frozen.load_state_dict(model.state_dict(), strict=False)  # no num_batches_tracked
        model = frozen
    fused = fuse_bn(model)
    assert any(isinstance(m, NORMS) for m in model.modules()), "the input must stay untouched"
    assert not any(isinstance(m, NORMS) for m in fused.modules())
    with torch.no_grad():
        assert max_diff(model(x).values(), fused(x).values()) <= 1e-4


def test_fuse_bn_needs_eval():
    with pytest.raises(ValueError, match="eval"):
        fuse_bn(create_model("spinenet49s", **SMALL).train())


@pytest.mark.parametrize("name", ["spinenet49s_retinanet", "spinenet49s_maskrcnn"])
def test_optimize_for_inference_matches_detector(name):
    # Every detection kept, so calibration also runs the mask head.
    thresh = {"score_thresh" if "retinanet" in name else "box_score_thresh": 0.0}
    model = create_model(name, num_classes=3, image_size=128, **thresh, **SMALL)
    images = torch.rand(2, 3, 128, 128)
    calibrate(model, list(images))
    fast = optimize_for_inference(model)
    assert not any(isinstance(m, NORMS) for m in fast.modules())
    assert any(isinstance(m, OneDNNConv2d) for m in fast.modules())
    assert all(
        p.is_contiguous(memory_format=torch.channels_last)
        for p in fast.parameters()
        if p.dim() == 4
    )
    with torch.no_grad():
        plain_out = DenseOutputs(model, 128)(images)
        fast_out = DenseOutputs(fast, 128)(images)
        assert max_diff(plain_out, fast_out) <= 1e-4
        if hasattr(model, "roi_heads"):  # the R-CNN box and mask heads on fixed boxes
            features = dict(zip(["p3", "p4", "p5", "p6", "p7"], plain_out[:5], strict=True))
            boxes = [torch.tensor([[8.0, 8.0, 60.0, 90.0], [30.0, 20.0, 120.0, 70.0]])] * 2
            sizes = [(128, 128)] * 2

            def second_stage(roi):
                box = roi.box_predictor(roi.box_head(roi.box_roi_pool(features, boxes, sizes)))
                mask = roi.mask_predictor(roi.mask_head(roi.mask_roi_pool(features, boxes, sizes)))
                return (*box, mask)

            assert max_diff(second_stage(model.roi_heads), second_stage(fast.roi_heads)) <= 1e-4


@pytest.mark.parametrize("name", ["spinenet49s_retinanet", "spinenet49s_maskrcnn"])
def test_bf16_parts_stay_close_and_hand_float32_on(name, monkeypatch):
    """bfloat16 convolutional parts (the default on CPUs with AMX; oneDNN off here, whose
    bfloat16 kernels need AVX-512): dense outputs within bfloat16's rounding of float32's, and
    everything the parts hand on (to box decoding, RoIAlign, post-processing) in float32.
    (Not calibrated: batch statistics from one pass make random layers cancel, where bfloat16's
    rounding grows to 25-35% of the head outputs; it is ~1% with the initial statistics.)"""
    thresh = {"score_thresh" if "retinanet" in name else "box_score_thresh": 0.0}
    model = create_model(name, num_classes=3, image_size=128, **thresh, **SMALL).eval()
    images = torch.rand(2, 3, 128, 128)
    monkeypatch.setattr(optimize, "amx_available", lambda: False)
    assert all(p.dtype == torch.float32 for p in optimize_for_inference(model).parameters())
    monkeypatch.setattr(optimize, "amx_available", lambda: True)
    fast = optimize_for_inference(model, onednn=False)
    assert fast.backbone.stem[0].conv.weight.dtype == torch.bfloat16
    with torch.no_grad():
        plain_out = DenseOutputs(model, 128)(images)
        fast_out = DenseOutputs(fast, 128)(images)
        for plain, ours in zip(plain_out, fast_out, strict=True):
            assert ours.dtype == torch.float32
            assert (ours - plain).norm() <= 0.03 * plain.norm()
        detections = fast(list(images))
    assert detections[0]["boxes"].dtype == torch.float32 and len(detections[0]["boxes"])
    if "maskrcnn" in name:
        assert detections[0]["masks"].dtype == torch.float32
