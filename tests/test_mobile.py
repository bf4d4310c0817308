"""SpineNet-Mobile backbone: exact Model Garden sizes, shapes for any input, training step."""

import pytest
import torch

import spinedet
from spinedet.models import SPINENET_MOBILE_BLOCK_SPECS, SpineNetMobile, spinenet_mobile
from spinedet.models.spinenet import plan_blocks

# Model Garden's SpineNetMobile (min level 3, max level 7): trainable parameters, and with the
# BatchNorm moving statistics.
MODEL_GARDEN_PARAMS = {
    "49": (2_268_708, 2_313_892),
    "49s": (975_678, 1_004_872),
    "49xs": (842_456, 869_400),
}


@pytest.mark.parametrize("variant", list(MODEL_GARDEN_PARAMS))
def test_parameter_count_equals_model_garden(variant):
    model = spinenet_mobile(variant)
    trainable = sum(p.numel() for p in model.parameters())
    stats = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    assert (trainable, trainable + stats) == MODEL_GARDEN_PARAMS[variant]


@pytest.mark.parametrize("name", ["spinenet_mobile49", "spinenet_mobile49s", "spinenet_mobile49xs"])
def test_registered_backbones(name):
    model = spinedet.create_model(name)
    assert isinstance(model, SpineNetMobile)
    assert f"{name}_retinanet" in spinedet.list_models("mobile")


def test_plan_uses_every_block_and_fuses_the_unconsumed_one():
    plan = plan_blocks(SPINENET_MOBILE_BLOCK_SPECS, 3, 7, stochastic_depth_rate=0.2)
    assert [b.index for b in plan] == list(range(2, 18))
    assert plan[-1].drop_rate == pytest.approx(0.2)
    # Block 12 (level 5) feeds no block, so the level-5 output block 15 sums it, as in Model
    # Garden (same width and channels).
    assert {b.index: b.extra_inputs for b in plan if b.extra_inputs} == {15: (12,)}


@pytest.mark.parametrize(
    "variant,size,channels",
    [("49xs", (128, 128), 24), ("49s", (97, 131), 40), ("49", (33, 47), 48)],
)
def test_levels_are_ceil_of_input_over_stride(variant, size, channels):
    model = spinenet_mobile(variant).eval()
    h, w = size
    with torch.no_grad():
        out = model(torch.randn(1, 3, h, w))
    assert list(out) == ["p3", "p4", "p5", "p6", "p7"]
    assert model.out_channels == channels and model.levels == [3, 4, 5, 6, 7]
    for lvl, stride in zip(model.levels, model.strides, strict=True):
        assert stride == 2**lvl
        assert out[f"p{lvl}"].shape == (1, channels, -(-h // stride), -(-w // stride))


def test_symmetric_padding_and_swish_keep_sizes():
    model = spinenet_mobile("49xs", padding="symmetric", activation="swish").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 70, 45))
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(9, 6), (5, 3), (3, 2), (2, 1), (1, 1)]


def test_forward_backward_reaches_every_parameter():
    torch.manual_seed(0)
    model = spinenet_mobile("49xs", stochastic_depth_rate=0.2).train()
    out = model(torch.randn(2, 3, 64, 80))
    sum(v.square().mean() for v in out.values()).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_bad_variant_and_options_are_rejected():
    with pytest.raises(ValueError, match="unknown SpineNet-Mobile variant"):
        spinenet_mobile("96")
    with pytest.raises(ValueError, match="unknown option"):
        spinenet_mobile("49", resample_alpha=0.5)
    with pytest.raises(ValueError, match="block_type"):
        SpineNetMobile([(3, "bottleneck", (0, 1), True)])


def test_info_counts_mobile_backbones_and_detectors():
    from spinedet.info import model_info

    info = model_info("spinenet_mobile49", 384)
    assert info["params"] == info["backbone_params"] == 2_268_708
    assert (
        model_info("spinenet_mobile49xs_retinanet", 256, num_classes=3)["backbone_params"]
        == 842_456
    )
