import json
import random
from collections import Counter

import pytest

from spinedet.data import DataError, split_dataset

RATIOS = (0.8, 0.1, 0.1)


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    """600 images: a common class, a medium one, two rare ones, and some empty images."""
    rng = random.Random(123)
    images, anns = [], []
    for image_id in range(1, 601):
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": 10, "height": 10})
        classes = [1] * rng.randint(0, 4)
        if image_id % 6 == 0:
            classes.append(2)
        if image_id % 60 == 1:
            classes += [3, 3]
        if image_id in (50, 250, 450):  # three instances only: one per split wanted
            classes.append(4)
        for cls in classes:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cls,
                         "bbox": [0, 0, 1, 1], "area": 1, "iscrowd": 0})  # fmt: skip
    data = {
        "info": {"v": 1},
        "licenses": [{"id": 1}],
        "categories": [{"id": c, "name": str(c)} for c in (1, 2, 3, 4)],
        "images": images,
        "annotations": anns,
    }
    path = tmp_path_factory.mktemp("skewed") / "all.json"
    path.write_text(json.dumps(data))
    return path, data


def _load(paths):
    return {name: json.loads(path.read_text()) for name, path in paths.items()}


def test_split_invariants(skewed, tmp_path):
    path, data = skewed
    paths = split_dataset(path, tmp_path, ratios=RATIOS, seed=0)
    assert paths == {name: tmp_path / f"{name}.json" for name in ("train", "val", "test")}
    parts = _load(paths)

    image_ids = [im["id"] for part in parts.values() for im in part["images"]]
    assert sorted(image_ids) == list(range(1, 601))  # every image exactly once
    ann_ids = sorted(a["id"] for part in parts.values() for a in part["annotations"])
    assert ann_ids == [a["id"] for a in data["annotations"]]  # every annotation exactly once
    for part in parts.values():
        ids = {im["id"] for im in part["images"]}
        assert all(a["image_id"] in ids for a in part["annotations"])
        assert part["info"] == data["info"] and part["categories"] == data["categories"]
        assert part["licenses"] == data["licenses"]
    sizes = [len(parts[name]["images"]) for name in ("train", "val", "test")]
    assert all(abs(size - 600 * r) <= 6 for size, r in zip(sizes, RATIOS, strict=True)), sizes


def test_split_balances_classes(skewed, tmp_path):
    path, data = skewed
    parts = _load(split_dataset(path, tmp_path, ratios=RATIOS, seed=0))
    totals = Counter(a["category_id"] for a in data["annotations"])
    for name, ratio in zip(("train", "val", "test"), RATIOS, strict=True):
        counts = Counter(a["category_id"] for a in parts[name]["annotations"])
        for cls in (1, 2, 3):
            assert abs(counts[cls] / totals[cls] - ratio) <= 0.03, (name, cls, counts, totals)
        assert counts[4] == 1, (name, counts)  # the three rare instances spread, one each


def test_split_is_deterministic_per_seed(skewed, tmp_path):
    path, _ = skewed
    first = split_dataset(path, tmp_path / "a", seed=7)
    again = split_dataset(path, tmp_path / "b", seed=7)
    other = split_dataset(path, tmp_path / "c", seed=8)
    assert all(first[n].read_bytes() == again[n].read_bytes() for n in first)
    assert any(first[n].read_bytes() != other[n].read_bytes() for n in first)


def test_ratios_are_normalised_and_names_follow_count(skewed, tmp_path):
    path, _ = skewed
    paths = split_dataset(path, tmp_path, ratios=(3, 1))
    assert list(paths) == ["train", "val"]
    parts = _load(paths)
    assert abs(len(parts["train"]["images"]) - 450) <= 6
    named = split_dataset(path, tmp_path, ratios=(1, 1), names=("a", "b"))
    assert list(named) == ["a", "b"]


@pytest.mark.parametrize(
    ("ratios", "names", "message"),
    [
        ((0.8, 0.0, 0.2), None, "positive"),
        ((0.8, -0.1, 0.3), None, "positive"),
        ((1.0,), None, "at least two"),
        ((0.5, 0.5), ("x", "y", "z"), "2 ratios but 3"),
        ((0.5, 0.5), ("x", "x"), "unique"),
        ((1, 1, 1, 1), None, "4 ratios but 3"),
    ],
)
def test_bad_ratios_are_rejected(skewed, tmp_path, ratios, names, message):
    with pytest.raises(ValueError, match=message):
        split_dataset(skewed[0], tmp_path, ratios=ratios, names=names)


def test_unpartitionable_data_is_rejected(tmp_path):
    data = {
        "images": [{"id": 1}, {"id": 2}],
        "annotations": [{"id": 1, "image_id": 3, "category_id": 1}],
        "categories": [],
    }
    (tmp_path / "a.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"a\.json: 1 annotations refer to unknown image ids"):
        split_dataset(tmp_path / "a.json", tmp_path)
    data["images"].append({"id": 1})
    (tmp_path / "a.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="image ids are not unique"):
        split_dataset(tmp_path / "a.json", tmp_path)
