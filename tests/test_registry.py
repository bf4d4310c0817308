"""One description per model: every family and task is built, saved, loaded, exported,
optimised, counted and mapped for conversion through it."""

import json

import pytest
import torch
from safetensors.torch import save_file

import spinedet
from spinedet.convert.keras_order import keras_layers
from spinedet.errors import SpinedetError
from spinedet.export import DenseOutputs, export_onnx
from spinedet.info import count_macs
from spinedet.models import FAMILIES, TASKS, ModelDescription, describe, read_description
from spinedet.models.weights import architecture_options
from spinedet.optimize import optimize_for_inference

# Small widths per family so every model builds and runs in well under a second.
SMALL = {
    "spinenet": {"filter_scale": 0.25, "endpoint_filters": 16},
    "spinenet_mobile": {"filter_scale": 0.25, "endpoint_filters": 16},
}
HEAD = {
    "retinanet": {"score_thresh": 0.0},
    "fasterrcnn": {"fc_dim": 32},
    "maskrcnn": {"fc_dim": 32},
}


def first_variant_models() -> list[str]:
    """For each family, its first variant's backbone and every task it supports."""
    names = []
    for family in FAMILIES.values():
        variant = next(iter(family.scaling))
        names.append(f"{family.name}{variant}")
        names += [f"{family.name}{variant}_{t.name}" for t in TASKS.values()
                  if t.supports(family, variant)]  # fmt: skip
    return names


MODELS = first_variant_models()


def small(name: str) -> torch.nn.Module:
    family = "spinenet_mobile" if "mobile" in name else "spinenet"
    task = spinedet.models.model_task(name)
    options = {**SMALL[family], **HEAD.get(task, {})}
    if task is None:
        return spinedet.create_model(name, **options)
    return spinedet.create_model(
        name, categories=[{"id": 3, "name": "cat"}, {"id": 9, "name": "dog"}], image_size=64,
        **options,
    )  # fmt: skip


def test_every_family_has_every_kind_registered():
    assert set(FAMILIES) == {"spinenet", "spinenet_mobile"}
    assert "spinenet_mobile49_retinanet" in MODELS and "spinenet49s_maskrcnn" in MODELS
    assert "spinenet_mobile49_maskrcnn" not in spinedet.list_models()


@pytest.mark.parametrize("name", MODELS)
def test_description_round_trips_through_the_weights_file(name, tmp_path):
    model = small(name)
    description = describe(model)
    assert description.name == name
    path = tmp_path / "m.safetensors"
    spinedet.save_weights(model, path)
    assert read_description(path) == description
    again = spinedet.load_model(path)
    assert describe(again) == description
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    if description.task != "backbone":
        # Labels map to the data set's own category ids, whatever their gaps; label 0 is the
        # background of detectors and the first class of classifiers.
        first = int(description.background)
        assert description.label_to_category_id() == {first: 3, first + 1: 9}
        assert again.class_names == ["cat", "dog"]


@pytest.mark.parametrize("name", MODELS)
def test_infer_optimise_count_export_and_map_every_model(name):
    model = small(name).eval()
    task = describe(model).task
    image = torch.rand(3, 64, 64)
    with torch.no_grad():
        if task == "backbone":
            out = model(image[None])
            assert list(out) == ["p3", "p4", "p5", "p6", "p7"]
        elif task == "classifier":
            assert model(image[None]).shape == (1, 2)
        else:
            (out,) = model([image])
            assert {"boxes", "scores", "labels"} <= set(out)
            assert ("masks" in out) == TASKS[task].masks
        plain = DenseOutputs(model, 64)(image[None])
        fast = DenseOutputs(optimize_for_inference(model), 64)(image[None])
    assert all(torch.allclose(a, b, atol=1e-4, rtol=1e-4) for a, b in zip(plain, fast, strict=True))
    assert count_macs(model, 64) > 0
    backbone = model if task == "backbone" else model.backbone
    # The Model Garden layout names a layer for every backbone tensor.
    layers = [f"{layer.module}." for layer in keras_layers(backbone)]
    keys = [k for k in backbone.state_dict() if "num_batches_tracked" not in k]
    assert all(any(k.startswith(m) for m in layers) for k in keys)


def test_mobile_backbone_exports_to_onnx(tmp_path):
    result = export_onnx(small("spinenet_mobile49"), tmp_path / "m.onnx", image_size=64)
    assert result["kind"] == "backbone" and max(result["max_abs_diff"].values()) <= 1e-4


def test_a_directly_built_backbone_saves_a_file_that_loads(tmp_path):
    model = spinedet.SpineNet(filter_scale=0.25, endpoint_filters=16, min_level=4)
    description = describe(model)
    assert (description.name, description.variant) == ("spinenet", None)
    spinedet.save_weights(model, tmp_path / "b.safetensors")
    again = spinedet.load_model(tmp_path / "b.safetensors")
    assert again.levels == [4, 5, 6, 7]
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x)["p4"], again.eval()(x)["p4"])


