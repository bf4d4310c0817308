"""Shared fixtures: a tiny shapes data set and the options of a tiny, fast detector."""

import socket
from pathlib import Path

import pytest
import torch

from spinedet.config import load_config
from spinedet.data import make_shapes

# A SpineNet-49S Mask R-CNN cut down so a training step takes well under a second on a CPU.
TINY_MODEL = {
    "filter_scale": 0.25,
    "endpoint_filters": 32,
    "fc_dim": 64,
    "box_batch_size_per_image": 32,
    "rpn_pre_nms_top_n_train": 200,
    "rpn_post_nms_top_n_train": 100,
    "rpn_pre_nms_top_n_test": 100,
    "rpn_post_nms_top_n_test": 50,
}


def same_detections(a: dict, b: dict, tol: float = 1e-4) -> bool:
    """The same boxes, labels and scores, in any order among (near-)equal scores."""
    if len(a["boxes"]) != len(b["boxes"]):
        return False
    if not len(a["boxes"]):
        return True
    scores_a, scores_b = a["scores"].sort().values, b["scores"].sort().values
    if not torch.allclose(scores_a, scores_b, rtol=tol, atol=tol):
        return False
    distance = (b["boxes"][:, None] - a["boxes"]).abs().amax(-1)
    distance += 1e9 * (b["labels"][:, None] != a["labels"])
    return bool((distance.min(dim=1).values <= tol * a["boxes"].abs().max()).all())


@pytest.fixture(
    params=[
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                      reason="no CUDA device")),
    ]
)  # fmt: skip
def device(request) -> torch.device:
    """Each device a fast path runs on: the CPU, and CUDA where present."""
    return torch.device(request.param)


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> dict[str, Path]:
    """12 images of 64 x 64 px, split 8 / 4 (train / val)."""
    out = tmp_path_factory.mktemp("shapes")
    return make_shapes(out, num_images=12, size=64, seed=1, splits=(0.67, 0.33))


def tiny_config(shapes: dict[str, Path], **train) -> dict:
    """A config training the tiny model on the shapes fixture, with ``train`` overrides."""
    overrides = [
        "model.name=spinenet49s_maskrcnn",
        "model.image_size=64",
        f"model.options={TINY_MODEL}",
        f"data.train={{annotations: {shapes['train']}, images: {shapes['images']}}}",
        "data.workers=0",
        "train.epochs=2",
        "train.batch_size=2",
        "train.base_lr=0.02",
        "train.base_batch=2",
        "train.warmup_steps=2",
        "train.log_every=1",
        *(f"train.{k}={v}" for k, v in train.items()),
    ]
    return load_config(None, overrides)


def free_port() -> int:
    """A free TCP port on this machine, for a gloo process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
