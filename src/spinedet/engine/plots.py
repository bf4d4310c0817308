"""Loss and AP curves from a run's ``metrics.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(metrics_file: str | Path, out: str | Path) -> Path:
    """Training loss per step, validation loss and AP per epoch, side by side."""
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
    ax_loss.legend()
    for key in sorted({k for r in epochs for k in r if k.endswith(("/AP", "/AP50"))}):
        points = [(r["epoch"], r[key]) for r in epochs if key in r]
        ax_ap.plot(*zip(*points, strict=True), "o-", label=key)
    ax_ap.set(xlabel="epoch", ylabel="AP", title="COCO AP (validation)", ylim=(0, 1))
    if ax_ap.lines:
        ax_ap.legend()
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
