"""Where inference time goes at 640 x 640 on CPU: per-stage times of spinedet (optimised) and
torchvision detectors, and the operators that dominate spinedet's 49S Mask R-CNN."""

from __future__ import annotations

import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, ms, parse_args, table  # noqa: E402
from detector_latency import SIZE, pairs  # noqa: E402

from spinedet.optimize import optimize_for_inference  # noqa: E402

STAGES = ("transform", "backbone", "anchor_generator", "head", "rpn", "roi_heads")


def stage_times(model: torch.nn.Module, image: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds per stage (module) of one forward; "post-processing and rest" is the
    remainder (RetinaNet's decoding and NMS, batching)."""
    spent: dict[str, list[float]] = defaultdict(list)
    starts: dict[str, float] = {}
    hooks = []
    for name in STAGES:
        module = getattr(model, name, None)
        if module is None:
            continue
        hooks.append(
            module.register_forward_pre_hook(
                lambda *_, n=name: starts.update({n: time.perf_counter()})
            )
        )
        hooks.append(
            module.register_forward_hook(
                lambda *_, n=name: spent[n].append(time.perf_counter() - starts[n])
            )
        )
    with torch.inference_mode():
        model([image])
        spent.clear()
        for _ in range(repeats):
            start = time.perf_counter()
            model([image])
            spent["total"].append(time.perf_counter() - start)
    for hook in hooks:
        hook.remove()
    result = {name: statistics.median(t) for name, t in spent.items()}
    result["post-processing and rest"] = result["total"] - sum(
        t for n, t in result.items() if n != "total"
    )
    return result


def top_operators(model: torch.nn.Module, image: torch.Tensor, limit: int = 12) -> str:
    with torch.inference_mode():
        model([image])
        with torch.profiler.profile() as prof:
            model([image])
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    rows = [
        [
            e.key,
            e.count,
            f"{e.self_cpu_time_total / 1000:.0f}",
            f"{100 * e.self_cpu_time_total / total:.1f}",
        ]
        for e in events[:limit]
    ]
    return table(["operator", "calls", "self ms", "% of total"], rows)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], repeats=3)
    print(f"# Inference profile, batch 1, {SIZE} x {SIZE}\n\n{machine()}\n")
    image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    rows, mask_rcnn = [], None
    for name, model, ref_name, ref in pairs()[:2]:
        fast = optimize_for_inference(model.eval())
        mask_rcnn = mask_rcnn or fast
        for label, m in ((f"{name} optimised", fast), (ref_name, ref.eval())):
            times = stage_times(m, image, args.repeats)
            rows += [[label, stage, ms(t)] for stage, t in times.items()]
    print(table(["model", "stage", "median ms"], rows))
    print("\n## Top operators, spinenet49s_maskrcnn optimised (eager)\n")
    print(top_operators(mask_rcnn, image))


if __name__ == "__main__":
    main()
