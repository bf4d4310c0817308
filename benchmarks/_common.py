"""Shared benchmark harness: pinned threads, warm-up, interleaved rounds, medians, tables.

Machines are noisy (other processes share the cores), so each figure is a ratio against a
reference timed in the same process: every round runs each candidate once, back to back, and
the reported ratio is the median over rounds of ``candidate / reference``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from spinedet.engine.distributed import flush_denormals

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Timing:
    median_s: float
    min_s: float
    ratio: float  # median over rounds of this / reference


def parse_args(description: str, repeats: int = 7, **extra: dict) -> argparse.Namespace:
    """Common options (``--threads``, ``--repeats``, ``--warmup``) plus ``extra`` ones."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    for name, options in extra.items():
        parser.add_argument(f"--{name.replace('_', '-')}", **options)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # As spinedet's training engine does, and as TensorFlow's executor threads do by default.
    flush_denormals()
    return args


def compare(
    candidates: dict[str, Callable[[], object]], reference: str, repeats: int, warmup: int
) -> dict[str, Timing]:
    """Time every candidate in interleaved rounds (the order rotates each round); candidates
    set their own autograd mode (see :func:`inference`)."""
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            candidates[name]()
            times[name].append(time.perf_counter() - start)
    ref = times[reference]
    return {
        name: Timing(
            statistics.median(t),
            min(t),
            statistics.median(a / b for a, b in zip(t, ref, strict=True)),
        )
        for name, t in times.items()
    }


def inference(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` run under ``torch.inference_mode``."""

    def run() -> object:
        with torch.inference_mode():
            return fn()

    return run


def machine() -> str:
    """One line describing the CPU, its cores and the software versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torchvision

    return (
        f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads; "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}"
    )


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}"


def detection_batch(
    size: int, n: int, num_classes: int
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """``n`` random ``size``-square images, each with three boxes and their box-shaped masks."""
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for _ in range(n):
        xy = torch.rand(3, 2, generator=g) * size * 0.6
        wh = (torch.rand(3, 2, generator=g) * 0.3 + 0.1) * size
        boxes = torch.cat([xy, xy + wh], dim=1).round()
        masks = torch.zeros(3, size, size, dtype=torch.uint8)
        for m, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist(), strict=True):
            m[y0:y1, x0:x1] = 1
        labels = torch.randint(1, num_classes, (3,), generator=g)
        images.append(torch.rand(3, size, size, generator=g))
        targets.append({"boxes": boxes, "labels": labels, "masks": masks})
    return images, targets


def max_rel_diff(a: object, b: object) -> float:
    """Largest ``|a - b| / max(1, |a|)`` over matching tensors of (nested) outputs."""
    if isinstance(a, torch.Tensor):
        if a.numel() == 0:
            return 0.0
        return ((a - b).abs().max() / a.abs().max().clamp(min=1)).item()
    if isinstance(a, dict):
        return max(max_rel_diff(a[k], b[k]) for k in a)
    return max(max_rel_diff(x, y) for x, y in zip(a, b, strict=True))
