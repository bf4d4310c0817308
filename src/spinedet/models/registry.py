"""The model registry: families, tasks, ``create_model`` and ``load_model``.

A backbone *family* (SpineNet, SpineNet-Mobile) registers itself beside its builder with its
scaling table and head defaults; a *task* (RetinaNet, Faster/Mask R-CNN, ...) registers its
builder with the families it supports. Registry names are ``<family><variant>`` for a backbone
and ``<family><variant>_<task>`` for the rest, e.g. ``spinenet49s_maskrcnn``, in the manner of
timm's ``create_model``. Every model built here carries a :class:`ModelDescription`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ModelError, SpinedetError
from .description import Category, ModelDescription, categories_from

__all__ = [
    "Family",
    "Task",
    "check_option_types",
    "FAMILIES",
    "TASKS",
    "create_model",
    "describe",
    "list_models",
    "load_model",
    "model_task",
    "register_family",
    "register_task",
    "resolve_variant",
]

BACKBONE = "backbone"


def check_option_types(
    options: Mapping[str, Any], params: Mapping[str, inspect.Parameter], owner: str
) -> None:
    """A ModelError for an option whose scalar value is of another kind than its parameter's
    default (text for a number, a number for a flag, ...): it would otherwise fail deep in the
    first forward pass that reads it, or after an epoch of training, or never."""
    for key, value in options.items():
        default = params[key].default if key in params else None
        if default in (None, inspect.Parameter.empty) or value is None:
            continue
        if isinstance(value, list | tuple | dict):  # structured values: the callee judges
            continue
        if isinstance(default, bool):
            ok, kind = isinstance(value, bool), "true or false"
        elif isinstance(default, int | float):
            whole = isinstance(default, int)
            ok = isinstance(value, int if whole else int | float) and not isinstance(value, bool)
            kind = "an integer" if whole else "a number"
        elif isinstance(default, str):
            ok, kind = isinstance(value, str), "a string"
        else:
            continue
        if not ok:
            raise ModelError(f"option {key}={value!r} of {owner}: expected {kind}")


@dataclass(frozen=True)
class Family:
    """A backbone family: its class, scaling table and detector-head defaults per variant.

    Attributes:
        name: registry prefix, e.g. ``spinenet``.
        backbone_class: the module class; a scaling entry's fields are its keyword options.
        scaling: variant -> scaling entry (a dataclass).
        head_defaults: variant -> default head options of the tasks.
        variant_prefix: how task builders spell its variants (``mobile49``).
        title: the family's name in messages.
    """

    name: str
    backbone_class: type[nn.Module]
    scaling: Mapping[str, Any]
    head_defaults: Mapping[str, Mapping[str, Any]]
    variant_prefix: str = ""
    title: str = "SpineNet"

    @property
    def option_names(self) -> tuple[str, ...]:
        params = inspect.signature(self.backbone_class.__init__).parameters
        return tuple(p for p in params if p != "self")

    def build(self, variant: str | None, **options: Any) -> nn.Module:
        """The backbone of ``variant`` (None: the class defaults), ``options`` overriding."""
        unknown = sorted(set(options) - set(self.option_names))
        if unknown:
            raise ModelError(
                f"unknown option {unknown[0]!r}; {self.backbone_class.__name__} options are "
                f"{', '.join(self.option_names)}"
            )
        params = inspect.signature(self.backbone_class.__init__).parameters
        check_option_types(options, params, self.backbone_class.__name__)
        scaling = {} if variant is None else dataclasses.asdict(self.scaling[variant])
        model = self.backbone_class(**{**scaling, **options})
        model.description = ModelDescription(self.name, variant, BACKBONE, options)
        return model


@dataclass(frozen=True)
class Task:
    """A head on a backbone: its builder and the families and variants it supports.

    ``runtime_options`` are builder options that leave the weights' shapes and meaning alone
    (thresholds, proposal counts, input size); the others are architecture options, which a
    model fine-tuned from a weights file inherits from it.
    """

    name: str
    builder: Callable[..., nn.Module]
    families: Mapping[str, tuple[str, ...] | None]
    runtime_options: frozenset[str]
    background: bool = True
    default_classes: int = 91
    masks: bool = False

    def supports(self, family: Family, variant: str) -> bool:
        if family.name not in self.families:
            return False
        variants = self.families[family.name]
        return variants is None or variant in variants


FAMILIES: dict[str, Family] = {}
TASKS: dict[str, Task] = {}


def register_family(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def resolve_variant(key: str) -> tuple[Family, str]:
    """The family and variant a task builder's ``variant`` names (``49s``, ``mobile49``)."""
    key = key.lower()
    for family in FAMILIES.values():
        if key.startswith(family.variant_prefix):
            variant = key.removeprefix(family.variant_prefix)
            if variant in family.scaling:
                return family, variant
    known = [f"{f.variant_prefix}{v}" for f in FAMILIES.values() for v in f.scaling]
    raise ModelError(f"unknown SpineNet variant {key!r}; expected one of {known}")


