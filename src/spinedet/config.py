"""Run configuration: defaults, YAML recipes (``configs/``) and ``--set key=value`` overrides."""

from __future__ import annotations

import copy
import difflib
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import SpinedetError
from .files import atomic_write

__all__ = [
    "ConfigError",
    "DEFAULTS",
    "RULES",
    "Rule",
    "apply_overrides",
    "load_config",
    "save_config",
    "validate_config",
]

CONFIG_DIR = Path(__file__).parent / "configs"

DEFAULTS: dict[str, Any] = {
    "model": {
        "name": "spinenet49s_maskrcnn",
        "image_size": 640,
        "weights": None,  # a .safetensors file (spinedet or converted from TF) to start from
        "options": {},  # any create_model option: activation, stochastic_depth_rate, ...
        "backbone_weights": None,  # a backbone, classifier or detector file: its backbone only
    },
    "data": {
        "train": {"annotations": None, "images": None},
        "val": {"annotations": None, "images": None},
        "scale_range": [0.5, 2.0],  # detectors: scale jitter
        "crop_area": [0.08, 1.0],  # classifiers: random crops of this fraction of the image
        "hflip": 0.5,
        "workers": None,  # DataLoader processes; null: chosen for the device (engine/runtime.py)
        "check": True,  # run `data check` before training
    },
    "train": {
        "epochs": 350,
        "batch_size": 64,  # global: split across processes under torchrun
        "accumulate": 1,  # batches per optimizer step: the effective batch is batch_size x this
        "base_lr": 0.28,  # learning rate at base_batch; scaled linearly to batch_size
        "base_batch": 256,
        "optimizer": "sgd",  # sgd (momentum) | adamw (momentum is then ignored)
        "momentum": 0.9,
        "weight_decay": 4e-5,  # kernels only
        "schedule": "step",  # step | cosine
        "milestones": [0.9, 0.967],  # step schedule: fractions of the run
        "gamma": 0.1,
        "warmup_steps": 500,
        "warmup_factor": 0.1,
        "clip_grad": 10.0,  # max gradient norm; 0 disables
        "amp": "auto",  # auto (bf16 on CUDA) | bf16 | fp16 | none
        "cuda_graphs": True,  # replay backbone and dense head (one CUDA process, accumulate 1)
        "channels_last": True,  # NHWC activations: cuDNN's layout for bf16, oneDNN's on a CPU
        "seed": 0,
        "eval_every": 1,  # epochs between COCO evaluations on data.val
        "checkpoint_every": 1,
        "checkpoint_steps": None,  # also checkpoint every N steps within an epoch (long epochs)
        "log_every": 10,  # steps between metric log lines
        "max_nonfinite": 5,  # stop after this many non-finite losses in a row
        "max_steps": None,  # stop early (tests, smoke runs)
        "dist_timeout_min": 30,  # torch.distributed collectives give up after this long
    },
}


@dataclass(frozen=True)
class Rule:
    """What a key accepts beyond the type of its default (for a list: what each item accepts).

    Bounds are inclusive unless ``*_open``; ``type`` is needed only where the default is None
    (which also allows null), and is ``str`` there unless given.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    type: type | None = None
    length: int | None = None  # lists: exact number of items
    ascending: bool = False  # lists: items in non-decreasing order

    def bounds(self) -> str:
        if self.low is not None and self.high is not None:
            opening, closing = "(["[not self.low_open], ")]"[not self.high_open]
            return f" in {opening}{self.low:g}, {self.high:g}{closing}"
        if self.low is not None:
            return f" {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f" {'<' if self.high_open else '<='} {self.high:g}"
        return ""

    def admits(self, number: float) -> bool:
        low_ok = self.low is None or (number > self.low if self.low_open else number >= self.low)
        high_ok = self.high is None or (
            number < self.high if self.high_open else number <= self.high
        )
        return low_ok and high_ok


# Ranges and choices of the keys that need more than their default's type. A new key needs a
# line in DEFAULTS, and one here only if its values are bounded or its default is None.
RULES: dict[str, Rule] = {
    "model.image_size": Rule(low=32),
    "data.scale_range": Rule(low=0, low_open=True, length=2, ascending=True),
    "data.crop_area": Rule(low=0, high=1, low_open=True, length=2, ascending=True),
    "data.hflip": Rule(low=0, high=1),
    "data.workers": Rule(low=0, type=int),
    "train.epochs": Rule(low=1),
    "train.batch_size": Rule(low=1),
    "train.accumulate": Rule(low=1),
    "train.base_lr": Rule(low=0, low_open=True),
    "train.base_batch": Rule(low=1),
    "train.optimizer": Rule(choices=("sgd", "adamw")),
    "train.momentum": Rule(low=0, high=1, high_open=True),
    "train.weight_decay": Rule(low=0),
    "train.schedule": Rule(choices=("step", "cosine")),
    "train.milestones": Rule(low=0, high=1, low_open=True),
    "train.gamma": Rule(low=0, high=1, low_open=True),
    "train.warmup_steps": Rule(low=0),
    "train.warmup_factor": Rule(low=0, high=1),  # 0: from LR 0, as tensorflow/tpu
    "train.clip_grad": Rule(low=0),
    "train.amp": Rule(choices=("auto", "bf16", "fp16", "none")),
    "train.seed": Rule(low=0),
    "train.eval_every": Rule(low=1),
    "train.checkpoint_every": Rule(low=1),
    "train.checkpoint_steps": Rule(low=1, type=int),
    "train.log_every": Rule(low=1),
    "train.max_nonfinite": Rule(low=1),
    "train.max_steps": Rule(low=1, type=int),
    "train.dist_timeout_min": Rule(low=1),
}


class ConfigError(SpinedetError):
    """A config file or override that cannot be used."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e6`` and ``4e-5`` (no dot, or no exponent sign) as strings; read every
    number in scientific notation as a float, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: no arbitrary objects


