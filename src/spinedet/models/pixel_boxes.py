"""tensorflow/tpu's box convention, for detectors converted from its model zoo.

tensorflow/tpu (``models/official/detection/utils/box_utils.py``) treats a box's corners as
pixel indices: a box from ``x1`` to ``x2`` is ``x2 - x1 + 1`` wide, box coding measures
anchors and proposals that way, a decoded box ends at ``start + width - 1``, and boxes are
clipped to the last pixel, ``size - 1``. torchvision and Model Garden take corners as
continuous coordinates (``x2 - x1`` wide, clipped to ``size``). A zoo checkpoint's detections
(and its published AP) are those of its own decoding: decoded the torchvision way, every box
would be about a pixel off (4% of a P3 anchor of 24 pixels).
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform

__all__ = ["BOX_CONVENTIONS", "PixelBoxCoder", "PixelBoxTransform", "use_pixel_boxes"]

# ``box_convention`` values of the detector builders.
BOX_CONVENTIONS = ("torchvision", "tpu")


def _extent(boxes: Tensor) -> Tensor:
    """Pixel-index corners -> continuous ones: the box ends after its last pixel."""
    return boxes + boxes.new_tensor([0.0, 0.0, 1.0, 1.0])


class PixelBoxCoder(BoxCoder):
    """torchvision's box coder on pixel-index boxes: tensorflow/tpu's ``encode_boxes`` and
    ``decode_boxes`` (same weights and clip of the size deltas)."""

    def encode_single(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        return super().encode_single(_extent(reference_boxes), _extent(proposals))

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        decoded = super().decode_single(rel_codes, _extent(boxes.to(rel_codes.dtype)))
        # Every 4th pair of values (one box per class) ends on its last pixel.
        ends = decoded.new_tensor([0.0, 0.0, 1.0, 1.0]).repeat(decoded.shape[-1] // 4)
        return decoded - ends


class PixelBoxTransform(GeneralizedRCNNTransform):
    """torchvision's detector transform, with boxes clipped to the last pixel: the detectors
    clip to the ``image_sizes`` the transform reports, so it reports each image one pixel
    smaller, and restores the sizes before mapping detections back to the input image."""

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[ImageList, list[dict[str, Tensor]] | None]:
        image_list, targets = super().forward(images, targets)
        image_list.image_sizes = [(h - 1, w - 1) for h, w in image_list.image_sizes]
        return image_list, targets

    def postprocess(
        self,
        result: list[dict[str, Tensor]],
        image_shapes: list[tuple[int, int]],
        original_image_sizes: list[tuple[int, int]],
    ) -> list[dict[str, Tensor]]:
        sizes = [(h + 1, w + 1) for h, w in image_shapes]
        return super().postprocess(result, sizes, original_image_sizes)


def use_pixel_boxes(model: nn.Module) -> None:
    """Give a torchvision RetinaNet, Faster or Mask R-CNN tensorflow/tpu's box convention: its
    transform and every box coder (the detector's or RPN's and box head's, and the RetinaNet
    regression head's, which encodes the training targets)."""
    t = model.transform
    model.transform = PixelBoxTransform(
        t.min_size, t.max_size, t.image_mean, t.image_std, t.size_divisible, t.fixed_size
    )
    for module in model.modules():
        coder = getattr(module, "box_coder", None)
        if isinstance(coder, BoxCoder):
            module.box_coder = PixelBoxCoder(coder.weights, coder.bbox_xform_clip)
