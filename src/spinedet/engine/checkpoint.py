"""Training state on disk: atomic writes, so an interrupted run can always continue; a lock so
only one run writes a directory; only finite weights are ever saved."""

from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SpinedetError, shorten
from ..files import atomic_write, writable_folder
from ..models.weights import read_metadata, save_weights

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "RunLock",
    "TrainingStateError",
    "all_finite",
    "last_checkpoint",
    "load_state",
    "remove_stale_temps",
    "save_state",
]

log = logging.getLogger(__name__)


class TrainingStateError(SpinedetError):
    """A training checkpoint that is missing, unreadable or does not fit the run."""


CheckpointError = TrainingStateError  # its earlier name


def save_state(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` (model, optimizer, scheduler, scaler, counters) via temp file + rename."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise TrainingStateError(f"{path}: no checkpoint to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise TrainingStateError(
            f"{path}: unreadable checkpoint ({type(e).__name__}: {e})"
        ) from None
    missing = {"model", "optimizer", "scheduler", "epoch", "step"} - set(state)
    if missing:
        raise TrainingStateError(
            f"{path}: not a spinedet training checkpoint (no {sorted(missing)})"
        )
    return state


def all_finite(model: nn.Module) -> bool:
    """Whether every floating-point parameter and buffer of ``model`` is finite."""
    return all(
        bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point()
    )


def last_checkpoint(out: Path) -> tuple[Path, int | None] | None:
    """The run's ``checkpoints/last.pt`` and its step, or None when the run wrote none. The
    step is read from ``last.json`` (None where it is missing or damaged), not from the
    checkpoint: that holds the optimizer state too, gigabytes for the large models."""
    path = out / "checkpoints" / "last.pt"
    if not path.is_file():
        return None
    try:
        step = json.loads(path.with_suffix(".json").read_text())["step"]
    except (OSError, ValueError, TypeError, KeyError):
        step = None
    return path, step


def remove_stale_temps(out: Path) -> list[Path]:
    """Delete the temp files ``atomic_write`` (prefix ``.<name>.``) left behind by a killed run."""
    stale = [*out.glob(".*.safetensors.*"), *out.glob(".config.yaml.*"),
             *out.glob(".metrics.jsonl.*"), *out.glob(".curves.png.*"),
             *out.glob(".data_check.json.*"), *(out / "checkpoints").glob(".last.pt.*"),
             *(out / "checkpoints").glob(".last.json.*")]  # fmt: skip
    for path in stale:
        path.unlink(missing_ok=True)
        log.info("removed %s, left by an interrupted write", path)
    return stale


class RunLock:
    """An exclusive ``flock`` on ``RUN/.lock`` for the whole run: a second writer is refused with
    the holder's pid. The kernel drops the lock when the process dies, however it dies."""

    def __init__(self, out: Path) -> None:
        self.path = out / ".lock"
        self._file: Any = None

    def __enter__(self) -> RunLock:
        writable_folder(self.path.parent)
        handle = open(self.path, "a+")  # noqa: SIM115 - held open for the run
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise SpinedetError(
                f"{self.path.parent} is in use by another training run (pid {holder}); "
                "wait for it to end or pick another --out"
            ) from None
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle
        return self

    def __exit__(self, *exc: Any) -> None:
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()


class Checkpointer:
    """``RUN/checkpoints/last.pt`` (everything needed to resume) beside ``RUN/last.safetensors``
    and ``RUN/best.safetensors`` (weights for eval/predict/export). Saves only finite weights.

    The counters (step, epoch, best, whether the epoch's end was handled) also go to
    ``checkpoints/last.json``, which holds the newer ones when its step is the state's: the
    tensors change only with the step, so a save at the step already written (after an epoch's
    validation, or a stop right after an epoch's save) writes the counters alone, not the whole
    state again (gigabytes for the large models, with their optimizer state)."""

    def __init__(self, out: Path, model: nn.Module, parts: dict[str, Any], meta: dict) -> None:
        self.out, self.model, self.parts, self.meta = out, model, parts, meta
        self.path = out / "checkpoints" / "last.pt"
        self.counters_path = self.path.with_suffix(".json")
        self.written: dict[str, Any] | None = None  # the counters on disk, as this process knows

    def save(self, counters: dict[str, Any]) -> bool:
        """Write the state and the weights, or only the counters where the state of their step
        is on disk already; False (nothing written) when any tensor of the model is not finite,
        so a good checkpoint is never replaced by a broken one."""
        if self.written is not None and counters["step"] == self.written["step"]:
            if counters != self.written:
                self._write_counters(counters)
            return True
        if not all_finite(self.model):
            log.warning("weights at step %s are not finite: %s not updated", counters["step"],
                        self.path)  # fmt: skip
            return False
        state = {"model": self.model.state_dict(),
                 **{k: v.state_dict() for k, v in self.parts.items()}, **counters}  # fmt: skip
        save_state(state, self.path)
        save_weights(self.model, self.out / "last.safetensors", self._meta(counters["step"]))
        self._write_counters(counters)
        return True

    def _write_counters(self, counters: dict[str, Any]) -> None:
        text = json.dumps(counters)
        atomic_write(self.counters_path, lambda tmp: Path(tmp).write_text(text))
        self.written = dict(counters)

    def save_best(self, step: int) -> None:
        if all_finite(self.model):
            save_weights(self.model, self.out / "best.safetensors", self._meta(step))

    def _meta(self, step: int) -> dict:
        return {"step": step, **self.meta}

    def load(self, repair: bool = True) -> dict[str, Any]:
        """Restore model and parts from ``last.pt``; returns its counters. A checkpoint of
        another model or other classes is one line naming the file and the tensors.
        ``repair``: rewrite ``last.safetensors`` where it lags ``last.pt`` (False on the ranks
        that write nothing)."""
        state = load_state(self.path)
        own = self.model.state_dict()
        theirs = state["model"]
        differ = sorted(
            [f"{k} (checkpoint {tuple(theirs[k].shape)}, model {tuple(own[k].shape)})"
             for k in set(own) & set(theirs) if theirs[k].shape != own[k].shape]
            + [f"{k} (not in the checkpoint)" for k in set(own) - set(theirs)]
            + [f"{k} (not in the model)" for k in set(theirs) - set(own)]
        )  # fmt: skip
        if differ:
            raise TrainingStateError(
                f"{self.path} does not fit this run's model ({len(differ)} tensors differ: "
                f"{shorten(differ, 3)}); resume with the run's own config or pick another --out"
            )
        self.model.load_state_dict(theirs)
        for key, part in self.parts.items():
            if key in state:
                part.load_state_dict(state[key])
        counters = {k: v for k, v in state.items() if k != "model" and k not in self.parts}
        newer = self._read_counters()
        if newer is not None and newer.get("step") == counters["step"]:  # else: older, stale
            counters |= newer
        if repair and self._weights_step() != counters["step"]:
            # A kill between last.pt and last.safetensors left the weights a save behind, and
            # saves at this step write the counters alone: bring them level now.
            save_weights(self.model, self.out / "last.safetensors", self._meta(counters["step"]))
        self.written = dict(counters)
        return counters

    def _weights_step(self) -> int | None:
        """The step of ``last.safetensors``; None when it is missing or unreadable."""
        try:
            return read_metadata(self.out / "last.safetensors").get("step")
        except SpinedetError:
            return None

    def _read_counters(self) -> dict[str, Any] | None:
        if not self.counters_path.is_file():
            return None  # a run from before it, or a crash before its first write
        try:
            counters = json.loads(self.counters_path.read_text())
        except (OSError, ValueError) as e:
            raise TrainingStateError(
                f"{self.counters_path}: unreadable ({e}); delete it to resume from the "
                f"counters in {self.path.name}"
            ) from None
        if not isinstance(counters, dict):
            raise TrainingStateError(f"{self.counters_path}: not a JSON object")
        return counters