def test_files_written_before_descriptions_still_load(tmp_path):
    model = spinedet.create_model(
        "spinenet49s_retinanet", class_names=["a", "b"], **SMALL["spinenet"]
    )
    meta = {
        "model_name": "spinenet49s_retinanet",
        "num_classes": 3,
        "class_names": ["a", "b"],
        "model_kwargs": dict(SMALL["spinenet"]),
    }
    path = tmp_path / "old.safetensors"
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"spinedet": json.dumps(meta)})
    again = spinedet.load_model(path)
    assert describe(again).name == "spinenet49s_retinanet" and again.class_names == ["a", "b"]


def test_fine_tuning_inherits_architecture_not_runtime_options(tmp_path):
    model = spinedet.create_model(
        "spinenet49s_maskrcnn", num_classes=3, head_channels=32, fc_dim=32,
        box_score_thresh=0.3, image_size=128, **SMALL["spinenet"],
    )  # fmt: skip
    path = tmp_path / "m.safetensors"
    spinedet.save_weights(model, path)
    inherited = architecture_options(path, "spinenet49s_maskrcnn")
    assert inherited == {"head_channels": 32, "fc_dim": 32, **SMALL["spinenet"]}
    # Only the same model takes them: another variant or head has other shapes.
    assert architecture_options(path, "spinenet49_maskrcnn") == {}
    assert architecture_options(path, "spinenet49s_retinanet") == {}


def test_load_model_takes_a_run_directory(tmp_path):
    torch.manual_seed(0)
    best, last = small("spinenet49s_retinanet"), small("spinenet49s_retinanet")
    spinedet.save_weights(last, tmp_path / "last.safetensors")
    for weights in (last, best):  # its best weights, else its last
        again = spinedet.load_model(tmp_path).state_dict()
        assert all(torch.equal(again[k], v) for k, v in weights.state_dict().items())
        spinedet.save_weights(best, tmp_path / "best.safetensors")
    key = "head.classification_head.cls_logits.weight"
    assert not torch.equal(best.state_dict()[key], last.state_dict()[key])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpinedetError, match="empty: run directory holds no best/last"):
        spinedet.load_model(tmp_path / "empty")


def test_malformed_description_is_one_clear_error(tmp_path):
    path = tmp_path / "bad.safetensors"
    meta = {"description": {"family": "spinenet", "variant": 49, "task": "backbone"}}
    save_file({"x": torch.zeros(1)}, str(path), metadata={"spinedet": json.dumps(meta)})
    with pytest.raises(SpinedetError, match="bad.safetensors"):
        spinedet.load_model(path)


def test_foreign_modules_are_refused_by_name():
    with pytest.raises(SpinedetError, match="Linear is not a spinedet model"):
        describe(torch.nn.Linear(2, 2))
    assert isinstance(describe(small("spinenet49s")), ModelDescription)


@pytest.mark.parametrize("name", ["spinenet49s_maskrcnn", "spinenet49s_retinanet"])
def test_fine_tuning_on_other_classes_of_the_same_count_starts_class_layers_fresh(
    name, tmp_path, caplog
):
    """Class layers are rows per class: loaded onto other classes (here the same names in
    another order) they would predict the wrong ones, so they start fresh like a new count."""
    from spinedet.models.weights import load_weights, save_weights

    small = {"min_level": 3, "max_level": 7, "filter_scale": 0.25, "endpoint_filters": 16}
    if name.endswith("maskrcnn"):
        small |= {"box_convs": 1, "mask_convs": 1}
    trained = spinedet.create_model(name, class_names=["a", "b", "c"], image_size=64, **small)
    save_weights(trained, tmp_path / "w.safetensors")
    for names, fresh in ((["a", "b", "c"], False), (["c", "b", "a"], True)):
        model = spinedet.create_model(name, class_names=names, image_size=64, **small)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with caplog.at_level("WARNING"):
            load_weights(model, tmp_path / "w.safetensors", allow_shape_mismatch=True)
        kept = {k for k, v in model.state_dict().items() if torch.equal(v, before[k])}
        loaded = {
            k for k, v in model.state_dict().items() if torch.equal(v, trained.state_dict()[k])
        }
        class_keys = {k for k in before if not k.startswith("rpn.")
                      and ("cls" in k or "bbox_pred" in k or "mask_fcn_logits" in k)}  # fmt: skip
        assert loaded - class_keys == set(before) - class_keys
        if fresh:
            assert class_keys <= kept and "trained on other classes" in caplog.text
            assert any(k.endswith("weight") for k in class_keys - loaded)  # random: differ
        else:
            assert class_keys <= loaded


@pytest.mark.parametrize(
    "option,owner,expected",
    [
        ({"box_score_thresh": "abc"}, "torchvision's MaskRCNN", "a number"),
        ({"filter_scale": "abc"}, "SpineNet", "a number"),
        ({"box_convs": 2.5}, "maskrcnn", "an integer"),
        ({"bn_momentum": True}, "SpineNet", "a number"),
        ({"activation": 3}, "SpineNet", "a string"),
        ({"image_size": 0}, "maskrcnn", "an integer >= 32"),  # was: ZeroDivisionError at predict
    ],
)
def test_option_values_of_the_wrong_kind_are_refused_when_building(option, owner, expected):
    ((key, value),) = option.items()
    with pytest.raises(
        SpinedetError, match=rf"option {key}={value!r} of {owner}: expected {expected}"
    ):
        spinedet.create_model("spinenet49s_maskrcnn", num_classes=3, **option)
