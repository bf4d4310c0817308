"""Saving and loading model weights as safetensors, with clear errors on a mismatch."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import SpinedetError, shorten
from ..files import atomic_write
from .description import Category, ModelDescription, categories_from
from .registry import BACKBONE, TASKS, _lookup, build_from_description, describe

__all__ = [
    "WeightsError",
    "architecture_options",
    "backbone_options",
    "load_weights",
    "numeric_options",
    "read_description",
    "read_metadata",
    "read_weights",
    "restore",
    "resolve_checkpoint",
    "save_weights",
]

log = logging.getLogger(__name__)


class WeightsError(SpinedetError):
    """A weights file that cannot be read or does not fit the model."""


def save_weights(model: nn.Module, path: str | Path, metadata: dict | None = None) -> None:
    """Write the model's state dict (parameters and buffers) and its description to ``path``,
    with ``metadata`` (JSON values) beside it."""
    meta = {"description": describe(model).to_json(), **(metadata or {})}
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(
        path,
        lambda tmp: save_file(tensors, tmp, metadata={"spinedet": json.dumps(meta)}),
    )


def _metadata_problem(meta: Any) -> str | None:
    """Why parsed spinedet metadata has the wrong shape, or None; absent keys are fine."""
    if not isinstance(meta, dict):
        return "is not a JSON object"

    def is_int(value: Any) -> bool:
        return type(value) is int  # exact: JSON true/false are not counts or ids

    def is_names(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)

    def is_categories(value: Any) -> bool:
        return isinstance(value, list) and all(
            isinstance(c, dict) and is_int(c.get("id")) and isinstance(c.get("name"), str)
            for c in value
        )

    expected = {
        "model_name": ("a string", lambda v: isinstance(v, str)),
        "num_classes": ("a positive integer or null", lambda v: v is None or is_int(v) and v > 0),
        "model_kwargs": ("an object", lambda v: isinstance(v, dict)),
        "class_names": ("a list of strings or null", lambda v: v is None or is_names(v)),
        "categories": ("a list of {id, name} or null", lambda v: v is None or is_categories(v)),
    }
    for key, (what, ok) in expected.items():
        if key in meta and not ok(meta[key]):
            shown = json.dumps(meta[key])
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            return f"{key} must be {what}, not {shown}"
    return None


def read_metadata(path: str | Path) -> dict:
    """The spinedet metadata of a safetensors file (empty dict when it has none), checked:
    ``model_name`` a string, ``num_classes`` a positive int or null, ``model_kwargs`` an object,
    ``class_names`` a list of strings or null, ``categories`` a list of ``{id: int, name: str}``
    or null. Anything else raises a one-line :class:`WeightsError` naming the file."""
    return _read(path, tensors=False)[0]


def _is_torch_save(path: Path) -> bool:
    """Whether ``path`` is a ``torch.save`` archive (a zip file)."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _read(path: str | Path, tensors: bool) -> tuple[dict, dict[str, torch.Tensor]]:
    """The file's spinedet metadata and (if asked) its tensors, from one opening."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get("spinedet")
            state = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except (OSError, SafetensorError) as e:
        if _is_torch_save(path):  # what a user given a run directory may pick: last.pt
            raise WeightsError(
                f"{path}: a torch.save file (a run's checkpoints/last.pt is one), not "
                "safetensors weights: give the run directory or its last.safetensors"
            ) from None
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    if not raw:
        return {}, state
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: spinedet metadata is not valid JSON ({e})") from None
    problem = _metadata_problem(meta)
    if problem:
        raise WeightsError(f"{path}: spinedet metadata {problem}")
    return meta, state


def _legacy_description(meta: dict, path: Path) -> ModelDescription:
    """The description of a file written before descriptions existed (model_name, kwargs)."""
    name = meta.get("model_name")
    if not name:
        raise WeightsError(
            f"{path}: no spinedet model description in the file (not written by spinedet: "
            "convert a TF checkpoint with `spinedet convert-tf`; in Python, "
            "create_model(NAME, weights=...) names the model it holds)"
        )
    family, variant, task = _lookup(name)
    categories = meta.get("categories")
    if not (isinstance(categories, list) and all(isinstance(c, dict) for c in categories)):
        categories = categories_from(class_names=meta.get("class_names"))
    return ModelDescription(
        family.name, variant, task, meta.get("model_kwargs") or {}, categories_from(categories)
    )


def read_description(path: str | Path) -> ModelDescription:
    """The description of the model a spinedet weights file was saved from."""
    return _description(read_metadata(path), Path(path))


def _description(meta: dict, path: Path) -> ModelDescription:
    try:
        if "description" in meta:
            return ModelDescription.from_json(meta["description"], str(path))
        return _legacy_description(meta, path)
    except WeightsError:
        raise
    except SpinedetError as e:  # e.g. a model name this version does not know
        raise WeightsError(f"{path}: {e}") from None


def read_weights(path: str | Path) -> tuple[ModelDescription, dict[str, torch.Tensor], dict]:
    """A weights file's model description, tensors and metadata, read once."""
    meta, state = _read(path, tensors=True)
    return _description(meta, Path(path)), state, meta


def architecture_options(path: str | Path, model_name: str) -> dict:
    """The architecture options recorded in a weights file made for ``model_name`` or for its
    backbone (e.g. the head widths and activation of a converted Model Garden checkpoint), so
    that a model built to load it gets the same shapes; empty for another model."""
    if not Path(path).is_file():
        return {}  # load_weights reports it
    theirs = read_description(path)
    family, variant, task = _lookup(model_name)
    if (theirs.family, theirs.variant) != (family.name, variant) or theirs.task not in (
        task,
        BACKBONE,
    ):
        return {}
    runtime = TASKS[theirs.task].runtime_options if theirs.task in TASKS else frozenset()
    return {k: v for k, v in theirs.options_dict().items() if k not in runtime}