def register_task(
    name: str,
    *,
    families: Mapping[str, tuple[str, ...] | None],
    runtime: Iterable[str] = (),
    background: bool = True,
    default_classes: int = 91,
    masks: bool = False,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a task builder ``builder(variant, num_classes, *, class_names, **options)``.

    The builder is wrapped so that every model it returns carries its description: the
    options the caller gave (not the defaults), the family and variant, and the classes.
    """

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        signature = inspect.signature(builder)

        @functools.wraps(builder)
        def build(*args: Any, **kwargs: Any) -> nn.Module:
            given = dict(signature.bind(*args, **kwargs).arguments)
            check_option_types(kwargs, signature.parameters, name)
            size = kwargs.get("image_size")
            if isinstance(size, int) and size < 32:  # a division by zero at the first image
                raise ModelError(f"option image_size={size} of {name}: expected an integer >= 32")
            model = builder(*args, **kwargs)
            key = given.pop("variant", signature.parameters["variant"].default)
            given.pop("num_classes", None)
            given.pop("class_names", None)
            options = {**given.pop("kwargs", {}), **given}
            family, variant = resolve_variant(key)
            categories = categories_from(class_names=model.class_names, first_id=int(background))
            model.description = ModelDescription(
                family.name, variant, name, options, categories, background
            )
            return model

        TASKS[name] = Task(
            name, build, families, frozenset(runtime), background, default_classes, masks
        )
        return build

    return wrap


def _names() -> dict[str, tuple[Family, str | None, str]]:
    table: dict[str, tuple[Family, str | None, str]] = {}
    for family in FAMILIES.values():
        for variant in family.scaling:
            table[f"{family.name}{variant}"] = (family, variant, BACKBONE)
            for task in TASKS.values():
                if task.supports(family, variant):
                    table[f"{family.name}{variant}_{task.name}"] = (family, variant, task.name)
    return table


def list_models(pattern: str = "") -> list[str]:
    """Names accepted by :func:`create_model`, optionally only those containing ``pattern``."""
    return [name for name in _names() if pattern in name]


def _lookup(name: str) -> tuple[Family, str | None, str]:
    key = str(name).lower()
    table = _names()
    if key in table:
        return table[key]
    if key in FAMILIES:  # a backbone of the class defaults plus options (a custom build)
        return FAMILIES[key], None, BACKBONE
    close = difflib.get_close_matches(key, list(table), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ModelError(
        f"unknown model {name!r}{hint} (`spinedet models` or spinedet.list_models() lists "
        f"all {len(table)})"
    )


def model_task(name: str) -> str | None:
    """The task of a registry name (``"retinanet"``, ``"maskrcnn"``, ...), None for backbones."""
    task = _lookup(name)[2]
    return None if task == BACKBONE else task


def describe(model: nn.Module) -> ModelDescription:
    """The description of a spinedet model; a clear error for any other module."""
    description = getattr(model, "description", None)
    if not isinstance(description, ModelDescription):
        raise SpinedetError(f"{type(model).__name__} is not a spinedet model (no description)")
    return description


def task_of(model: nn.Module) -> Task | None:
    """The registered task of a model, None for a backbone."""
    return TASKS.get(describe(model).task)


def create_model(
    name: str,
    num_classes: int | None = None,
    *,
    weights: str | Path | None = None,
    categories: Iterable[Category | Mapping] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model by name.

    Args:
        name: ``spinenet{49s,49,96,143,190}`` for a backbone, or with a ``_retinanet``,
            ``_fasterrcnn`` or ``_maskrcnn`` suffix for a detector;
            ``spinenet_mobile{49,49s,49xs}`` or with a ``_retinanet`` suffix for SpineNet-Mobile
            (see :func:`list_models`); ``spinenet`` alone builds a custom backbone from its
            options (e.g. ``block_specs``).
        num_classes: detector classes including background (default 91, COCO); inferred from
            ``categories`` or ``class_names`` when given. Not accepted for backbones.
        weights: a ``.safetensors`` file written by spinedet (training, ``convert-tf``); the
            model takes the architecture options the file records (e.g. a converted
            checkpoint's padding and head widths) unless ``kwargs`` give them.
        categories: the data set's classes as ``{"id", "name"}`` entries (or
            :class:`Category`), in label order; ``class_names=[...]`` numbers them 1, 2, ...
        **kwargs: builder options, e.g. ``image_size=512``, ``activation="swish"``,
            ``norm="syncbn"`` or custom ``block_specs`` and scaling values.

    Example:
        >>> model = create_model("spinenet49s_maskrcnn", class_names=["cat", "dog"])
    """
    family, variant, task_name = _lookup(name)
    if weights is not None:  # built as the file's model was (converted padding, head widths...)
        from .weights import architecture_options

        kwargs = {**architecture_options(weights, name), **kwargs}
    cats = categories_from(categories) if categories is not None else None
    if task_name == BACKBONE:
        if num_classes is not None or cats is not None or "class_names" in kwargs:
            raise ModelError(f"{name} is a backbone: classes apply to detectors only")
        model = family.build(variant, **kwargs)
    else:
        task = TASKS[task_name]
        if cats is not None:
            if "class_names" in kwargs:
                raise ModelError("give categories or class_names, not both")
            kwargs["class_names"] = [c.name for c in cats]
        elif num_classes is None and "class_names" not in kwargs:
            num_classes = task.default_classes
        model = task.builder(f"{family.variant_prefix}{variant}", num_classes, **kwargs)
        if cats is not None:
            model.description = model.description.replace(categories=cats)
    if weights is not None:
        from .weights import load_weights

        load_weights(model, weights)
    return model


def build_from_description(description: ModelDescription, **overrides: Any) -> nn.Module:
    """A model with random weights, built as ``description`` says (``overrides`` win)."""
    options = {**description.options_dict(), **overrides}
    if description.task == BACKBONE:
        return create_model(description.name, **options)
    return create_model(description.name, categories=description.categories, **options)


def load_model(path: str | Path, **overrides: Any) -> nn.Module:
    """Rebuild the model a spinedet ``.safetensors`` file was saved from and load its weights.

    ``path`` is the file or a run directory (its ``best.safetensors``, else its
    ``last.safetensors``). ``overrides`` replace builder options, e.g. ``box_score_thresh=0.3``
    for prediction.
    """
    from .weights import read_weights, resolve_checkpoint, restore

    path = resolve_checkpoint(path)
    description, tensors, _ = read_weights(path)
    model = build_from_description(description, **overrides)
    return restore(model, tensors, description, path)
