"""SpineNet backbone: exact sizes, shapes for any input, options and spec validation."""

import pytest
import torch

from spinedet.models import SPINENET_BLOCK_SPECS, SpineNet, spinenet
from spinedet.models.layers import same_padding
from spinedet.models.spinenet import plan_blocks

# Trainable parameters of Model Garden's SpineNet (min level 3, max level 7).
MODEL_GARDEN_PARAMS = {
    "49s": 9_089_215,
    "49": 21_831_488,
    "96": 36_262_976,
    "143": 60_247_616,
    "190": 126_587_664,
}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("variant", list(MODEL_GARDEN_PARAMS))
def test_parameter_count_equals_model_garden(variant):
    assert n_params(spinenet(variant)) == MODEL_GARDEN_PARAMS[variant]


@pytest.mark.parametrize("size", [(128, 128), (100, 173), (257, 64), (33, 47)])
def test_levels_are_ceil_of_input_over_stride(size):
    model = spinenet("49s", filter_scale=0.25, endpoint_filters=16).eval()
    h, w = size
    with torch.no_grad():
        out = model(torch.randn(2, 3, h, w))
    assert list(out) == ["p3", "p4", "p5", "p6", "p7"]
    for lvl, stride in zip(range(3, 8), model.strides, strict=True):
        assert stride == 2**lvl
        assert out[f"p{lvl}"].shape == (2, 16, -(-h // stride), -(-w // stride))


def test_full_size_49s_pyramid_at_640():
    model = spinenet("49s").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 640, 640))
    assert [tuple(v.shape) for v in out.values()] == [
        (1, 128, 80, 80),
        (1, 128, 40, 40),
        (1, 128, 20, 20),
        (1, 128, 10, 10),
        (1, 128, 5, 5),
    ]


def test_level2_spec_is_not_built_but_counts_in_drop_schedule():
    plan = plan_blocks(SPINENET_BLOCK_SPECS, 3, 7, stochastic_depth_rate=0.2)
    assert [b.index for b in plan] == list(range(2, 17))  # the level-2 output (17) is dropped
    assert plan[-1].drop_rate == pytest.approx(0.2 * 15 / 16)
    # Block 11 (level 5, unconsumed) is fused into output block 14, as in Model Garden.
    assert {b.index: b.extra_inputs for b in plan if b.extra_inputs} == {14: (11,)}


def test_min_level_2_builds_the_level2_output():
    model = spinenet("49s", filter_scale=0.25, endpoint_filters=8, min_level=2).eval()
    out = model(torch.randn(1, 3, 64, 96))
    assert out["p2"].shape == (1, 8, 16, 24)


@pytest.mark.parametrize(
    "padding,expected", [((8, 7, 2), (2, 3)), ((8, 3, 2), (0, 1)), ((9, 3, 2), (1, 1))]
)
def test_keras_same_padding_puts_extra_pixel_after(padding, expected):
    assert same_padding(*padding) == expected


@pytest.mark.parametrize("norm", ["bn", "syncbn", "frozenbn", "gn"])
def test_norm_options_run(norm):
    model = spinenet("49s", filter_scale=0.25, endpoint_filters=16, norm=norm).eval()
    out = model(torch.randn(1, 3, 256, 256))  # GroupNorm needs > 1 value per group
    assert out["p7"].shape == (1, 16, 2, 2)


def test_bn_defaults_match_model_garden():
    bn = next(m for m in spinenet("49s").modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert bn.momentum == pytest.approx(0.01) and bn.eps == pytest.approx(1e-3)


def test_swish_and_stochastic_depth_train_and_backprop():
    model = spinenet(
        "49s", filter_scale=0.25, endpoint_filters=16, activation="swish", stochastic_depth_rate=0.2
    )
    assert any(isinstance(m, torch.nn.SiLU) for m in model.modules())
    out = model(torch.randn(2, 3, 64, 64))
    sum(v.mean() for v in out.values()).backward()
    assert model.stem[0].conv.weight.grad is not None


def test_symmetric_and_same_padding_give_same_sizes_but_different_values():
    torch.manual_seed(0)
    same = spinenet("49s", filter_scale=0.25, endpoint_filters=8, padding="same").eval()
    sym = spinenet("49s", filter_scale=0.25, endpoint_filters=8, padding="symmetric").eval()
    sym.load_state_dict(same.state_dict())
    x = torch.randn(1, 3, 96, 80)
    a, b = same(x), sym(x)
    assert all(a[k].shape == b[k].shape for k in a)
    assert not torch.allclose(a["p3"], b["p3"])


def test_custom_block_specs_and_scaling():
    specs = [
        (3, "bottleneck", (0, 1), True),
        (4, "residual", (0, 2), True),
        (5, "bottleneck", (2, 3), True),
    ]
    model = SpineNet(specs, min_level=3, max_level=5, endpoint_filters=32, filter_scale=0.5)
    out = model(torch.randn(1, 3, 70, 70))
    assert [tuple(v.shape) for v in out.values()] == [(1, 32, 9, 9), (1, 32, 5, 5), (1, 32, 3, 3)]


@pytest.mark.parametrize(
    "specs,message",
    [
        ([], "empty"),
        ([(3, "bottleneck", (0, 5), True)], "parent 5"),
        ([(3, "conv", (0, 1), True)], "block_type"),
        ([(9, "bottleneck", (0, 1), True)], "level"),
        ([(3, "bottleneck", (0,), True)], "parents"),
        ([(3, "bottleneck", (0, 1))], "expected (level"),
        ([(3, "bottleneck", (0, 1), True), (3, "residual", (0, 2), True)], "second output"),
        ([(3, "bottleneck", (0, 1), True)], "no output block for level"),
    ],
)
def test_malformed_block_specs_raise_clear_errors(specs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        SpineNet(specs)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"filter_scale": 0}, "filter_scale"),
        ({"activation": "gelu"}, "activation"),
        ({"norm": "ln"}, "norm"),
        ({"padding": "valid"}, "padding"),
        ({"min_level": 5, "max_level": 4}, "min_level"),
    ],
)
def test_bad_backbone_options_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        spinenet("49s", **kwargs)
