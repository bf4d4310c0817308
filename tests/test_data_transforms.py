import pickle

import pytest
import torch
from torchvision import tv_tensors

from spinedet.data import eval_transforms, train_transforms

# One colour per label, so pixels under a mask reveal which label it must carry.
COLOURS = {1: (255, 0, 0), 2: (0, 255, 0), 3: (0, 0, 255), 4: (255, 255, 0)}


def _sample(height=120, width=200):
    """Four coloured rectangles, one of them tiny in a corner so crops often remove it."""
    rects = {1: (10, 10, 60, 50), 2: (100, 30, 190, 110), 3: (40, 70, 90, 115), 4: (195, 0, 199, 4)}
    image = torch.zeros((3, height, width), dtype=torch.uint8)
    masks = torch.zeros((len(rects), height, width), dtype=torch.uint8)
    for i, (label, (x1, y1, x2, y2)) in enumerate(rects.items()):
        image[:, y1:y2, x1:x2] = torch.tensor(COLOURS[label], dtype=torch.uint8)[:, None, None]
        masks[i, y1:y2, x1:x2] = 1
    boxes = torch.tensor(list(rects.values()), dtype=torch.float32)
    target = {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
        "labels": torch.tensor(list(rects), dtype=torch.int64),
        "masks": tv_tensors.Mask(masks),
        "image_id": 7,
        "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
        "iscrowd": torch.tensor([0, 0, 0, 1]),
    }
    return tv_tensors.Image(image), target


def _mask_box(mask):
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()


def _closest_label(colour):
    def similarity(label):
        reference = torch.tensor(COLOURS[label], dtype=torch.float32)
        return torch.cosine_similarity(colour, reference, dim=0)

    return max(COLOURS, key=similarity)


@pytest.mark.parametrize("seed", range(12))
def test_train_transforms_keep_image_boxes_masks_and_fields_aligned(seed):
    torch.manual_seed(seed)
    image, target = _sample()
    area_of = {int(lab): float(a) for lab, a in zip(target["labels"], target["area"], strict=True)}
    out_image, out = train_transforms(96, scale_range=(0.5, 2.0))(image, target)

    assert out_image.shape == (3, 96, 96) and out_image.dtype == torch.float32
    assert 0 <= out_image.min() and out_image.max() <= 1
    assert out["image_id"] == 7
    n = len(out["labels"])
    assert out["boxes"].shape == (n, 4) and out["masks"].shape == (n, 96, 96)
    assert out["area"].shape == (n,) and out["iscrowd"].shape == (n,)
    for box, mask, label, area, crowd in zip(
        out["boxes"], out["masks"], out["labels"], out["area"], out["iscrowd"], strict=True
    ):
        label = int(label)
        assert area == area_of[label] and int(crowd) == (label == 4)
        assert mask.any(), "a kept box must keep its mask"
        assert torch.allclose(_mask_box(mask), box, atol=1.5)
        # Resampling blends edges with the black background: compare hues, not intensities.
        colour = out_image[:, mask.bool()].mean(dim=1)
        assert _closest_label(colour) == label


def test_horizontal_flip_moves_boxes_and_masks_with_the_image():
    image, target = _sample(height=200, width=200)
    out_image, out = train_transforms(200, scale_range=(1.0, 1.0), hflip=1.0)(image, target)
    assert out["labels"].tolist() == [1, 2, 3, 4]
    flipped = target["boxes"][:, [2, 1, 0, 3]] * torch.tensor([-1, 1, -1, 1]) + torch.tensor(
        [200, 0, 200, 0]
    )
    assert torch.equal(out["boxes"], flipped)
    assert torch.equal(out["masks"], target["masks"].flip(-1))
    assert torch.equal(out_image, image.flip(-1).float() / 255)


def test_scale_jitter_makes_long_side_scale_times_size():
    image, target = _sample(height=100, width=200)
    _, out = train_transforms(100, scale_range=(0.5, 0.5), hflip=0.0)(image, target)
    # Long side 200 -> 0.5 * 100 = 50: every box shrinks by 4, the whole image fits the crop.
    widths = out["boxes"][:, 2] - out["boxes"][:, 0]
    assert torch.allclose(widths, (target["boxes"][:, 2] - target["boxes"][:, 0]) / 4)
    assert out["labels"].tolist() == [1, 2, 3, 4]


def test_eval_transforms_leave_the_sample_to_the_detector():
    image, target = _sample()
    out_image, out = eval_transforms()(image, target)
    assert torch.equal(out_image, image) and out_image.dtype == torch.uint8
    assert torch.equal(out["boxes"], target["boxes"]) and torch.equal(out["masks"], target["masks"])


def test_pipelines_pickle_for_dataloader_workers():
    image, target = _sample(height=200, width=200)
    clone = pickle.loads(pickle.dumps(train_transforms(200, scale_range=(1.0, 1.0), hflip=1.0)))
    _, out = clone(image, target)
    assert out["labels"].tolist() == [1, 2, 3, 4] and out["area"].shape == (4,)
