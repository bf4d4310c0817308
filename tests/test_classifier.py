"""SpineNet classifiers: sizes and multiply-adds of tensorflow/tpu's models, the head's
aggregation, and backbone tensors named as in the detectors."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import spinedet
from spinedet.models.blocks import tpu_downsample
from spinedet.models.classifier import spinenet_classifier

# Trainable parameters of tensorflow/tpu's classifiers at its 1001 classes, counted on the
# models its code builds (tests/tpu_reference.py), and the zoo's multiply-adds at 224 (B).
TPU_MODELS = {
    "49s": (9_218_344, None),
    "49": (22_088_745, 3.5),
    "96": (36_520_233, 5.7),
    "143": (60_504_873, 9.1),
    "190": (127_101_177, 19.1),
}


@pytest.mark.parametrize("variant", list(TPU_MODELS))
def test_sizes_and_macs_match_tensorflow_tpu(variant):
    params, macs = TPU_MODELS[variant]
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        model = spinenet_classifier(variant, 1001)
        assert sum(p.numel() for p in model.parameters()) == params
        fewer = spinenet_classifier(variant, 1000)
        assert sum(p.numel() for p in fewer.parameters()) == params - model.fc.in_features - 1
        counter = FlopCounterMode(display=False)
        with counter:
            logits = model.eval()(torch.zeros(1, 3, 224, 224))
    assert logits.shape == (1, 1001)
    if macs is not None:
        assert counter.get_total_flops() / 2 / 1e9 == pytest.approx(macs, rel=0.02)


def test_backbone_tensors_are_named_as_in_detectors():
    classifier = spinenet_classifier("49s", 10).state_dict()
    detector = spinedet.create_model("spinenet49s_retinanet", 3).state_dict()
    ours = {k: v.shape for k, v in classifier.items() if k.startswith("backbone.")}
    theirs = {k: v.shape for k, v in detector.items() if k.startswith("backbone.")}
    assert ours == theirs
    assert set(classifier) - set(ours) == {"fc.weight", "fc.bias"}


def test_head_averages_all_levels_at_p3_size():
    model = spinenet_classifier("49s", 3, filter_scale=0.25, endpoint_filters=8).eval()
    x = torch.randn(1, 3, 128, 256)  # exact ratios: resizing in steps equals resizing once
    with torch.no_grad():
        levels = list(model.backbone(x).values())
        total = sum(F.interpolate(p, size=levels[0].shape[-2:], mode="nearest") for p in levels)
        pooled = (total / 5).mean(dim=(2, 3))
        torch.testing.assert_close(model.features(x), pooled)
        torch.testing.assert_close(model(x), model.fc(pooled))


def test_tpu_downsampling_pools_once_then_resizes():
    x = torch.arange(14 * 14, dtype=torch.float32).reshape(1, 1, 14, 14)
    # 28 -> 4 (at 224 pixels, P3 to P6): the stride-2 conv gave 14; a 5x5 pool of stride 3
    # gives 5, and nearest resizing 4.
    pooled = F.max_pool2d(F.pad(x, (1, 2, 1, 2), value=float("-inf")), 5, 3)
    expected = F.interpolate(pooled, size=(4, 4), mode="nearest")
    torch.testing.assert_close(tpu_downsample(x, 28, (4, 4)), expected)
    # 56 -> 7 (P2 to P5): one 5x5 pool of stride 4 ("same": one padded column, at the end)
    # lands on the size.
    x = torch.randn(1, 2, 28, 28)
    pooled = F.max_pool2d(F.pad(x, (0, 1, 0, 1), value=float("-inf")), 5, 4)
    torch.testing.assert_close(tpu_downsample(x, 56, (7, 7)), pooled)
    # A ratio of 2 is the stride-2 conv alone.
    torch.testing.assert_close(tpu_downsample(x, 56, (28, 28)), x)


def test_options_are_checked():
    with pytest.raises(ValueError, match="unknown downsample 'max'"):
        spinenet_classifier("49s", downsample="max")
    with pytest.raises(ValueError, match="num_classes must be positive"):
        spinenet_classifier("49s", 0)
    with pytest.raises(ValueError, match="unknown SpineNet variant '50'"):
        spinenet_classifier("50")
    model = spinenet_classifier("49s", 4, dropout=0.5, activation="swish")
    assert model.dropout.p == 0.5 and isinstance(model.backbone.act, torch.nn.SiLU)
