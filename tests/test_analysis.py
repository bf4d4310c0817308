"""Evaluation analysis on a set small enough to work out by hand: confusion matrix counts, a
precision-recall point, and the files beside metrics.json."""

import contextlib
import csv
import io

import pytest
from PIL import Image
from pycocotools.coco import COCO

from spinedet.engine.analysis import confusion_matrix, write_analysis
from spinedet.engine.evaluate import coco_evaluate


def _box(ann_id: int, image_id: int, cat: int, x: float, y: float) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": [x, y, 20, 20],
            "area": 400, "iscrowd": 0,
            "segmentation": [[x, y, x + 20, y, x + 20, y + 20, x, y + 20]]}  # fmt: skip


def _det(image_id: int, cat: int, x: float, y: float, score: float) -> dict:
    return {"image_id": image_id, "category_id": cat, "bbox": [x, y, 20, 20], "score": score}


@pytest.fixture
def hand_made() -> tuple[COCO, list[dict]]:
    """cat (id 1): objects in images 1 and 2; dog (id 2): one object in image 1; bird (id 3):
    no object. Categories listed out of id order on purpose."""
    dataset = {
        "images": [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.png"} for i in (1, 2)],
        "categories": [
            {"id": 2, "name": "dog"},
            {"id": 1, "name": "cat"},
            {"id": 3, "name": "bird"},
        ],  # fmt: skip
        "annotations": [_box(1, 1, 1, 10, 10), _box(2, 1, 2, 50, 50), _box(3, 2, 1, 10, 10)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = dataset
        coco.createIndex()
    results = [
        _det(1, 1, 10, 10, 0.9),  # the cat in image 1: right
        _det(1, 1, 50, 50, 0.8),  # the dog in image 1, called a cat
        _det(2, 2, 60, 60, 0.7),  # a dog where there is nothing
        _det(2, 1, 10, 10, 0.3),  # the cat in image 2, below the 0.5 score threshold
        _det(1, 3, 80, 0, 0.6),  # a bird where there is nothing
    ]
    return coco, results


def test_confusion_matrix_counts_by_hand(hand_made):
    coco, results = hand_made
    matrix, cat_ids = confusion_matrix(coco, results, "bbox", iou_threshold=0.5,
                                       score_threshold=0.5)  # fmt: skip
    assert cat_ids == [1, 2, 3]
    # rows: ground truth cat, dog, bird, background; columns: predicted the same
    assert matrix.tolist() == [
        [1, 0, 0, 1],  # cat: found once, missed once (its detection scores 0.3)
        [1, 0, 0, 0],  # dog: detected as a cat
        [0, 0, 0, 0],  # bird: no objects
        [0, 1, 1, 0],  # background: a dog and a bird detected where nothing is
    ]
    low, _ = confusion_matrix(coco, results, "bbox", score_threshold=0.2)
    assert low[0].tolist() == [2, 0, 0, 0]  # at score 0.3 the second cat is found


def test_pr_point_per_class_csv_and_plots(hand_made, tmp_path):
    coco, results = hand_made
    paths = write_analysis(coco, results, ["bbox", "segm"], tmp_path)
    names = sorted(p.name for p in paths)
    assert names == sorted(
        ["per_class.csv"]
        + [f"{stem}_{t}{ext}" for t in ("bbox", "segm")
           for stem, ext in [("pr_curve", ".csv"), ("pr_curve", ".png"),
                             ("pr_curve", "_per_class.png"), ("confusion", ".csv"),
                             ("confusion", ".png")]]
    )  # fmt: skip
    for path in paths:
        assert path.parent == tmp_path and path.stat().st_size > 0
        if path.suffix == ".png":
            assert Image.open(path).size[0] > 100
    # cat detections by score: TP (0.9), FP (0.8), TP (0.3) of 2 objects -> precision
    # 1, 1/2, 2/3 at recall 1/2, 1/2, 1; interpolated: 1 up to recall 0.50, then 2/3.
    rows = list(csv.DictReader(open(tmp_path / "pr_curve_bbox.csv")))
    cat = {r["recall"]: r for r in rows if r["class"] == "cat" and r["iou"] == "0.50"}
    assert len(cat) == 101
    assert float(cat["0.50"]["precision"]) == 1.0 and float(cat["0.50"]["score"]) == 0.9
    assert float(cat["0.51"]["precision"]) == pytest.approx(2 / 3, abs=1e-6)
    assert float(cat["0.51"]["score"]) == 0.3
    assert not [r for r in rows if r["class"] == "bird"]  # no ground truth, no curve
    overall = [float(r["precision"]) for r in rows if r["class"] == "all" and r["iou"] == "0.50"]
    metrics = coco_evaluate(coco, results, ["bbox"])["bbox"]
    cat_ap50 = (51 + 50 * 2 / 3) / 101
    assert metrics["per_class"]["cat"]["AP50"] == pytest.approx(cat_ap50, abs=1e-12)
    assert sum(overall) / 101 == pytest.approx(metrics["AP50"], abs=1e-6)
    assert metrics["AP50"] == pytest.approx(cat_ap50 / 2, abs=1e-12)  # dog's AP is 0

    table = {r["class"]: r for r in csv.DictReader(open(tmp_path / "per_class.csv"))}
    assert [table[n]["instances"] for n in ("cat", "dog", "bird")] == ["2", "1", "0"]
    assert float(table["cat"]["bbox_AP50"]) == pytest.approx(cat_ap50, abs=1e-6)
    assert table["dog"]["segm_AP"] == "0.000000" and table["bird"]["segm_AP"] == ""
    confusion = list(csv.reader(open(tmp_path / "confusion_bbox.csv")))
    assert confusion[0] == ["ground truth \\ predicted", "cat", "dog", "bird", "background"]
    assert confusion[4] == ["background", "0", "1", "1", "0"]
