"""Where a GPU training step goes (torch.profiler, one bf16 step at 640 x 640): step time, GPU
busy time, CUDA kernels launched, and the top kernels, spinedet vs torchvision's R50-FPN
counterpart. A launch-bound step shows many kernels and a GPU busy a small share of it; the
host's waits for the GPU are counted by call site (``host_data.gpu_waits``). Prints a skip
line without CUDA."""

from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import detection_batch, machine, parse_args, table  # noqa: E402
from gpu_throughput import (  # noqa: E402
    NUM_CLASSES,
    PAIRS,
    SIZE,
    TV,
    amp_inference,
    amp_train_step,
    graphed,
)

from spinedet import create_model  # noqa: E402
from spinedet.models.host_data import gpu_waits  # noqa: E402
from spinedet.optimize import optimize_for_inference  # noqa: E402


def profile_step(step, steps: int = 3) -> tuple[float, float, int, list, list]:
    """(ms per step, GPU busy ms per step, kernels per step, top kernels, top host ops by self
    CPU time) over ``steps``."""
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
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
    host = [(e.key, e.count // steps, e.self_cpu_time_total / 1e3 / steps) for e in ops]
    return wall * 1e3, busy, len(kernels) // steps, top, host


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
    rows, tops, hosts, waits = [], {}, {}, {}

    runs = []  # (label, builder, layout and CUDA graphs or None), graphs captured in warm-up
    for name in ("spinenet49s_retinanet", "spinenet49s_maskrcnn"):
        ref_name, ref_builder = PAIRS[name]
        ours = partial(create_model, name, num_classes=NUM_CLASSES)
        runs += [  # the eager rows: RESULTS.md's earlier profiles
            (f"{name} + CUDA graphs, channels_last", ours, torch.channels_last),
            (ref_name, partial(ref_builder, **TV, num_classes=NUM_CLASSES), None),
        ]
    for label, build, layout in runs:
        model = build().cuda()
        if layout is not None:
            model = graphed(model, layout)
        step = amp_train_step(model, images, targets, torch.bfloat16)
        wall, busy, count, top, host = profile_step(step)
        rows.append([label, f"{wall:.1f}", f"{busy:.1f}", f"{busy / wall:.0%}", f"{count:,}"])
        print(" | ".join(rows[-1]), flush=True)  # what a time limit leaves
        tops[label] = top
        hosts[label] = host
        waits[label] = gpu_waits(step)
        del step, model
        torch.cuda.empty_cache()
    print(table(["model", "ms/step", "GPU busy ms", "busy share", "CUDA kernels"], rows))
    inference = []  # the public inference path at batch 8, score threshold 0 as gpu_throughput
    for name in ("spinenet49s_retinanet", "spinenet49s_maskrcnn"):
        thresh = {"box_score_thresh": 0.0} if "maskrcnn" in name else {"score_thresh": 0.0}
        ours = create_model(name, num_classes=NUM_CLASSES, **thresh).cuda().eval()
        label = f"{name} optimised"
        run = amp_inference(optimize_for_inference(ours), images, torch.bfloat16)
        wall, busy, count, top, host = profile_step(run)
        inference.append([label, f"{wall:.1f}", f"{busy:.1f}", f"{busy / wall:.0%}", f"{count:,}"])
        print(" | ".join(inference[-1]), flush=True)
        hosts[f"{label}, inference"] = host
        waits[f"{label}, inference"] = gpu_waits(run)
        del ours, run
        torch.cuda.empty_cache()
    print(f"\n## Inference, batch {args.batch} (optimize_for_inference)\n")
    print(table(["model", "ms/batch", "GPU busy ms", "busy share", "CUDA kernels"], inference))
    for label, top in tops.items():
        print(f"\n## Top kernels, {label}\n")
        print(table(["kernel", "ms/step"], [[n[:90], f"{t:.2f}"] for n, t in top]))
    for label, host in hosts.items():  # what the host still does between graph replays
        if "CUDA graphs" in label or "optimised" in label:
            print(f"\n## Top host ops (self CPU time), {label}\n")
            rows = [[n[:60], c, f"{t:.2f}"] for n, c, t in host]
            print(table(["op", "calls/step", "ms/step"], rows))
    print("\n## Host waits for the GPU per step, by call site (torch.cuda sync debug mode)\n")
    print(table(["run", "waits"], [[label, sum(w.values())] for label, w in waits.items()]))
    for label, sites in waits.items():
        if "CUDA graphs" in label or "optimised" in label:
            print(f"\n### Where {label} waits\n")
            print(table(["call site", "waits/step"], [[s, n] for s, n in sites.most_common(12)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
