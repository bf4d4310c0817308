"""Run configs: shipped recipes, overrides and clear errors."""

import pytest

from spinedet import config
from spinedet.config import ConfigError, load_config, validate_config


def test_shipped_recipe_by_name_and_overrides():
    cfg = load_config("quickstart", ["train.epochs=3", "model.options={activation: swish}"])
    assert cfg["model"]["name"] == "spinenet49s_maskrcnn"
    assert cfg["train"]["epochs"] == 3
    # options merge into the recipe's options instead of replacing them
    assert cfg["model"]["options"]["activation"] == "swish"
    assert cfg["model"]["options"]["box_batch_size_per_image"] == 64
    assert cfg["train"]["momentum"] == 0.9  # untouched defaults stay
    # null takes an option off (a RetinaNet from the quickstart refused its R-CNN options)
    retina = ["model.name=spinenet49s_retinanet", "model.options.box_batch_size_per_image=null",
              "model.options={mask_convs: null, box_convs: null}"]  # fmt: skip
    options = load_config("quickstart", retina)["model"]["options"]
    assert not {"box_batch_size_per_image", "mask_convs", "box_convs"} & set(options)
    assert options["filter_scale"] == cfg["model"]["options"]["filter_scale"]


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


def test_scientific_notation_reads_as_numbers_in_overrides_and_files(tmp_path):
    recipe = tmp_path / "sci.yaml"
    recipe.write_text("train:\n  weight_decay: 4e-5\n  base_lr: 1.5E+1\nmodel:\n  options:\n"
                      "    bn_eps: 1e-3\n")  # fmt: skip
    cfg = load_config(recipe, ["train.base_lr=1e6", "train.max_steps=1e3", "data.hflip=5e-1"])
    assert cfg["train"]["weight_decay"] == 4e-5 and cfg["train"]["base_lr"] == 1e6
    assert cfg["model"]["options"]["bn_eps"] == 1e-3  # options reach create_model as numbers
    assert cfg["train"]["max_steps"] == 1000 and type(cfg["train"]["max_steps"]) is int
    assert cfg["data"]["hflip"] == 0.5
    # ints where a float is expected become floats; strings that only look like words stay
    assert load_config(None, ["train.clip_grad=3"])["train"]["clip_grad"] == 3.0
    assert load_config(None, ["model.name=e5"])["model"]["name"] == "e5"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=0", "train.epochs=0: expected an integer >= 1"),
        ("train.epochs=abc", "train.epochs='abc': expected an integer >= 1"),
        ("train.epochs=2.5", "train.epochs=2.5: expected an integer >= 1"),
        ("train.epochs=true", "train.epochs=True: expected an integer >= 1"),
        ("train.batch_size=0", "train.batch_size=0: expected an integer >= 1"),
        ("train.batch_size=abc", "train.batch_size='abc': expected an integer >= 1"),
        ("train.log_every=0", "train.log_every=0: expected an integer >= 1"),
        ("train.accumulate=0", "train.accumulate=0: expected an integer >= 1"),
        ("train.dist_timeout_min=0", "train.dist_timeout_min=0: expected an integer >= 1"),
        ("model.backbone_weights=3", "model.backbone_weights=3: expected a string or null"),
        ("data.workers=-1", "data.workers=-1: expected an integer >= 0 or null"),
        ("train.warmup_steps=-1", "train.warmup_steps=-1: expected an integer >= 0"),
        ("train.max_steps=0", "train.max_steps=0: expected an integer >= 1 or null"),
        ("train.amp=foo", "train.amp='foo': expected one of auto, bf16, fp16, none"),
        ("train.schedule=foo", "train.schedule='foo': expected one of step, cosine"),
        ("train.base_lr=0", "train.base_lr=0: expected a finite number > 0"),
        ("train.base_lr=.inf", "train.base_lr=inf: expected a finite number > 0"),
        ("train.base_lr=.nan", "train.base_lr=nan: expected a finite number > 0"),
        ("train.momentum=1", "train.momentum=1: expected a finite number in [0, 1)"),
        ("train.weight_decay=-1e-4", "train.weight_decay=-0.0001: expected a finite number >= 0"),
        ("train.gamma=0", "train.gamma=0: expected a finite number in (0, 1]"),
        ("train.warmup_factor=2", "train.warmup_factor=2: expected a finite number in [0, 1]"),
        ("train.clip_grad=-1", "train.clip_grad=-1: expected a finite number >= 0"),
        ("data.hflip=abc", "data.hflip='abc': expected a finite number in [0, 1]"),
        ("data.scale_range=5", "data.scale_range=5: expected a list of 2 numbers > 0 in ascending"),
        ("data.scale_range=[2, 1]", "data.scale_range=[2, 1]: expected a list of 2 numbers"),
        ("data.scale_range=[0, 1]", "data.scale_range=[0, 1]: expected a list of 2 numbers > 0"),
        ("data.scale_range=[1]", "data.scale_range=[1]: expected a list of 2 numbers"),
        ("train.milestones=[2]", "train.milestones=[2]: expected a list of numbers in (0, 1]"),
        ("train.milestones=0.5", "train.milestones=0.5: expected a list of numbers in (0, 1]"),
        ("model.name=123", "model.name=123: expected a string"),
        ("model.options=[1]", "model.options=[1]: expected a mapping"),
        ("model.image_size=16", "model.image_size=16: expected an integer >= 32"),
        ("model.weights=3", "model.weights=3: expected a string or null"),
        ("data.check=1", "data.check=1: expected true or false"),
        ("data.train.images=[a]", "data.train.images=['a']: expected a string or null"),
    ],
)  # fmt: skip
def test_bad_values_are_one_line_errors_naming_key_value_and_range(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(f"--set {message}") and "\n" not in str(e.value)


def test_bad_value_in_a_file_names_the_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  amp: fp8\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: train\.amp='fp8': expected one of auto"):
        load_config(recipe)


def test_validate_config_checks_a_dict_built_in_python():
    cfg = load_config(None)
    cfg["train"]["epochs"] = 0
    with pytest.raises(ConfigError, match=r"^train\.epochs=0: expected an integer >= 1$"):
        validate_config(cfg)


def test_a_partial_dict_is_merged_over_the_defaults_and_validated():
    cfg = load_config({"train": {"epochs": 3.0}, "data": {"train": {"images": "img"}}})
    assert cfg == load_config(None, ["train.epochs=3", "data.train.images=img"])
    assert type(cfg["train"]["epochs"]) is int
    with pytest.raises(ConfigError, match=r"^config: train\.amp='fp8': expected one of auto"):
        load_config({"train": {"amp": "fp8"}})
    with pytest.raises(ConfigError, match=r"^config: unknown config key 'trian'"):
        load_config({"trian": {}})


def test_a_new_key_needs_only_its_default_and_optionally_a_rule(monkeypatch):
    monkeypatch.setitem(config.DEFAULTS["train"], "ema_every", 1)
    assert load_config(None, ["train.ema_every=3"])["train"]["ema_every"] == 3
    with pytest.raises(ConfigError, match="train.ema_every='x': expected an integer$"):
        load_config(None, ["train.ema_every=x"])
    monkeypatch.setitem(config.RULES, "train.ema_every", config.Rule(low=1))
    with pytest.raises(ConfigError, match="train.ema_every=0: expected an integer >= 1$"):
        load_config(None, ["train.ema_every=0"])


def test_shipped_recipes_are_valid():
    for recipe in config.CONFIG_DIR.glob("*.yaml"):
        validate_config(load_config(recipe))


def test_save_config_round_trips(tmp_path):
    cfg = load_config("quickstart", ["train.weight_decay=4e-5"])
    config.save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert [p.name for p in tmp_path.iterdir()] == ["c.yaml"]  # no temp file left
