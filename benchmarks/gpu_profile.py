"""Where a GPU training step goes (torch.profiler, one bf16 step at 640 x 640): step time, GPU
busy time, CUDA kernels launched, and the top kernels, spinedet vs torchvision's R50-FPN
counterpart. A launch-bound step shows many kernels and a GPU busy a small share of it.
Prints a skip line without CUDA."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import detection_batch, machine, parse_args, table  # noqa: E402
from gpu_throughput import NUM_CLASSES, PAIRS, SIZE, TV, amp_train_step  # noqa: E402

from spinedet import create_model  # noqa: E402


def profile_step(step, steps: int = 3) -> tuple[float, float, int, list]:
    """(ms per step, GPU busy ms per step, kernels per step, top kernels) over ``steps``."""
    for _ in range(2):  # warm-up: cuDNN autotuning, allocator growth
        step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - start) / steps
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.device_time for e in kernels) / 1e3 / steps
    by_name: dict[str, float] = {}
    for e in kernels:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.device_time / 1e3 / steps
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:8]
    return wall * 1e3, busy, len(kernels) // steps, top


def main() -> int:
    args = parse_args(__doc__.splitlines()[0], batch={"type": int, "default": 8})
    print(f"# GPU training step profile (bf16, batch {args.batch}, {SIZE} x {SIZE})\n")
    if not torch.cuda.is_available():
        print("skipped: no CUDA device (torch.cuda.is_available() is False).")
        return 0
    print(f"{torch.cuda.get_device_name()}; {machine()}\n")
    images, targets = detection_batch(SIZE, args.batch, NUM_CLASSES)
    images = [i.cuda() for i in images]
    targets = [{k: v.cuda() for k, v in t.items()} for t in targets]
    rows, tops = [], {}
    for name in ("spinenet49s_retinanet", "spinenet49s_maskrcnn"):
        ref_name, ref_builder = PAIRS[name]
        for label, model in (
            (name, create_model(name, num_classes=NUM_CLASSES)),
            (ref_name, ref_builder(**TV, num_classes=NUM_CLASSES)),
        ):
            step = amp_train_step(model.cuda(), images, targets, torch.bfloat16)
            wall, busy, count, top = profile_step(step)
            rows.append([label, f"{wall:.1f}", f"{busy:.1f}", f"{busy / wall:.0%}", f"{count:,}"])
            tops[label] = top
            del model, step
            torch.cuda.empty_cache()
    print(table(["model", "ms/step", "GPU busy ms", "busy share", "CUDA kernels"], rows))
    for label, top in tops.items():
        print(f"\n## Top kernels, {label}\n")
        print(table(["kernel", "ms/step"], [[n[:90], f"{t:.2f}"] for n, t in top]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
