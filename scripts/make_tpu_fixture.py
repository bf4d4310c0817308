"""Regenerate the tensorflow/tpu fixtures of tests/test_convert_tpu.py (which then runs without
TensorFlow): TF1 checkpoints of a small SpineNet-49 classifier (tests/fixtures/tpu_classifier),
RetinaNet-SpineNet-49S (tests/fixtures/tpu_retinanet), Mask R-CNN-SpineNet-49S
(tests/fixtures/tpu_maskrcnn) and RetinaNet-SpineNet-Mobile-49 (tests/fixtures/tpu_mobile),
with their outputs.

Run in the TensorFlow environment with a tensorflow/tpu checkout:
``SPINEDET_TPU_DIR=.../tpu/models/official/detection .venv-tf/bin/python
scripts/make_tpu_fixture.py [NAME ...]`` (NAME: ``tpu_classifier``, ``tpu_retinanet``,
``tpu_maskrcnn``, ``tpu_mobile``; default all).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import tpu_reference as ref  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
# Reduced backbones (filter scale 0.125) keep each checkpoint small. 224 x 224 takes the
# classifier through every tensorflow/tpu resampling case (pools of 3 and 5, resizing);
# the RetinaNet runs on a non-square input.
SCALING = {"filter_size_scale": 0.125, "endpoints_num_filters": 16}
CONFIGS = {
    "tpu_classifier": {
        "model": "spinenet49_classifier",
        "model_id": "49",
        "size": [224, 224],
        "activation": "relu",
        "bn_eps": 1e-5,
        "num_classes": 5,
    },
    "tpu_retinanet": {
        "model": "spinenet49s_retinanet",
        "model_id": "49S",
        "size": [128, 256],
        "activation": "swish",
        "bn_eps": 1e-4,
        "retinanet": {"num_classes": 3, "num_convs": 2, "num_filters": 16, "anchor_size": 3.0},
    },
    "tpu_maskrcnn": {
        "model": "spinenet49s_maskrcnn",
        "model_id": "49S",
        "size": [128, 256],
        "activation": "relu",
        "bn_eps": 1e-3,
        # RoIs (y1, x1, y2, x2) from smaller than a P3 cell to most of the image.
        "maskrcnn": {
            "num_classes": 3,
            "num_filters": 16,
            "fc_dims": 32,
            "anchor_size": 3.0,
            "rois": [[5, 7, 8.5, 12], [10, 20, 60, 90], [0, 0, 128, 256], [64, 100, 120, 250]],
            "roi_classes": [1, 2, 0, 2],
        },
    },
    # The zoo's SpineNetMB-49 RetinaNet (separable head convs), a fifth as wide: < 1 MB.
    "tpu_mobile": {
        "model": "spinenet_mobile49_retinanet",
        "model_id": "49",
        "backbone": "spinenet_mbconv",
        "scaling": {"filter_size_scale": 0.2, "endpoints_num_filters": 16},
        "size": [128, 128],
        "activation": "swish",
        "bn_eps": 1e-4,
        "retinanet": {
            "num_classes": 3,
            "num_convs": 2,
            "num_filters": 16,
            "anchor_size": 3.0,
            "separable": True,
        },
    },
}


def build(config: dict) -> ref.TpuModel:
    return ref.TpuModel(
        tuple(config["size"]),
        config["activation"],
        config["model_id"],
        config.get("scaling", SCALING),
        num_classes=config.get("num_classes"),
        retinanet=config.get("retinanet"),
        maskrcnn=config.get("maskrcnn"),
        bn_eps=config["bn_eps"],
        backbone=config.get("backbone", "spinenet"),
    )


def main(names: list[str]) -> None:
    for name in names or list(CONFIGS):
        config = CONFIGS[name]
        model = build(config)
        model.randomize(seed=1)
        images = np.random.default_rng(0).normal(size=(1, *config["size"], 3)).astype(np.float32)
        if name != "tpu_classifier":
            model.calibrate(images)  # detections worth comparing end to end
        outputs = model.run(images)
        out = FIXTURES / name
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        with tempfile.TemporaryDirectory() as tmp:
            prefix = Path(model.save(tmp))
            for f in Path(tmp).iterdir():
                if f.name.startswith(prefix.name + "."):
                    shutil.copy(f, out / f.name)
        (out / "params.yaml").write_text(
            "batch_norm_activation:\n"
            f"  activation: '{config['activation']}'\n"
            f"  batch_norm_epsilon: {config['bn_eps']}\n"
        )
        np.savez_compressed(out / "outputs.npz", images=images, **outputs)
        scaling = config.get("scaling", SCALING)
        (out / "fixture.json").write_text(json.dumps({**config, "scaling": scaling}, indent=1))
        print(f"{name}: {sorted(p.name for p in out.iterdir())}")


if __name__ == "__main__":
    main(sys.argv[1:])
