"""Numbers the host holds (lengths, offsets, image sizes, box-coder weights) reaching the device
without a wait.

``torch.tensor(values, device="cuda")`` copies through pageable memory and then waits for the
GPU to finish everything queued before it: in the middle of a training step that stalls the
host until the device catches up, and the step runs host and device in turn instead of side by
side. torchvision's box coder does that on every call (its weights, and the 0.5 of
``decode_single``), its transform twice per image (mean and std). Here the small tables are
copied without the wait, and the constants are made once per device and dtype.
"""

from __future__ import annotations

import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torchvision
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder, encode_boxes

__all__ = ["DeviceBoxCoder", "cached_constant", "device_tensor", "gpu_waits"]


def device_tensor(
    values: Sequence, device: torch.device, dtype: torch.dtype | None = None
) -> Tensor:
    """``torch.tensor(values, dtype=dtype, device=device)`` without waiting for the device: the
    copy is queued (CUDA stages pageable memory before the call returns)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


# Where a wait is counted: the innermost frame in these packages' files.
_ROOTS = (Path(__file__).resolve().parents[1], Path(torchvision.__file__).resolve().parent)


def _site(frame: traceback.FrameSummary) -> str | None:
    path = Path(frame.filename).resolve()
    root = next((r for r in _ROOTS if path.is_relative_to(r)), None)
    return root and f"{path.relative_to(root.parent)}:{frame.lineno} {frame.name}"


def gpu_waits(fn: Callable[[], object]) -> Counter[str]:
    """Where ``fn()`` makes the host wait for the GPU, with how many waits each: torch's sync
    debug mode warns at every wait it makes (a value read back, a copy that synchronises),
    counted here by the innermost spinedet or torchvision frame under ``fn`` (``path:line
    function``), else the innermost frame. Needs CUDA."""
    sites: Counter[str] = Counter()
    show = warnings.showwarning

    def note(message: Warning | str, *args: object, **kwargs: object) -> None:
        if "synchronizing" not in str(message):
            show(message, *args, **kwargs)
            return
        stack = traceback.extract_stack()
        stack = stack[max(i for i, f in enumerate(stack) if f.name == "gpu_waits") + 1 :]
        while stack[-1].filename in (__file__, warnings.__file__):  # this hook, its caller
            stack.pop()
        inner = stack[-1]
        ours = (_site(f) for f in reversed(stack))
        sites[next(filter(None, ours), f"{inner.filename}:{inner.lineno} {inner.name}")] += 1

    mode = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = note
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(mode)
    return sites


def cached_constant(owner: object, name: str, values: Sequence[float], like: Tensor) -> Tensor:
    """``values`` as a tensor of ``like``'s dtype and device, made once per dtype and device and
    kept on ``owner`` (modules whose class was swapped in have no ``__init__`` of ours)."""
    cache = owner.__dict__.setdefault("_device_constants", {})
    key = (name, like.dtype, like.device)
    if key not in cache:
        cache[key] = device_tensor(values, like.device, like.dtype)
    return cache[key]


class DeviceBoxCoder(BoxCoder):
    """torchvision's ``BoxCoder`` (the same arithmetic, element by element) whose weights reach
    the device once, not on every call."""

    def encode_single(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        weights = cached_constant(self, "weights", self.weights, reference_boxes)
        return encode_boxes(reference_boxes, proposals, weights)

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        boxes = boxes.to(rel_codes.dtype)
        size = (boxes[:, 2:] - boxes[:, :2])[:, None]  # (N, 1, 2): width, height
        centre = boxes[:, None, :2] + 0.5 * size
        n, classes = rel_codes.shape[0], rel_codes.shape[1] // 4
        codes = rel_codes.reshape(n, classes, 4) / cached_constant(
            self, "weights", self.weights, rel_codes
        )
        shift = codes[..., :2] * size + centre
        half = 0.5 * (codes[..., 2:].clamp(max=self.bbox_xform_clip).exp() * size)
        return torch.cat([shift - half, shift + half], dim=-1).flatten(1)