def _merge(base: dict, update: dict, where: str, source: str) -> dict:
    for key, value in update.items():
        path = f"{where}.{key}" if where else key
        if key not in base:
            close = difflib.get_close_matches(key, list(base), n=1)
            hint = (
                f" (did you mean {'.'.join([*filter(None, [where]), close[0]])}?)" if close else ""
            )
            raise ConfigError(f"{source}: unknown config key {path!r}{hint}")
        if isinstance(base[key], dict) and key != "options":
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {path} must be a mapping, got {value!r}")
            _merge(base[key], value, path, source)
        elif isinstance(base[key], dict) and isinstance(value, dict | None):
            # model.options: merged; a null option is removed (back to the builder's default:
            # how a command line takes a recipe's R-CNN option off for a RetinaNet).
            merged = {**base[key], **(value or {})}
            base[key] = {k: v for k, v in merged.items() if v is not None}
        else:
            base[key] = value  # validate_config judges it
    return base


_NOUNS = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
          list: "a list", dict: "a mapping"}  # fmt: skip
_PLURALS = {int: "integers", float: "numbers", str: "strings"}


def _coerce(value: Any, kind: type) -> Any:
    """``value`` as a ``kind``: an integral float is an int, an int a float, floats are finite.

    Raises TypeError otherwise (bools are not numbers here, though Python says so)."""
    if kind is float and type(value) in (int, float) and math.isfinite(value):
        return float(value)
    if kind is int and type(value) is float and value.is_integer():
        return int(value)
    if type(value) is kind and kind is not float or kind is dict and isinstance(value, dict):
        return value
    raise TypeError(kind)


def _expected(kind: type, item: type | None, rule: Rule, nullable: bool) -> str:
    if rule.choices:
        text = "one of " + ", ".join(rule.choices)
    elif kind is list and item is not None:
        count = f"{rule.length} " if rule.length else ""
        order = " in ascending order" if rule.ascending else ""
        text = f"a list of {count}{_PLURALS[item]}{rule.bounds()}{order}"
    else:
        text = _NOUNS[kind] + rule.bounds()
    return text + (" or null" if nullable else "")


def _checked(key: str, value: Any, default: Any, prefix: str) -> Any:
    """``value`` typed like ``default`` and within ``RULES[key]``, else a ConfigError."""
    rule = RULES.get(key, Rule())
    kind = rule.type or (str if default is None else type(default))
    item = type(default[0]) if isinstance(default, list) and default else None
    if value is None and default is None:
        return None
    try:
        typed = _coerce(value, kind)
        if item is not None:
            typed = [_coerce(v, item) for v in typed]
        numbers = typed if item in (int, float) else [typed] if kind in (int, float) else []
        ok = (
            all(rule.admits(n) for n in numbers)
            and (not rule.choices or typed in rule.choices)
            and (rule.length is None or len(typed) == rule.length)
            and (not rule.ascending or typed == sorted(typed))
        )
    except TypeError:
        ok = False
    if not ok:
        expected = _expected(kind, item, rule, default is None)
        raise ConfigError(f"{prefix}{key}={value!r}: expected {expected}")
    return typed


def _validate(config: dict[str, Any], defaults: dict[str, Any], where: str, prefix: str) -> None:
    for key, default in defaults.items():
        path = f"{where}{key}"
        if isinstance(default, dict) and default:  # a section: its keys are fixed
            if not isinstance(config.get(key), dict):
                raise ConfigError(f"{prefix}{path}={config.get(key)!r}: expected a mapping")
            _validate(config[key], default, f"{path}.", prefix)
        else:
            config[key] = _checked(path, config.get(key, default), default, prefix)


def validate_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Check every value against the type of its default and ``RULES``, in place.

    Integral floats become ints where the default is an int, ints floats where it is a float.
    A bad value raises a one-line ConfigError naming the key, the value and what is expected,
    after ``prefix`` (the file or ``--set``). Returns ``config``.
    """
    _validate(config, DEFAULTS, "", prefix)
    return config


def resolve_config_path(name: str | Path) -> Path:
    """A config file path, or the name of a recipe shipped in ``spinedet/configs``."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{path.stem}.yaml"
    if path.suffix in ("", ".yaml") and shipped.is_file():
        return shipped
    recipes = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"{name}: no such config file (shipped recipes: {recipes})")


def load_config(
    path: str | Path | dict[str, Any] | None = None, overrides: Iterable[str] = ()
) -> dict[str, Any]:
    """Defaults, updated by a YAML file (path or shipped recipe name) or a dict of the same
    sections (any subset of them), then ``key=value`` pairs; every value validated."""
    config = copy.deepcopy(DEFAULTS)
    if isinstance(path, dict):
        _merge(config, copy.deepcopy(path), "", "config")
        validate_config(config, "config: ")
    elif path is not None:
        path = resolve_config_path(path)
        try:
            loaded = _parse_yaml(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        _merge(config, loaded, "", str(path))
        validate_config(config, f"{path}: ")
    return apply_overrides(config, overrides)


def apply_overrides(config: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings; values are parsed as YAML (numbers, lists, null, ...),
    then checked by :func:`validate_config`."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.epochs=12")
        try:
            value = _parse_yaml(raw) if raw else None
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML") from None
        update: Any = value
        for part in reversed(key.split(".")):
            update = {part: update}
        _merge(config, update, "", f"--set {item}")
        validate_config(config, "--set ")
    return config


def save_config(config: dict[str, Any], path: str | Path) -> None:
    text = yaml.safe_dump(config, sort_keys=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
