"""What a model is, as data: the frozen description every spinedet model carries.

``create_model`` fills it, the weights file stores it and ``load_model`` rebuilds the model
from it; export, info, optimisation, conversion and the engine read it instead of guessing
from class names or attributes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Container, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any

from ..errors import SpinedetError

__all__ = ["Category", "ModelDescription", "categories_from"]


@dataclass(frozen=True)
class Category:
    """A class of the user's data set: its id in the annotation file and its name."""

    id: int
    name: str


class _FrozenMapping(Mapping):
    """A read-only mapping that, unlike ``MappingProxyType``, copies and pickles (models are
    deep-copied, e.g. by ``optimize_for_inference``, and sent to DataLoader workers)."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = dict(data)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return repr(self._data)


def _freeze(value: Any) -> Any:
    """A JSON-like value made immutable (mappings become read-only, lists tuples)."""
    if isinstance(value, Mapping):
        return _FrozenMapping({k: _freeze(v) for k, v in value.items()})
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _freeze(list(dataclasses.astuple(value)))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    """The JSON form of a frozen value."""
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def categories_from(
    categories: Iterable[Category | Mapping] | None = None,
    class_names: Sequence[str] | None = None,
    num_classes: int | None = None,
    first_id: int = 1,
) -> tuple[Category, ...]:
    """Categories from ``{id, name}`` entries, else from names (ids ``first_id``, ...), else
    numbered ``first_id .. first_id + num_classes - 1``."""
    if categories is not None:
        out = []
        for c in categories:
            c = c if isinstance(c, Category) else Category(int(c["id"]), str(c["name"]))
            out.append(c)
        return tuple(out)
    if class_names is not None:
        return tuple(Category(first_id + i, str(n)) for i, n in enumerate(class_names))
    if num_classes is not None:
        return tuple(Category(first_id + i, str(first_id + i)) for i in range(num_classes))
    return ()


def _split_names(classes: Iterable[str | int], names: Container[str]) -> Iterator[str | int]:
    """``classes`` with each string that is not one of ``names`` (as given or stripped of
    spaces) split at its commas, its parts stripped of spaces."""
    for item in classes:
        if not isinstance(item, str) or item in names:
            yield item
        elif item.strip() in names:
            yield item.strip()
        else:
            yield from (part.strip() for part in item.split(",") if part.strip())


def _integer(item: object) -> int | None:
    """``item`` as an integer: an int (not a bool), or a string of one; else None."""
    if isinstance(item, Integral) and not isinstance(item, bool):
        return int(item)
    try:
        return int(item) if isinstance(item, str) else None
    except ValueError:
        return None


@dataclass(frozen=True)
class ModelDescription:
    """One model: which family, variant and task it is, how it was built, and its classes.

    Attributes:
        family: the registered backbone family, e.g. ``"spinenet"``, ``"spinenet_mobile"``.
        variant: a key of the family's scaling table (``"49s"``), or None for a model built
            from the backbone class's defaults and ``options`` alone.
        task: ``"backbone"`` or a registered task (``"retinanet"``, ``"maskrcnn"``, ...).
        options: the builder options the model was made with (JSON values).
        categories: the classes a head predicts, in label order.
        background: whether label 0 is the background (detectors) so class ``i`` of
            ``categories`` is label ``i + 1``, or labels start at 0 (classifiers).
    """

    family: str
    variant: str | None
    task: str
    options: Mapping[str, Any] = field(default_factory=dict)
    categories: tuple[Category, ...] = ()
    background: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", _freeze(dict(self.options)))
        object.__setattr__(self, "categories", tuple(self.categories))

    @property
    def name(self) -> str:
        """The registry name, e.g. ``spinenet49s_maskrcnn`` (``spinenet`` for a custom build)."""
        base = f"{self.family}{self.variant or ''}"
        return base if self.task == "backbone" else f"{base}_{self.task}"

    @property
    def num_classes(self) -> int | None:
        """Outputs of the class head (background included for detectors); None for backbones."""
        if self.task == "backbone":
            return None
        return len(self.categories) + int(self.background)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.categories]

    def label_to_category_id(self) -> dict[int, int]:
        """Model label -> the data set's category id (the one rule, used everywhere)."""
        offset = int(self.background)
        return {i + offset: c.id for i, c in enumerate(self.categories)}

    def category_id_to_label(self) -> dict[int, int]:
        return {cat: label for label, cat in self.label_to_category_id().items()}

    def labels_of(self, classes: Iterable[str | int]) -> list[int]:
        """The labels of ``classes``, each a category name or id (an int, or a string of one,
        as a command line gives it), or a string of them separated by commas (``"person,car"``)
        unless it is one category's whole name (``"car, sedan"``). As evaluation does, a string
        that names one category and is the id of another is refused (either could be meant; an
        unnamed model's name that is its own id is not); so is an unknown one, listing the
        categories."""
        label_of = self.category_id_to_label()
        by_name = {c.name: c.id for c in self.categories}
        name_of = {c.id: c.name for c in self.categories}
        labels: list[int] = []
        for item in _split_names(classes, by_name):
            named = by_name.get(item) if isinstance(item, str) else None
            number = _integer(item)
            number = number if number in label_of else None
            if named is not None and number is not None and named != number:
                raise SpinedetError(
                    f"class {item!r}: the name of category {named} and the id of category "
                    f"{number} ({name_of[number]!r}); give {named} or {name_of[number]!r}"
                )
            chosen = named if named is not None else number
            if chosen is None:
                known = ", ".join(f"{c.name} ({c.id})" for c in self.categories)
                raise SpinedetError(f"class {item!r}: not one of the model's categories: {known}")
            labels.append(label_of[chosen])
        if not labels:
            raise SpinedetError("classes: none given; name categories, or give None for all")
        return list(dict.fromkeys(labels))

    def option(self, key: str, default: Any = None) -> Any:
        return _thaw(self.options.get(key, default))

    def options_dict(self) -> dict[str, Any]:
        """The builder options as plain (mutable) JSON values."""
        return _thaw(self.options)

    def replace(self, **changes: Any) -> ModelDescription:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "variant": self.variant,
            "task": self.task,
            "options": _thaw(self.options),
            "categories": [{"id": c.id, "name": c.name} for c in self.categories],
            "background": self.background,
        }

    @classmethod
    def from_json(cls, data: Any, source: str = "model description") -> ModelDescription:
        """Parse :meth:`to_json`'s output, refusing malformed input in one line."""
        try:
            if not isinstance(data["options"], dict):
                raise TypeError("options is not a mapping")
            variant = data["variant"]
            if not (variant is None or isinstance(variant, str)):
                raise TypeError("variant is not a string")
            for key in ("family", "task"):
                if not isinstance(data[key], str):
                    raise TypeError(f"{key} is not a string")
            categories = categories_from(data["categories"])
            return cls(
                data["family"],
                variant,
                data["task"],
                data["options"],
                categories,
                bool(data.get("background", True)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise SpinedetError(f"{source}: malformed spinedet model description ({e})") from None
