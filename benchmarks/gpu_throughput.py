"""GPU throughput at 640 x 640: training images/s with AMP (bfloat16 by default) at each
training batch size, with the step's peak GPU memory, and inference images/s at batch 1 and
8, spinedet (eager and with CUDA graphs) vs torchvision's ResNet-50-FPN detectors. Prints a
skip line without CUDA."""

from __future__ import annotations

import copy
import gc
import sys
from pathlib import Path

import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn, retinanet_resnet50_fpn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import compare, detection_batch, machine, parse_args, table  # noqa: E402

from spinedet import create_model  # noqa: E402
from spinedet.cuda_graphs import use_cuda_graphs  # noqa: E402
from spinedet.optimize import optimize_for_inference  # noqa: E402

SIZE = 640
NUM_CLASSES = 91  # COCO's, as op_count.py
TV = {"weights": None, "weights_backbone": None, "min_size": SIZE, "max_size": SIZE}
PAIRS = {
    "spinenet49s_maskrcnn": ("maskrcnn_resnet50_fpn", maskrcnn_resnet50_fpn),
    "spinenet49s_retinanet": ("retinanet_resnet50_fpn", retinanet_resnet50_fpn),
    "spinenet49_retinanet": ("retinanet_resnet50_fpn", retinanet_resnet50_fpn),
}


def synced(fn):
    def run() -> None:
        fn()
        torch.cuda.synchronize()

    return run


def amp_train_step(model: torch.nn.Module, images: list, targets: list, dtype: torch.dtype):
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    def step() -> None:
        with torch.autocast("cuda", dtype=dtype):
            loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return synced(step)


def amp_inference(model: torch.nn.Module, images: list, dtype: torch.dtype):
    def run() -> None:
        with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
            model(images)

    return synced(run)


def graphed(model: torch.nn.Module, layout: torch.memory_format = torch.contiguous_format):
    """A copy of ``model`` in ``layout`` whose backbone and dense head replay CUDA graphs, as
    `spinedet train` runs it on one GPU."""
    model = copy.deepcopy(model).to(memory_format=layout)
    use_cuda_graphs(model)
    return model


def peak_mib(run) -> float:
    """Peak GPU memory reserved during one call, MiB: after ``empty_cache`` what stays reserved
    is what is in use, CUDA graphs' private pools included (``max_memory_allocated`` counts
    only the tensors alive in those pools)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    run()
    return torch.cuda.max_memory_reserved() / 2**20


def peak_alone(runs: dict, paths: dict, ref_name: str) -> dict:
    """Peak MiB of the reference and of the last path (the default), each other path freed
    first: its model's graphs would stay reserved."""
    for label in list(paths)[:-1]:
        runs.pop(label)
        paths.pop(label)
    gc.collect()  # a graphed part and its CudaGraphs refer to each other
    return {k: peak_mib(run) for k, run in runs.items()}


def main() -> int:
    args = parse_args(
        __doc__.splitlines()[0],
        repeats=20,
        train_batch={"type": int, "nargs": "+", "default": [8, 16], "help": "training batches"},
        dtype={"choices": ["bf16", "fp16"], "default": "bf16", "help": "autocast type"},
        models={"nargs": "+", "choices": list(PAIRS), "default": list(PAIRS), "help": "models"},
    )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    print(f"# GPU throughput (AMP {args.dtype}), 640 x 640\n")
    if not torch.cuda.is_available():
        print("skipped: no CUDA device (torch.cuda.is_available() is False).")
        return 0
    print(f"{torch.cuda.get_device_name()}; {machine()}\n")
    rows = []
    for name in args.models:
        ref_name, ref_builder = PAIRS[name]
        kinds = {"maskrcnn": {"box_score_thresh": 0.0}, "retinanet": {"score_thresh": 0.0}}
        thresh = next(v for k, v in kinds.items() if k in name)
        ours = create_model(name, num_classes=NUM_CLASSES, **thresh).cuda()
        ref = ref_builder(**TV, num_classes=NUM_CLASSES, **thresh).cuda()
        for size in args.train_batch:
            # Copies per batch size: each one's peak holds its own graph alone.
            paths = {
                name: ours,
                f"{name} + CUDA graphs": graphed(ours),
                f"{name} + CUDA graphs, channels_last": graphed(ours, torch.channels_last),
            }
            images, targets = detection_batch(SIZE, size, NUM_CLASSES)
            images = [i.cuda() for i in images]
            targets = [{k: v.cuda() for k, v in t.items()} for t in targets]
            steps = {ref_name: amp_train_step(ref, images, targets, dtype)}
            steps |= {k: amp_train_step(m, images, targets, dtype) for k, m in paths.items()}
            times = compare(steps, ref_name, args.repeats, args.warmup)
            labels = list(paths)
            memory = peak_alone(steps, paths, ref_name)  # graphs captured by now
            rows += [_row(label, ref_name, f"train, batch {size}", times, size, memory)
                     for label in labels]  # fmt: skip
            del paths, steps
            torch.cuda.empty_cache()
        # The public inference path (Predictor, spinedet eval/predict): optimize_for_inference,
        # which on CUDA pads to the square and replays CUDA graphs; and without the graphs.
        ours.eval()
        paths = {f"{name} optimised, no graphs": optimize_for_inference(ours, cuda_graphs=False),
                 f"{name} optimised": optimize_for_inference(ours)}  # fmt: skip
        ref_fast = ref.eval().to(memory_format=torch.channels_last)
        for n in (1, 8):
            inputs = (images * n)[:n]  # n images, whatever the training batch
            runs = {ref_name: amp_inference(ref_fast, inputs, dtype)}
            runs |= {label: amp_inference(m, inputs, dtype) for label, m in paths.items()}
            times = compare(runs, ref_name, args.repeats, args.warmup)
            labels = list(paths)
            memory = peak_alone(runs, paths, ref_name) if n == 8 else {}  # last: frees a path
            rows += [_row(label, ref_name, f"inference, batch {n}", times, n, memory)
                     for label in labels]  # fmt: skip
        del ours, ref, paths, ref_fast, runs
        torch.cuda.empty_cache()
    headers = ["model", "reference", "task", "images/s", "reference images/s", "speed-up",
               "peak MiB", "reference peak MiB"]  # fmt: skip
    print(table(headers, rows))
    print("\nspeed-up: median over interleaved rounds of reference time / model time; peak "
          "MiB: torch.cuda.max_memory_reserved over one call after empty_cache, CUDA graphs' "
          "pools included, of the default path (last of each group) and the reference alone "
          "(the eager model stays reserved in both; inference: at batch 8).")  # fmt: skip
    return 0


def _row(name: str, ref_name: str, task: str, times: dict, n: int, memory: dict) -> list:
    ours, ref = times[name], times[ref_name]
    return [
        name,
        ref_name,
        task,
        f"{n / ours.median_s:.1f}",
        f"{n / ref.median_s:.1f}",
        f"{1 / ours.ratio:.2f}",
        *(f"{memory[k]:,.0f}" if k in memory else "-" for k in (name, ref_name)),
    ]


if __name__ == "__main__":
    sys.exit(main())
