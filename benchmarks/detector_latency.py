"""Detector inference latency at 640 x 640 on CPU: spinedet vs torchvision's ResNet-50-FPN.

Both sides keep every candidate box (score threshold 0, 100 detections per image), so post-
processing is the same work; torchvision's models get the same 640 x 640 input. spinedet is
timed plain (eager, as built), optimised (``optimize_for_inference``: BN folded,
channels-last, oneDNN convolutions; bfloat16 on CPUs with AMX, where float32 is timed too) and,
with ``--compile``, also compiled; each variant is first checked against the plain model.
torchvision's model is also timed optimised.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torchvision.models.detection import maskrcnn_resnet50_fpn, retinanet_resnet50_fpn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import compare, inference, machine, max_rel_diff, ms, parse_args, table  # noqa: E402

from spinedet import create_model  # noqa: E402
from spinedet.export import DenseOutputs  # noqa: E402
from spinedet.optimize import amx_available, optimize_for_inference  # noqa: E402

SIZE = 640
TV = {"weights": None, "weights_backbone": None, "min_size": SIZE, "max_size": SIZE}


def pairs() -> list[tuple[str, torch.nn.Module, str, torch.nn.Module]]:
    retina_tv = retinanet_resnet50_fpn(**TV, score_thresh=0.0, detections_per_img=100)
    mask_tv = maskrcnn_resnet50_fpn(**TV, box_score_thresh=0.0, box_detections_per_img=100)
    return [
        (
            "spinenet49s_maskrcnn",
            create_model("spinenet49s_maskrcnn", box_score_thresh=0.0, box_detections_per_img=100),
            "maskrcnn_resnet50_fpn",
            mask_tv,
        ),
        (
            "spinenet49s_retinanet",
            create_model("spinenet49s_retinanet", score_thresh=0.0, detections_per_img=100),
            "retinanet_resnet50_fpn",
            retina_tv,
        ),
        (
            "spinenet49_retinanet",
            create_model("spinenet49_retinanet", score_thresh=0.0, detections_per_img=100),
            "retinanet_resnet50_fpn",
            retina_tv,
        ),
    ]


def tv_dense(model: torch.nn.Module, images: torch.Tensor):
    """torchvision RetinaNet's backbone + head on already-normalised images."""
    return lambda: model.head(list(model.backbone(images).values()))


def main() -> None:
    args = parse_args(
        __doc__.splitlines()[0],
        repeats=5,
        compile={"action": "store_true", "help": "also time torch.compile'd models"},
    )
    print(f"# Detector inference, batch 1, {SIZE} x {SIZE}\n\n{machine()}\n")
    image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    rows = []
    for name, model, ref_name, ref in pairs():
        model.eval(), ref.eval()
        variants = {"optimised": optimize_for_inference(model)}
        if amx_available():  # "optimised" is bfloat16 there
            variants["optimised, float32"] = optimize_for_inference(model, bf16=False)
        if args.compile:
            variants["optimised+compiled"] = optimize_for_inference(model, compile=True)
        with torch.inference_mode():
            plain_raw = DenseOutputs(model, SIZE)(image[None])
            for label, fast in variants.items():
                diff = max_rel_diff(plain_raw, DenseOutputs(fast, SIZE)(image[None]))
                print(f"{name} {label}: max relative diff of raw outputs {diff:.1e}")
        candidates = {ref_name: inference(lambda r=ref: r([image]))}
        # The same inference optimisations applied to torchvision's model, for a fair view.
        ref_fast = optimize_for_inference(ref)
        candidates[f"{ref_name} optimised"] = inference(lambda r=ref_fast: r([image]))
        candidates[name] = inference(lambda m=model: m([image]))
        for label, fast in variants.items():
            candidates[f"{name} {label}"] = inference(lambda m=fast: m([image]))
        times = compare(candidates, ref_name, args.repeats, args.warmup)
        if "retinanet" in name:
            # The dense part alone (backbone + head), without pre- and post-processing.
            dense = DenseOutputs(variants["optimised"], SIZE)
            normalised = (image[None] - dense.mean) / dense.std
            dense_ref = f"{ref_name} dense part"
            parts = {
                dense_ref: inference(tv_dense(ref, normalised)),
                f"{name} optimised dense part": inference(lambda d=dense: d(image[None])),
            }
            times |= compare(parts, dense_ref, args.repeats, args.warmup)
        for label, t in times.items():
            rows.append([label, ms(t.median_s), ms(t.min_s), f"{t.ratio:.2f}"])
        rows.append(["", "", "", ""])
    print()
    print(table(["model", "median ms", "min ms", "ratio vs torchvision"], rows[:-1]))
    print(
        "\nratio: median over interleaved rounds of model time / torchvision time in that round"
        " (dense part rows: vs torchvision's dense part)."
    )


if __name__ == "__main__":
    main()
