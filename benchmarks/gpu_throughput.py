"""GPU throughput at 640 x 640: training images/s with AMP, and inference images/s at batch 1
and 8, spinedet vs torchvision's ResNet-50-FPN detectors. Prints a skip line without CUDA."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn, retinanet_resnet50_fpn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import compare, machine, parse_args, table  # noqa: E402
from train_step import NUM_CLASSES, batch  # noqa: E402

from spinedet import create_model  # noqa: E402
from spinedet.optimize import optimize_for_inference  # noqa: E402

SIZE = 640
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


def amp_train_step(model: torch.nn.Module, images: list, targets: list):
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda")

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.float16):
            loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return synced(step)


def amp_inference(model: torch.nn.Module, images: list):
    def run() -> None:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
            model(images)

    return synced(run)


def main() -> int:
    args = parse_args(
        __doc__.splitlines()[0],
        repeats=20,
        train_batch={"type": int, "default": 8, "help": "training batch size"},
    )
    print("# GPU throughput (AMP float16), 640 x 640\n")
    if not torch.cuda.is_available():
        print("skipped: no CUDA device (torch.cuda.is_available() is False).")
        return 0
    print(f"{torch.cuda.get_device_name()}; {machine()}\n")
    rows = []
    for name, (ref_name, ref_builder) in PAIRS.items():
        kinds = {"maskrcnn": {"box_score_thresh": 0.0}, "retinanet": {"score_thresh": 0.0}}
        thresh = next(v for k, v in kinds.items() if k in name)
        ours = create_model(name, num_classes=NUM_CLASSES, **thresh).cuda()
        ref = ref_builder(**TV, num_classes=NUM_CLASSES, **thresh).cuda()
        images, targets = batch(SIZE, args.train_batch)
        images = [i.cuda() for i in images]
        targets = [{k: v.cuda() for k, v in t.items()} for t in targets]
        steps = {ref_name: amp_train_step(ref, images, targets)}
        steps[name] = amp_train_step(ours, images, targets)
        times = compare(steps, ref_name, args.repeats, args.warmup)
        rows.append(_row(name, ref_name, f"train, batch {args.train_batch}", times, len(images)))
        fast = optimize_for_inference(ours.eval())
        ref_fast = ref.eval().to(memory_format=torch.channels_last)
        for n in (1, 8):
            inputs = (images * n)[:n]  # n images, whatever the training batch
            runs = {ref_name: amp_inference(ref_fast, inputs), name: amp_inference(fast, inputs)}
            times = compare(runs, ref_name, args.repeats, args.warmup)
            rows.append(_row(name, ref_name, f"inference, batch {n}", times, n))
    headers = ["model", "reference", "task", "images/s", "reference images/s", "speed-up"]
    print(table(headers, rows))
    print("\nspeed-up: median over interleaved rounds of reference time / model time.")
    return 0


def _row(name: str, ref_name: str, task: str, times: dict, n: int) -> list:
    ours, ref = times[name], times[ref_name]
    return [
        name,
        ref_name,
        task,
        f"{n / ours.median_s:.1f}",
        f"{n / ref.median_s:.1f}",
        f"{1 / ours.ratio:.2f}",
    ]


if __name__ == "__main__":
    sys.exit(main())
