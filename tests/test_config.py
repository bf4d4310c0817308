"""Run configs: shipped recipes, overrides and clear errors."""

import pytest

from spinedet.config import ConfigError, load_config


def test_shipped_recipe_by_name_and_overrides():
    cfg = load_config("quickstart", ["train.epochs=3", "model.options={activation: swish}"])
    assert cfg["model"]["name"] == "spinenet49s_maskrcnn"
    assert cfg["train"]["epochs"] == 3
    # options merge into the recipe's options instead of replacing them
    assert cfg["model"]["options"]["activation"] == "swish"
    assert cfg["model"]["options"]["box_batch_size_per_image"] == 64
    assert cfg["train"]["momentum"] == 0.9  # untouched defaults stay


@pytest.mark.parametrize("name", ["spinenet49s_retinanet", "spinenet190_maskrcnn"])
def test_paper_recipes_load(name):
    cfg = load_config(name)
    assert cfg["model"]["name"] == name and cfg["train"]["batch_size"] == 256


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(
        ConfigError, match=r"unknown config key 'train.epoch' \(did you mean train.epochs"
    ):
        load_config(None, ["train.epoch=3"])


def test_malformed_override_and_file(tmp_path):
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["train.epochs"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
