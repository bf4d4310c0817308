"""Training step time and peak memory on CPU: spinedet Mask R-CNN vs torchvision's
ResNet-50-FPN Mask R-CNN, at the demo's settings (the quickstart config) and at 640.

Times come from interleaved steps in one process. Memory comes from a fresh subprocess per
model that builds it and runs two steps: the peak resident set size during the steps (Linux
``VmHWM``, reset after building), and that peak minus the resident size before the steps.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import torch
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    compare,
    detection_batch,
    machine,
    ms,
    parse_args,
    table,
)

from spinedet import create_model  # noqa: E402
from spinedet.config import load_config  # noqa: E402
from spinedet.engine.distributed import flush_denormals  # noqa: E402

NUM_CLASSES = 4  # the demo's three shapes + background
REFERENCE = "maskrcnn_resnet50_fpn"


def settings() -> list[dict]:
    """(label, spinedet model, size, batch, detector options): the demo's, then 640."""
    cfg = load_config("quickstart")
    demo = {
        "name": cfg["model"]["name"],
        "size": cfg["model"]["image_size"],
        "batch": cfg["train"]["batch_size"],
        "options": cfg["model"].get("options", {}),
    }
    large = {**demo, "size": 640, "batch": 2, "options": {}}
    return [{"label": "demo", **demo}, {"label": "640", **large}]


def torchvision_options(options: dict) -> dict:
    """The options torchvision's Mask R-CNN takes (the demo's may also set SpineNet ones)."""
    accepted = inspect.signature(MaskRCNN.__init__).parameters
    return {k: v for k, v in options.items() if k in accepted}


def build(model: str, setting: dict) -> torch.nn.Module:
    size, options = setting["size"], setting["options"]
    if model == REFERENCE:
        return maskrcnn_resnet50_fpn(
            weights=None,
            weights_backbone=None,
            num_classes=NUM_CLASSES,
            min_size=size,
            max_size=size,
            **torchvision_options(options),
        )
    return create_model(model, num_classes=NUM_CLASSES, image_size=size, **options)


def train_step(model: torch.nn.Module, images: list, targets: list):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()

    def step() -> None:
        loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def peak_memory_mb(model: str, setting: dict, threads: int) -> tuple[float, float]:
    """(peak RSS, peak RSS growth during the steps) of a subprocess training ``model``."""
    worker = [sys.executable, __file__, "--worker", json.dumps([model, setting, threads])]
    out = subprocess.run(worker, capture_output=True, text=True, check=True).stdout
    return tuple(json.loads(out.strip().splitlines()[-1]))


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def worker(spec: str) -> None:
    model_name, setting, threads = json.loads(spec)
    torch.set_num_threads(threads)
    flush_denormals()
    model = build(model_name, setting)
    step = train_step(model, *detection_batch(setting["size"], setting["batch"], NUM_CLASSES))
    # getrusage's ru_maxrss would start at the forking parent's size (Linux keeps the pre-exec
    # high-water mark), so read VmHWM, reset after building so that only the steps count.
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_mib("VmRSS")
    for _ in range(2):
        step()
    peak = _status_mib("VmHWM")
    print(json.dumps([peak, peak - before]))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        return worker(sys.argv[2])
    args = parse_args(__doc__.splitlines()[0], repeats=3)
    args.warmup = max(args.warmup, 1)
    print(f"# Training step (forward, backward, SGD update) on CPU\n\n{machine()}\n")
    rows = []
    for s in settings():
        images, targets = detection_batch(s["size"], s["batch"], NUM_CLASSES)
        names = [REFERENCE, s["name"]]
        steps = {n: train_step(build(n, s), images, targets) for n in names}
        times = compare(steps, REFERENCE, args.repeats, args.warmup)
        memory = {n: peak_memory_mb(n, s, args.threads) for n in names}
        for n in names:
            peak, growth = memory[n]
            ref_growth = memory[REFERENCE][1]
            rows.append(
                [
                    f"{s['label']} ({s['size']} px, batch {s['batch']})",
                    n,
                    ms(times[n].median_s),
                    f"{times[n].ratio:.2f}",
                    f"{peak:.0f}",
                    f"{growth:.0f}",
                    f"{growth / ref_growth:.2f}",
                ]
            )
    headers = [
        "setting",
        "model",
        "median ms/step",
        "time ratio",
        "peak RSS in steps MiB",
        "step memory MiB",
        "memory ratio",
    ]
    print(table(headers, rows))
    demo = settings()[0]["options"]
    print(
        f"\nDemo options: {demo or 'none'} (torchvision's model takes"
        f" {sorted(torchvision_options(demo)) or 'none'}). Ratios are against {REFERENCE}"
        " (time: median over interleaved steps; memory: step memory, the steps' peak RSS over"
        " the RSS before them)."
    )


if __name__ == "__main__":
    main()
