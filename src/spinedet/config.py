"""Run configuration: defaults, YAML recipes (``configs/``) and ``--set key=value`` overrides."""

from __future__ import annotations

import copy
import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from .errors import SpinedetError

__all__ = ["ConfigError", "DEFAULTS", "load_config", "apply_overrides", "save_config"]

CONFIG_DIR = Path(__file__).parent / "configs"

DEFAULTS: dict[str, Any] = {
    "model": {
        "name": "spinenet49s_maskrcnn",
        "image_size": 640,
        "weights": None,  # a .safetensors file (spinedet or converted from TF) to start from
        "options": {},  # any create_model option: activation, stochastic_depth_rate, ...
    },
    "data": {
        "train": {"annotations": None, "images": None},
        "val": {"annotations": None, "images": None},
        "scale_range": [0.5, 2.0],
        "hflip": 0.5,
        "workers": 2,
        "check": True,  # run `data check` before training
    },
    "train": {
        "epochs": 350,
        "batch_size": 64,  # global: split across processes under torchrun
        "base_lr": 0.28,  # learning rate at base_batch; scaled linearly to batch_size
        "base_batch": 256,
        "momentum": 0.9,
        "weight_decay": 4e-5,  # kernels only
        "schedule": "step",  # step | cosine
        "milestones": [0.9, 0.967],  # step schedule: fractions of the run
        "gamma": 0.1,
        "warmup_steps": 500,
        "warmup_factor": 0.1,
        "clip_grad": 10.0,  # max gradient norm; 0 disables
        "amp": "auto",  # auto (bf16 on CUDA) | bf16 | fp16 | none
        "seed": 0,
        "eval_every": 1,  # epochs between COCO evaluations on data.val
        "checkpoint_every": 1,
        "log_every": 10,  # steps between metric log lines
        "max_nonfinite": 5,  # stop after this many non-finite losses in a row
        "max_steps": None,  # stop early (tests, smoke runs)
    },
}


class ConfigError(SpinedetError):
    """A config file or override that cannot be used."""


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
        elif isinstance(base[key], dict):
            base[key] = {**base[key], **(value or {})}
        else:
            base[key] = value
    return base


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


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Defaults, updated by a YAML file (path or shipped recipe name), then ``key=value`` pairs."""
    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = resolve_config_path(path)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        _merge(config, loaded, "", str(path))
    return apply_overrides(config, overrides)


def apply_overrides(config: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings; values are parsed as YAML (numbers, lists, null, ...)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.epochs=12")
        value = yaml.safe_load(raw) if raw else None
        update: Any = value
        for part in reversed(key.split(".")):
            update = {part: update}
        _merge(config, update, "", f"--set {item}")
    return config


def save_config(config: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config, sort_keys=False))
