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

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder, encode_boxes

__all__ = ["DeviceBoxCoder", "cached_constant", "device_tensor"]


def device_tensor(
    values: Sequence, device: torch.device, dtype: torch.dtype | None = None
) -> Tensor:
    """``torch.tensor(values, dtype=dtype, device=device)`` without waiting for the device: the
    copy is queued (CUDA stages pageable memory before the call returns)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


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
