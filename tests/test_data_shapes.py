import json
from collections import Counter

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from spinedet.data import CocoDataset, check_dataset, make_shapes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp("shapes"), num_images=40, seed=3)


def test_layout_and_categories(shapes):
    data = json.loads(shapes["annotations"].read_text())
    assert sorted(p.name for p in shapes["images"].iterdir()) == [
        im["file_name"] for im in data["images"]
    ]
    assert [(c["id"], c["name"]) for c in data["categories"]] == [
        (3, "circle"), (7, "square"), (11, "triangle"), (20, "star")]  # fmt: skip
    per_image = Counter(a["image_id"] for a in data["annotations"])
    assert all(1 <= per_image[im["id"]] <= 6 for im in data["images"])
    assert set(Counter(a["category_id"] for a in data["annotations"])) == {3, 7, 11, 20}
    assert all(a["iscrowd"] == 0 for a in data["annotations"])
    kinds = Counter(type(a["segmentation"]).__name__ for a in data["annotations"])
    assert kinds["list"] > kinds["dict"] > 0  # mostly polygons, occluded ones as RLE
    whole = [a for a in data["annotations"] if isinstance(a["segmentation"], list)]
    sides = [max(a["bbox"][2:]) / 160 for a in whole]
    assert 0.05 < min(sides) and max(sides) <= 0.5 and np.median(sides) > 0.12


def test_passes_check_with_zero_problems(shapes):
    assert check_dataset(shapes["annotations"], shapes["images"], full=True) == []


def test_masks_match_boxes_and_pixels(shapes):
    ds = CocoDataset(shapes["annotations"], shapes["images"])
    data = json.loads(shapes["annotations"].read_text())
    areas = {a["id"]: a["area"] for a in data["annotations"]}
    ann_ids = iter(sorted(areas))
    for index in range(len(ds)):
        image, target = ds[index]
        masks = target["masks"].bool()
        assert masks.sum(0).max() <= 1  # visible masks never overlap
        for mask, box in zip(masks, target["boxes"], strict=True):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            mask_box = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
            assert torch.allclose(mask_box, box, atol=1)
            assert mask.sum() == areas[next(ann_ids)]
        # Shapes are bright and the background dark: the union of masks is exactly what was drawn.
        bright = image.max(dim=0).values > 150
        assert torch.equal(bright, masks.any(0))


def test_deterministic_per_seed(tmp_path, shapes):
    again = make_shapes(tmp_path / "a", num_images=40, seed=3)
    assert again["annotations"].read_bytes() == shapes["annotations"].read_bytes()
    for name in ("000000.png", "000039.png"):
        assert (again["images"] / name).read_bytes() == (shapes["images"] / name).read_bytes()
    other = make_shapes(tmp_path / "b", num_images=3, seed=4)
    assert (other["images"] / "000000.png").read_bytes() != (
        shapes["images"] / "000000.png"
    ).read_bytes()


def test_non_square_size_and_splits(tmp_path):
    paths = make_shapes(tmp_path, num_images=20, size=(96, 64), splits=(0.5, 0.5))
    data = json.loads(paths["annotations"].read_text())
    assert {(im["width"], im["height"]) for im in data["images"]} == {(96, 64)}
    image, _ = CocoDataset(paths["annotations"], paths["images"])[0]
    assert image.shape == (3, 64, 96)
    train = json.loads(paths["train"].read_text())
    val = json.loads(paths["val"].read_text())
    assert len(train["images"]) + len(val["images"]) == 20
    assert check_dataset(paths["val"], paths["images"]) == []


def test_max_instances_bounds_and_fills_images(tmp_path, shapes):
    def per_image(paths):
        data = json.loads(paths["annotations"].read_text())
        return Counter(a["image_id"] for a in data["annotations"])

    crowded = per_image(make_shapes(tmp_path / "12", num_images=40, seed=3, max_instances=12))
    usual = per_image(shapes)
    assert max(crowded.values()) <= 12 and max(crowded.values()) > 6
    assert sum(crowded.values()) > 1.5 * sum(usual.values())
    assert max(per_image(make_shapes(tmp_path / "1", num_images=10, max_instances=1)).values()) == 1


def test_rejects_tiny_or_empty(tmp_path):
    with pytest.raises(ValueError):
        make_shapes(tmp_path, num_images=0)
    with pytest.raises(ValueError):
        make_shapes(tmp_path, size=8)
    with pytest.raises(ValueError, match="max_instances 0"):
        make_shapes(tmp_path, max_instances=0)
    with pytest.raises(ValueError, match=r"ratios must all be positive and finite, got \[1\.0, 0"):
        make_shapes(tmp_path / "zero", num_images=3, splits=(1.0, 0.0, 0.0))
    assert not (tmp_path / "zero").exists()  # refused before any image was drawn


def test_an_existing_data_set_is_refused_or_replaced_whole(tmp_path):
    make_shapes(tmp_path, num_images=4, size=32, splits=(0.5, 0.5))
    with pytest.raises(ValueError, match="already holds a data set .images.: use --overwrite"):
        make_shapes(tmp_path, num_images=2, size=48)
    assert len(list((tmp_path / "images").iterdir())) == 4  # untouched
    make_shapes(tmp_path, num_images=2, size=48, overwrite=True)
    assert len(list((tmp_path / "images").iterdir())) == 2  # no image of the old set is left
    assert not (tmp_path / "train.json").exists()  # nor its splits
    assert check_dataset(tmp_path / "annotations.json", tmp_path / "images", full=True) == []


@pytest.mark.filterwarnings("ignore:__array__:DeprecationWarning")  # pycocotools
def test_targets_as_detections_score_perfect_mask_ap(shapes, capsys):
    """The decoded targets, mapped back to category ids, are exactly what COCOeval expects."""
    ds = CocoDataset(shapes["annotations"], shapes["images"])
    results = []
    for index in range(len(ds)):
        _, target = ds[index]
        for mask, label in zip(target["masks"], target["labels"], strict=True):
            rle = mask_utils.encode(np.asfortranarray(mask.numpy()))
            rle["counts"] = rle["counts"].decode()
            results.append({"image_id": target["image_id"], "score": 1.0, "segmentation": rle,
                            "category_id": ds.label_to_cat_id[int(label)]})  # fmt: skip
    evaluator = COCOeval(ds.coco, ds.coco.loadRes(results), "segm")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0)  # AP at IoU 0.50:0.95
