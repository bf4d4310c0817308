"""Regenerate tests/fixtures/tf: a small Model Garden RetinaNet-SpineNet-49S, its checkpoint
and its outputs, for tests/test_convert_tf.py (which then runs without TensorFlow).

Run in the TensorFlow environment: ``.venv-tf/bin/python scripts/make_tf_fixture.py``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

import spinedet  # noqa: F401  (torch before TensorFlow, see tf_reference)
from spinedet.convert import tf_reference as ref

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tf"
# A reduced SpineNet-49S (filter scale 0.125) keeps the checkpoint near 1 MB; a non-square
# input exercises the asymmetric "same" padding in both directions.
CONFIG = {
    "model": "spinenet49s_retinanet",
    "num_classes": 3,
    "size": [128, 256],
    "activation": "swish",
    "kwargs": {"filter_scale": 0.125, "endpoint_filters": 16, "head_depth": 2},
}


def main() -> None:
    kwargs = CONFIG["kwargs"]
    backbone = ref.build_spinenet(
        "49S",
        tuple(CONFIG["size"]),
        CONFIG["activation"],
        filter_size_scale=kwargs["filter_scale"],
        endpoints_num_filters=kwargs["endpoint_filters"],
    )
    model = ref.build_retinanet(
        backbone,
        CONFIG["num_classes"],
        kwargs["head_depth"],
        kwargs["endpoint_filters"],
        CONFIG["activation"],
    )
    ref.randomize(model, seed=0)
    images = np.random.default_rng(1).normal(size=(1, *CONFIG["size"], 3)).astype(np.float32)
    features = ref.run_backbone(backbone, images)
    scores, boxes = ref.run_head(model, features)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(ref.save(model, tmp))
        for f in Path(tmp).iterdir():
            shutil.copy(f, OUT / f.name)
    arrays = {"images": images}
    for level in features:
        arrays[f"p{level}"] = features[level]
        arrays[f"scores{level}"] = scores[level]
        arrays[f"boxes{level}"] = boxes[level]
    np.savez_compressed(OUT / "outputs.npz", **arrays)
    (OUT / "fixture.json").write_text(json.dumps({**CONFIG, "prefix": prefix.name}, indent=2))
    print(f"wrote {OUT}: {sorted(p.name for p in OUT.iterdir())}")


if __name__ == "__main__":
    main()
