"""A run's logs, written by rank 0: ``metrics.jsonl`` (strict JSON, one row per line),
TensorBoard scalars, ``log.txt`` (plain text) and the console (where the progress bar lives)."""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from logging.handlers import BufferingHandler
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from ..files import atomic_write, writing
from .plots import read_metrics

__all__ = ["RunLogger", "held_records", "strict_json"]


@contextmanager
def held_records() -> Iterator[list[logging.LogRecord]]:
    """spinedet's log records emitted inside the block (fresh tensors while the model is
    built, skipped annotations, ...), kept for :meth:`RunLogger.open` to write to log.txt."""
    handler = BufferingHandler(capacity=1_000_000)
    logging.getLogger("spinedet").addHandler(handler)
    try:
        yield handler.buffer
    finally:
        logging.getLogger("spinedet").removeHandler(handler)


def strict_json(row: dict[str, Any]) -> str:
    """``row`` as one line of standard JSON: NaN and infinities become null."""
    clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v
             for k, v in row.items()}  # fmt: skip
    return json.dumps(clean, allow_nan=False)


class RunLogger:
    """Writes nothing on ranks other than 0, so every rank can call it."""

    def __init__(self, out: Path, main: bool) -> None:
        self.out, self.main = out, main
        self.metrics = out / "metrics.jsonl"
        self.writer: SummaryWriter | None = None
        self._handler: logging.Handler | None = None
        self._excepthook: Any = None  # threading's, while the writer is open

    def open(
        self,
        resume_step: int | None,
        early: Iterable[logging.LogRecord] = (),
        epoch_pending: bool = False,
    ) -> None:
        """Start (or, at ``resume_step``, continue) the logs: rows after the checkpoint's step
        (written before a crash) are dropped, so the log reads as one uninterrupted run, and
        with ``epoch_pending`` (the epoch's end is done again) its validation rows too.
        ``early``: records from before (:func:`held_records`), written to log.txt first."""
        if not self.main:
            return
        if resume_step is None:
            self.metrics.unlink(missing_ok=True)
        else:
            redone = {"val"} if epoch_pending else set()
            kept = [r for r in read_metrics(self.metrics) if r["step"] < resume_step
                    or (r["step"] == resume_step and r["kind"] not in redone)]  # fmt: skip
            text = "".join(strict_json(r) + "\n" for r in kept)
            atomic_write(self.metrics, lambda tmp: Path(tmp).write_text(text))
        # TensorBoard hides the events of earlier files from this step on, as dropped above
        # (a redone validation's second point lies on its first: the same weights).
        purge = 0 if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(self.out / "tb", purge_step=purge)
        self._excepthook, threading.excepthook = threading.excepthook, self._thread_error
        # Every spinedet log record (fresh tensors, skipped images, ...) also goes to log.txt.
        self._handler = logging.FileHandler(self.out / "log.txt")
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        for record in early:
            self._handler.handle(record)
        logging.getLogger("spinedet").addHandler(self._handler)

    def text(self, message: str) -> None:
        """A message for a person: the console (above the progress bar) and log.txt."""
        if not self.main:
            return
        tqdm.write(message)
        self.line(message)

    def line(self, message: str) -> None:
        """A line of log.txt alone (the console has the progress bar)."""
        if self.main:
            _append(self.out / "log.txt", message + "\n")

    def row(self, row: dict[str, Any]) -> None:
        """One metrics row (``kind``, ``step`` and numbers); None values skip TensorBoard."""
        if not self.main:
            return
        _append(self.metrics, strict_json(row) + "\n")
        # TensorBoard writes from a thread of its own, and raises its errors at the next call.
        with writing(self.out / "tb"):
            for key, value in row.items():
                if isinstance(value, int | float) and key not in ("step", "epoch"):
                    if math.isfinite(value):
                        self.writer.add_scalar(f"{row['kind']}/{key}", value, row["step"])

    def _thread_error(self, args: threading.ExceptHookArgs) -> None:
        # TensorBoard's writer thread keeps its error for the next call, which names the
        # folder in one line (row, close): its own traceback would only precede that line.
        if type(args.thread).__name__ != "_AsyncWriterThread":
            self._excepthook(args)

    def close(self) -> None:
        try:
            if self.writer is not None:
                with writing(self.out / "tb"):
                    self.writer.close()
        finally:
            if self._excepthook is not None:
                threading.excepthook, self._excepthook = self._excepthook, None
            if self._handler is not None:
                logging.getLogger("spinedet").removeHandler(self._handler)
                self._handler.close()


def _append(path: Path, text: str) -> None:
    with writing(path), open(path, "a") as f:
        f.write(text)
