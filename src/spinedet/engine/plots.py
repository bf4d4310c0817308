"""Plots: loss and AP curves from a run's ``metrics.jsonl``; precision-recall curves and
confusion matrices of an evaluation (see ``analysis.py``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402

from ..errors import SpinedetError  # noqa: E402
from ..files import atomic_write  # noqa: E402

log = logging.getLogger(__name__)


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a run's ``metrics.jsonl``. A torn last line (a crash mid-write) is dropped
    with a warning; any other line that is not JSON is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):
                log.warning("%s:%d: dropped a cut-off last line (%s)", path, number, e.msg)
                continue
            raise SpinedetError(f"{path}:{number}: not a JSON line ({e.msg}); "
                                "delete the line to go on") from None  # fmt: skip
    return rows


def plot_curves(metrics_file: str | Path, out: str | Path) -> Path:
    """Training loss per step, validation loss and AP (or a classifier's accuracy) per epoch,
    side by side."""
    rows = read_metrics(metrics_file)
    steps = [r for r in rows if r.get("kind") == "train"]
    epochs = [r for r in rows if r.get("kind") == "val"]
    fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(11, 4))
    if steps:
        ax_loss.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="train")
    with_val = [r for r in epochs if "val_loss" in r]
    if with_val:
        ax_loss.plot([r["step"] for r in with_val], [r["val_loss"] for r in with_val], "o-",
                     label="validation")  # fmt: skip
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    if ax_loss.lines:  # none before the first logged step: matplotlib warns of an empty legend
        ax_loss.legend()
    keys = sorted({k for r in epochs for k in r if k.endswith(("/AP", "/AP50"))})
    accuracy = not keys  # a classifier's run
    if accuracy:
        keys = sorted({k for r in epochs for k in r if k.startswith("accuracy/")})
    for key in keys:
        points = [(r["epoch"], r[key]) for r in epochs if r.get(key) is not None]
        if points:
            ax_ap.plot(*zip(*points, strict=True), "o-", label=key)
    ax_ap.set(xlabel="epoch", ylabel="accuracy" if accuracy else "AP", ylim=(0, 1),
              title="accuracy (validation)" if accuracy else "COCO AP (validation)")  # fmt: skip
    if ax_ap.lines:
        ax_ap.legend()
    fig.tight_layout()
    out = Path(out)
    save_figure(fig, out)  # a kill or a full disk mid-write leaves the last curves whole
    return out


def save_figure(fig: Any, path: Path) -> None:
    """Save as PNG atomically and free the figure."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def plot_pr_curves(curves: list[dict[str, Any]], iou_type: str, out_dir: Path) -> list[Path]:
    """``pr_curve_{iou_type}.png`` (all classes) and ``..._per_class.png`` (a grid) from
    :func:`spinedet.engine.analysis.pr_curves`; returns the paths written."""
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for c in curves:
        if c["class"] == "all":
            ap = float(c["precision"].mean())
            ax.plot(c["recall"], c["precision"], label=f"IoU {c['iou']}: AP {ap:.3f}")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
           title=f"{iou_type}: precision-recall, all classes")  # fmt: skip
    if ax.lines:
        ax.legend(loc="lower left")
    paths = [out_dir / f"pr_curve_{iou_type}.png"]
    save_figure(fig, paths[0])
    per_class = [c for c in curves if c["class"] != "all"]
    if per_class:
        paths.append(out_dir / f"pr_curve_{iou_type}_per_class.png")
        save_figure(_pr_grid(per_class), paths[-1])
    return paths


def _pr_grid(curves: list[dict[str, Any]]) -> Any:
    """Small multiples drawn into one axes (cells offset in data coordinates): a grid of one
    axes per class took minutes for 178 classes."""
    classes = list(dict.fromkeys(c["class"] for c in curves))
    cols = min(8, len(classes))
    rows = -(-len(classes) // cols)
    fig, ax = plt.subplots(figsize=(1.7 * cols, 1.5 * rows + 0.6))
    colours = {}
    for c in curves:
        row, col = divmod(classes.index(c["class"]), cols)
        x0, y0 = col * 1.2, -row * 1.35
        colour = colours.setdefault(c["iou"], f"C{len(colours)}")
        ax.plot(x0 + c["recall"], y0 + c["precision"], color=colour, lw=1)
    for i, name in enumerate(classes):
        row, col = divmod(i, cols)
        x0, y0 = col * 1.2, -row * 1.35
        ax.add_patch(plt.Rectangle((x0, y0), 1, 1, fill=False, lw=0.5, color="0.6"))
        ax.text(x0, y0 + 1.04, name[:22], fontsize=7)
    ax.set_axis_off()
    ax.autoscale_view()
    handles = [plt.Line2D([], [], color=c, label=f"IoU {iou}") for iou, c in colours.items()]
    title = "precision (up) against recall (right), per class"
    fig.legend(handles=handles, loc="upper center", ncols=len(handles), fontsize=8,
               title=title, title_fontsize=8)  # fmt: skip
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 0.5 / fig.get_figheight())
    return fig


def plot_confusion(matrix: np.ndarray, labels: list[str], title: str, path: Path) -> None:
    """A confusion matrix: colours normalised per row (rare classes stay visible), counts
    written while they fit."""
    k = len(labels)
    side = min(4 + 0.3 * k, 24)
    fig, ax = plt.subplots(figsize=(side, side * 0.9))
    rows = matrix.sum(axis=1, keepdims=True)
    ax.imshow(matrix / np.maximum(rows, 1), cmap="Blues", vmin=0, vmax=1)
    ticks = range(k)
    fontsize = 8 if k <= 30 else 4
    ax.set_xticks(ticks, labels, rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, labels, fontsize=fontsize)
    ax.set(xlabel="predicted", ylabel="ground truth", title=title)
    if k <= 30:
        for (i, j), n in np.ndenumerate(matrix):
            if n:
                ax.text(j, i, str(n), ha="center", va="center", fontsize=7,
                        color="white" if n > rows[i, 0] / 2 else "black")  # fmt: skip
    fig.tight_layout()
    save_figure(fig, path)
