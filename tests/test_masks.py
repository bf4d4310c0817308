"""spinedet.masks: masks resized, encoded and drawn from crops equal, bit for bit, what the full
masks gave (torch's bilinear resize, pycocotools' encode, torchvision's drawing)."""

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torch.nn import functional as F
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.utils import draw_segmentation_masks

from spinedet.draw import MASK_ALPHA, draw_instances, draw_masks
from spinedet.masks import MaskCrops, resize_masks


def pasted(height: int, width: int, seed: int) -> torch.Tensor:
    """(N, height, width) mask probabilities as a Mask R-CNN pastes them: boxes inside, at the
    borders, partly outside the image, overlapping, tiny; and an all-zero map."""
    g = torch.Generator().manual_seed(seed)
    boxes = torch.tensor([
        [0.1, 0.1, 0.6, 0.7], [0.4, 0.3, 0.9, 0.95], [0.0, 0.0, 1.0, 1.0], [-0.3, 0.5, 0.2, 1.4],
        [0.8, -0.2, 1.3, 0.3], [0.5, 0.5, 0.51, 0.52],
    ]) * torch.tensor([width, height, width, height])  # fmt: skip
    probs = torch.rand(len(boxes), 1, 28, 28, generator=g)
    masks = paste_masks_in_image(probs, boxes, (height, width))[:, 0]
    return torch.cat([masks, torch.zeros(1, height, width)])


# Upscaled as the Predictor upscales (the model's size to the image's), thin, one axis kept,
# not scaled at all, and small outputs (torch's 2D kernel itself).
SIZES = [((48, 64), (300, 400)), ((64, 43), (1000, 677)), ((5, 64), (77, 1000)),
         ((64, 64), (64, 300)), ((40, 50), (40, 50)), ((48, 64), (60, 67))]  # fmt: skip


@pytest.mark.parametrize(("seen", "size"), SIZES)
def test_resized_crops_equal_the_whole_bilinear_resize(seen, size):
    probs = pasted(*seen, seed=sum(size))
    # Random values everywhere in a box put many resized pixels near 0.5, where one rounding
    # step apart would flip them.
    probs[0] = torch.where(probs[0] > 0, torch.rand(seen, generator=torch.Generator()), 0)
    if seen == size:
        expected = probs > 0.5
    else:
        expected = F.interpolate(probs[:, None], size, mode="bilinear")[:, 0] > 0.5
    crops = resize_masks(probs, size)
    assert torch.equal(crops.full(), expected)
    assert crops.crops[-1].numel() == 0  # the empty map
    runs = [mask_utils.encode(np.asfortranarray(m.numpy().astype(np.uint8))) for m in expected]
    assert crops.to_rle() == [{"size": [*size], "counts": r["counts"].decode()} for r in runs]


def test_no_masks_and_masks_made_from_full_ones():
    empty = resize_masks(torch.zeros(0, 48, 64), (300, 400))
    assert len(empty) == 0 and empty.full().shape == (0, 300, 400) and empty.to_rle() == []
    masks = F.interpolate(pasted(48, 64, seed=1)[:, None], (90, 120), mode="bilinear")[:, 0] > 0.5
    masks[1, 89, :] = masks[2, :, 0] = True  # to the last row and the first column
    crops = MaskCrops.from_masks(masks)
    assert torch.equal(crops.full(), masks)
    assert [c.shape for c in crops.crops][-1] == (0, 0)
    expected = mask_utils.encode(
        np.asfortranarray(masks.numpy().astype(np.uint8).transpose(1, 2, 0))
    )
    assert [r["counts"] for r in crops.to_rle()] == [r["counts"].decode() for r in expected]


def test_drawn_crops_equal_torchvision_drawing_the_full_masks():
    masks = F.interpolate(pasted(48, 64, seed=2)[:, None], (96, 128), mode="bilinear")[:, 0] > 0.5
    image = torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8)
    colors = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
              (140, 86, 75), (227, 119, 194)]  # fmt: skip
    expected = draw_segmentation_masks(image, masks, alpha=MASK_ALPHA, colors=colors)
    assert (masks.sum(0) > 1).any()  # overlaps, which torchvision draws black
    assert torch.equal(draw_masks(image, MaskCrops.from_masks(masks), colors), expected)


def test_labels_are_sized_to_the_boxes_on_a_large_image():
    """On a 3000 x 2000 photo of 40-px objects the labels were 50 px tall (a 40th of the short
    side) and covered the neighbours: now at most half the typical box (but never under 12)."""
    image = torch.zeros(3, 2000, 3000, dtype=torch.uint8)
    small = torch.tensor([[500.0, 500, 540, 540]])
    large = torch.tensor([[500.0, 500, 1500, 1500]])

    def label_rows(boxes: torch.Tensor) -> int:  # the text's height, from the box's corner
        drawn = draw_instances(image, boxes, [1], ["circle 0.99"], 2).any(dim=0)
        drawn[:, 535:545] = False  # the small box's right edge
        return int(drawn[503:600, 503:800].any(dim=1).sum())

    assert 0 < label_rows(small) <= 20 < label_rows(large)