def backbone_options(path: str | Path, model_name: str) -> dict:
    """The backbone options of a weights file's model (see :func:`numeric_options`) for a
    ``model_name`` of its family to take its backbone with; empty for another family."""
    if not Path(path).is_file():
        return {}  # loading reports it
    theirs = read_description(path)
    if theirs.family != _lookup(model_name)[0].name:
        return {}
    return numeric_options(theirs)


def load_weights(
    model: nn.Module, path: str | Path, allow_shape_mismatch: bool = False
) -> nn.Module:
    """Load a spinedet safetensors file into ``model``, strictly.

    A file holding only a backbone (keys without the ``backbone.`` prefix) loads into a
    detector's backbone. Missing, unexpected or mis-shaped variables raise a
    :class:`WeightsError` naming them; nothing is loaded partially. For fine-tuning on other
    classes, ``allow_shape_mismatch`` keeps the model's own tensors where shapes differ (the
    class-dependent layers) and logs their names.
    """
    description, state, _ = read_weights(path)
    return restore(model, state, description, path, allow_shape_mismatch)


def restore(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    theirs: ModelDescription,
    path: str | Path,
    allow_shape_mismatch: bool = False,
) -> nn.Module:
    """Load tensors read from ``path`` (described by ``theirs``) into ``model``; see
    :func:`load_weights`."""
    ours = describe(model)
    _check_numerics(model, ours, theirs, path)
    target = model
    own = model.state_dict()
    if ours.task != BACKBONE and theirs.task == BACKBONE:
        target, own = model.backbone, model.backbone.state_dict()
        log.info("%s holds a backbone only: loading it into the detector's backbone", path)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    fresh = set()
    if allow_shape_mismatch and theirs.task == ours.task and theirs.categories != ours.categories:
        # Other classes, even as many: the class layers' rows would mean the wrong classes.
        fresh = _class_dependent(ours, own) & set(state)
        log.warning("%s was trained on other classes (%s) than these (%s): its class layers "
                    "are not used", path, shorten(theirs.class_names),
                    shorten(ours.class_names))  # fmt: skip
    if allow_shape_mismatch and (shapes or fresh):
        fresh |= {k for k in set(own) & set(state) if state[k].shape != own[k].shape}
        log.warning("%s: kept %d freshly initialised tensors: %s", path, len(fresh),
                    shorten(sorted(fresh)))  # fmt: skip
        state = {k: own[k] if k in fresh else v for k, v in state.items()}
        shapes = []
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {shorten(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {shorten(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} with another shape: {shorten(shapes)}")
    if problems:
        made_for = theirs.name
        if theirs.num_classes:
            made_for += f" with {theirs.num_classes} classes"
        raise WeightsError(
            f"{path} does not fit {ours.name} (file made for {made_for}): " + "; ".join(problems)
        )
    with torch.no_grad():
        target.load_state_dict(state, strict=True)
    return model


def _backbone(model: nn.Module) -> nn.Module:
    return model if describe(model).task == BACKBONE else model.backbone


def numeric_options(description: ModelDescription) -> dict[str, Any]:
    """The backbone options (activation, BN epsilon, padding, ...) a model built as
    ``description`` says has: its recorded options over its builders' defaults, which differ
    by task (a classifier's are tensorflow/tpu's). Builds the model on the meta device."""
    with torch.device("meta"):
        return dict(_backbone(build_from_description(description)).numeric_options)


def _check_numerics(
    model: nn.Module, ours: ModelDescription, theirs: ModelDescription, path: str | Path
) -> None:
    """Refuse weights trained under other backbone options than ``model`` has: swish weights
    under relu, or tensorflow/tpu's padding under Model Garden's, compute something else with
    every shape equal, so they would load silently."""
    mine = getattr(_backbone(model), "numeric_options", None)
    if not mine:
        return  # not a spinedet backbone: nothing to compare
    same_defaults = (theirs.family, theirs.task) == (ours.family, ours.task)
    if same_defaults and all(theirs.option(k) == ours.option(k) for k in mine):
        return  # the same options over the same defaults: no model to build
    recorded = numeric_options(theirs)
    differ = sorted(k for k in recorded.keys() & mine.keys() if recorded[k] != mine[k])
    if differ:
        trained = ", ".join(f"{k}={recorded[k]!r}" for k in differ)
        used = ", ".join(f"{k}={mine[k]!r}" for k in differ)
        sets = " ".join(f"model.options.{k}={recorded[k]}" for k in differ)
        raise WeightsError(f"{path} was trained with {trained}, this model uses {used}: build it "
                           f"with {trained} (config: --set {sets})")  # fmt: skip


def _class_dependent(description: ModelDescription, own: dict[str, torch.Tensor]) -> set[str]:
    """The keys of ``own`` (a state dict) whose shape follows the number of classes: those that
    change in the model with one class more, built on the meta device (no memory, no work)."""
    extra = description.categories + (Category(id=-1, name="extra"),)
    with torch.device("meta"):
        other = build_from_description(description.replace(categories=extra)).state_dict()
    return {k for k, v in own.items() if other[k].shape != v.shape}


def resolve_checkpoint(path: str | Path) -> Path:
    """A weights file, or a run directory (its ``best`` weights, else its ``last``)."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (path / name).is_file():
                return path / name
        raise WeightsError(f"{path}: run directory holds no best/last.safetensors")
    if not path.is_file():
        raise WeightsError(f"{path}: no such checkpoint")
    return path
