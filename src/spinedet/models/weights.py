"""Saving and loading model weights as safetensors, with clear errors on a mismatch."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = [
    "WeightsError",
    "atomic_write",
    "load_weights",
    "read_metadata",
    "resolve_checkpoint",
    "save_weights",
]

log = logging.getLogger(__name__)


class WeightsError(ValueError):
    """A weights file that cannot be read or does not fit the model."""


def _cannot_write(path: Path, error: OSError) -> OSError:
    """One line naming the file and the system's reason; keeps the errno for callers."""
    reason = error.strerror or " ".join(str(error).split())
    failure = OSError(f"{path}: cannot write ({reason})")
    failure.errno = error.errno
    return failure


def _fsync(path: str | Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


DISK_FULL_BYTES = 1 << 20  # free space below which a failed write is put down to a full disk


def _disk_full(folder: Path) -> bool:
    """Whether the file system holding ``folder`` is (about) full: writers such as torch.save
    report a full disk as a RuntimeError without an errno."""
    try:
        return shutil.disk_usage(folder).free < DISK_FULL_BYTES
    except OSError:
        return False


def atomic_write(path: str | Path, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)``, fsync, then rename onto ``path``: a crash, a kill or a full disk
    never leaves half a file, and the file is on disk when this returns.

    A failure to write (disk full, read-only directory, ...) raises a one-line
    ``OSError("<path>: cannot write (<reason>)")``; the temp file is always removed.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        write(tmp)
        # mkstemp makes the file private (0600); give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        _fsync(tmp, os.O_RDWR)
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _cannot_write(path, e) from e
        if isinstance(e, Exception) and _disk_full(path.parent):
            raise _cannot_write(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) from e
        raise
    with contextlib.suppress(OSError):  # some file systems cannot sync a directory
        _fsync(path.parent, os.O_RDONLY)  # makes the rename itself durable


def save_weights(model: nn.Module, path: str | Path, metadata: dict | None = None) -> None:
    """Write the model's state dict (parameters and buffers) and JSON metadata to ``path``."""
    meta = {
        "model_name": getattr(model, "model_name", ""),
        "num_classes": getattr(model, "num_classes", None),
        "class_names": getattr(model, "class_names", None),
        "model_kwargs": getattr(model, "model_kwargs", {}),
        **(metadata or {}),
    }
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
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get("spinedet")
    except (OSError, SafetensorError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: spinedet metadata is not valid JSON ({e})") from None
    problem = _metadata_problem(meta)
    if problem:
        raise WeightsError(f"{path}: spinedet metadata {problem}")
    return meta


# Builder options that change a model's tensors or their meaning (widths, depths, anchors per
# place, activation), as opposed to training or inference settings.
ARCHITECTURE_OPTIONS = frozenset(
    {
        "activation", "block_specs", "filter_scale", "endpoint_filters", "resample_alpha",
        "block_repeats", "expand_ratio", "se_ratio", "min_level", "max_level", "head_depth",
        "head_norm", "head_channels", "fc_dim", "rpn_depth", "rpn_scales",
    }
)  # fmt: skip


def architecture_options(path: str | Path, model_name: str) -> dict:
    """The architecture options recorded in a weights file made for ``model_name`` or for its
    backbone (e.g. the head widths and activation of a converted Model Garden checkpoint), so
    that a model built to load it gets the same shapes; empty for another model."""
    if not Path(path).is_file():
        return {}  # load_weights reports it
    meta = read_metadata(path)
    made_for = meta.get("model_name") or ""
    if made_for != model_name and not model_name.startswith(f"{made_for}_"):
        return {}
    kwargs = meta.get("model_kwargs", {})
    return {k: v for k, v in kwargs.items() if k in ARCHITECTURE_OPTIONS}


def _describe(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _check_activation(model: nn.Module, path: Path) -> None:
    """Weights trained with swish are wrong under relu and vice versa, with every shape equal:
    refuse the mix instead of loading silently."""
    meta_kwargs = read_metadata(path).get("model_kwargs", {})
    theirs = meta_kwargs.get("activation", "relu")
    ours = getattr(model, "model_kwargs", {}).get("activation", "relu")
    if theirs != ours:
        raise WeightsError(
            f"{path} was trained with activation={theirs}, this model uses {ours}: build it "
            f"with activation={theirs!r} (config: --set model.options.activation={theirs})"
        )


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
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    _check_activation(model, path)
    target = model
    own = model.state_dict()
    backbone = getattr(model, "backbone", None)
    if backbone is not None and not any(k.startswith("backbone.") for k in state):
        target, own = backbone, backbone.state_dict()
        log.info("%s holds a backbone only: loading it into the detector's backbone", path)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
        for k in set(own) & set(state)
        if state[k].shape != own[k].shape
    )
    if allow_shape_mismatch and shapes:
        log.warning(
            "%s: kept %d freshly initialised tensors: %s", path, len(shapes), _describe(shapes)
        )
        state = {k: own[k] if k in own and v.shape != own[k].shape else v for k, v in state.items()}
        shapes = []
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_describe(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_describe(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} with another shape: {_describe(shapes)}")
    if problems:
        meta = read_metadata(path)
        made_for = meta.get("model_name") or "another model"
        if meta.get("num_classes"):
            made_for += f" with {meta['num_classes']} classes"
        raise WeightsError(
            f"{path} does not fit {getattr(model, 'model_name', type(model).__name__)} "
            f"(file made for {made_for}): " + "; ".join(problems)
        )
    with torch.no_grad():
        target.load_state_dict(state, strict=True)
    return model


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
