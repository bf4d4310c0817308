"""Regenerate the Model Garden fixtures of tests/test_convert_tf.py (which then runs without
TensorFlow): a small RetinaNet-SpineNet-49S (tests/fixtures/tf) and a small Mask R-CNN
(tests/fixtures/tf_maskrcnn), each with its checkpoint and its outputs.

Run in the TensorFlow environment: ``.venv-tf/bin/python scripts/make_tf_fixture.py [NAME ...]``
(NAME: ``tf``, ``tf_maskrcnn``; default both).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

import spinedet  # noqa: F401  (torch before TensorFlow, see tf_reference)

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))
import tf_reference as ref  # noqa: E402  (tests/tf_reference.py)

FIXTURES = TESTS / "fixtures"
# Reduced SpineNet-49S backbones (filter scale 0.125) keep each checkpoint near 2 MB; a
# non-square input exercises the asymmetric "same" padding in both directions.
BACKBONE = {"filter_scale": 0.125, "endpoint_filters": 16}
CONFIGS = {
    "tf": {
        "model": "spinenet49s_retinanet",
        "num_classes": 3,
        "size": [128, 256],
        "activation": "swish",
        "kwargs": {**BACKBONE, "head_depth": 2},
    },
    "tf_maskrcnn": {
        "model": "spinenet49s_maskrcnn",
        "num_classes": 3,
        "size": [128, 256],
        "activation": "swish",
        "kwargs": {**BACKBONE, "fc_dim": 32},
        # RoIs (y1, x1, y2, x2) from smaller than a P3 cell to most of the image.
        "rois": [[5, 7, 8.5, 12], [10, 20, 60, 90], [0, 0, 128, 256], [64, 100, 120, 250]],
        "roi_classes": [1, 2, 0, 2],
    },
}


def build(config: dict):
    kwargs = config["kwargs"]
    backbone = ref.build_spinenet(
        "49S",
        tuple(config["size"]),
        config["activation"],
        filter_size_scale=kwargs["filter_scale"],
        endpoints_num_filters=kwargs["endpoint_filters"],
    )
    filters = kwargs["endpoint_filters"]
    if config["model"].endswith("retinanet"):
        model = ref.build_retinanet(
            backbone, config["num_classes"], kwargs["head_depth"], filters, config["activation"]
        )
    else:
        model = ref.build_maskrcnn(
            backbone, config["num_classes"], filters, kwargs["fc_dim"], config["activation"]
        )
    return backbone, model


def outputs(config: dict, backbone, model, images: np.ndarray) -> dict[str, np.ndarray]:
    features = ref.run_backbone(backbone, images)
    arrays = {"images": images} | {f"p{level}": value for level, value in features.items()}
    if config["model"].endswith("retinanet"):
        scores, boxes = ref.run_head(model, features)
        for level in features:
            arrays[f"scores{level}"] = scores[level]
            arrays[f"boxes{level}"] = boxes[level]
    else:
        arrays |= ref.run_rcnn_heads(model, features, config["rois"], config["roi_classes"])
    return arrays


def make(name: str) -> None:
    config, out = CONFIGS[name], FIXTURES / name
    backbone, model = build(config)
    ref.randomize(model, seed=0)
    images = np.random.default_rng(1).normal(size=(1, *config["size"], 3)).astype(np.float32)
    arrays = outputs(config, backbone, model, images)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(ref.save(model, tmp))
        for f in Path(tmp).iterdir():
            shutil.copy(f, out / f.name)
    np.savez_compressed(out / "outputs.npz", **arrays)
    (out / "fixture.json").write_text(json.dumps({**config, "prefix": prefix.name}, indent=2))
    print(f"wrote {out}: {sorted(p.name for p in out.iterdir())}")


if __name__ == "__main__":
    for fixture in sys.argv[1:] or list(CONFIGS):
        make(fixture)
