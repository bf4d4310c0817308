import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spinedet.data import Problem, check, check_dataset, format_report

W, H = 64, 48


def _write_images(folder, names, size=(W, H)):
    folder.mkdir(exist_ok=True)
    for name in names:
        Image.new("RGB", size, (90, 20, 200)).save(folder / name)


POLYGON = [[1, 1, 10, 1, 10, 10]]


def _ann(ann_id, image_id=1, category_id=1, bbox=(1, 1, 10, 10), **extra):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": list(bbox),
            "area": 100, "iscrowd": 0, "segmentation": POLYGON, **extra}  # fmt: skip


@pytest.fixture
def broken(tmp_path):
    """A dataset with one of every problem, each in its own annotation or image."""
    images = tmp_path / "images"
    _write_images(images, ["ok.png", "dup_id.png", "small.png"])
    Image.new("RGB", (W - 1, H)).save(images / "small.png")
    (images / "garbage.png").write_bytes(b"definitely not a png")
    data = {
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 2, "name": "c"}],
        "images": [
            {"id": 1, "file_name": "ok.png", "width": W, "height": H},
            {"id": 2, "file_name": "missing.png", "width": W, "height": H},
            {"id": 3, "file_name": "garbage.png", "width": W, "height": H},
            {"id": 4, "file_name": "small.png", "width": W, "height": H},
            {"id": 5, "file_name": "dup_id.png", "width": W, "height": H},
            {"id": 5, "file_name": "ok.png", "width": W, "height": H},
            {"id": 6, "file_name": "ok.png", "height": H},
            {"id": 7, "file_name": "ok.png", "width": W, "height": H},
        ],
        "annotations": [
            _ann(10),  # fine
            _ann(11, bbox=(60, 40, 10, 10)),  # outside
            _ann(12, bbox=(5, 5, 0, 4)),  # zero width
            _ann(13, bbox=(5, 5, -2, 4)),  # negative width
            _ann(14, segmentation=[[1, 1, 5, 5]]),  # two points
            _ann(15, segmentation=[[1, 1, 5, 5, 9]]),  # odd coordinates
            _ann(16, segmentation=[[1, 1, 5, 5, 9, 9]]),  # collinear: zero area
            _ann(17, segmentation={"size": [H, W], "counts": [5, 5]}),  # too few pixels
            _ann(18, segmentation={"size": [H, W], "counts": "~~~~"}),  # truncated string
            _ann(19, segmentation={"size": [10, 10], "counts": [100]}),  # wrong size
            _ann(20, category_id=99),
            _ann(21, image_id=404),
            _ann(22),
            _ann(22),
            _ann(23, bbox="big"),
            _ann(24, segmentation="nope"),
            _ann(25, iscrowd=2),
            {"image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2], "segmentation": POLYGON},
            "not an object",
        ],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path, images


def _find(problems, **fields):
    found = [p for p in problems if all(getattr(p, k) == v for k, v in fields.items())]
    assert len(found) == 1, (fields, [str(p) for p in problems])
    return found[0]


def test_every_problem_is_reported_with_file_and_ids(broken):
    ann, images = broken
    problems = check_dataset(ann, images, progress=False)
    js = str(ann)
    box = _find(problems, ann_id=11)
    assert (box.file, box.image_id, box.kind) == (js, 1, "box")
    assert str(box) == (
        f"{js}: annotation 11 (image 1): box [60, 40, 10, 10] lies outside the 64x48 image"
    )
    assert "zero or negative size" in _find(problems, ann_id=12).message
    assert "zero or negative size" in _find(problems, ann_id=13).message
    assert "2 points" in _find(problems, ann_id=14, kind="polygon").message
    assert "odd number" in _find(problems, ann_id=15, kind="polygon").message
    assert "zero area" in _find(problems, ann_id=16, kind="polygon").message
    left_out = _find(problems, kind="no region")  # all three: no polygon of theirs is usable
    assert left_out.severity == "warning" and "(ids 14, 15, 16)" in left_out.message
    assert "cover 10 pixels" in _find(problems, ann_id=17, kind="rle").message
    assert "malformed" in _find(problems, ann_id=18, kind="rle").message
    assert "does not match" in _find(problems, ann_id=19, kind="rle").message
    assert "99" in _find(problems, ann_id=20, kind="unknown category").message
    assert _find(problems, ann_id=21, kind="unknown image").image_id == 404
    assert "used 2 times" in _find(problems, ann_id=22, kind="duplicate id").message
    assert "bbox must be" in _find(problems, ann_id=23).message
    assert "segmentation must be" in _find(problems, ann_id=24).message
    assert "iscrowd" in _find(problems, ann_id=25).message
    assert "annotations[17] has no integer 'id'" in _find(problems, ann_id=None, image_id=1).message
    assert _find(problems, message="annotations[18] is not an object").kind == "schema"
    assert _find(problems, message="category id 2 is used 2 times").kind == "duplicate id"
    assert _find(problems, message="image id 5 is used 2 times").image_id == 5
    assert "width" in _find(problems, image_id=6, kind="schema").message
    assert _find(problems, kind="duplicate file").message == "2 images share the file 'ok.png'"

    missing = _find(problems, image_id=2)
    assert (missing.file, missing.kind, missing.message) == (
        str(images / "missing.png"), "missing file", "file not found")  # fmt: skip
    garbage = _find(problems, image_id=3)
    assert garbage.file == str(images / "garbage.png") and garbage.kind == "unreadable image"
    small = _find(problems, image_id=4, kind="image size")
    assert small.message == "image is 63x48 but the annotations say 64x48"
    assert not [p for p in problems if p.ann_id == 10]
    assert len(problems) == 25  # nothing reported twice, nothing spurious


def test_report_has_one_line_per_problem_and_a_summary(broken):
    ann, images = broken
    problems = check_dataset(ann, images, progress=False)
    lines = format_report(problems).splitlines()
    assert lines[:-1] == [str(p) for p in problems]
    assert lines[-1].startswith("25 problems (1 warning): ") and "3 polygon" in lines[-1]
    assert format_report([]) == "no problems found"
    assert format_report(problems[:1]).splitlines()[-1] == f"1 problem: 1 {problems[0].kind}"


def test_problem_str_without_ids():
    assert str(Problem("a.json", None, None, "broken", "json")) == "a.json: broken"
    assert str(Problem("x.png", 3, None, "file not found", "missing file")) == (
        "x.png: image 3: file not found"
    )


def test_unparsable_json_is_one_problem_with_position(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "images": [\n    {"id": 1}\n  ]\n  "annotations": []\n}')
    (problem,) = check_dataset(path, tmp_path, progress=False)
    assert problem.kind == "json" and problem.file == str(path)
    assert problem.message.startswith("invalid JSON at line 5, column 3")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("[]", ["top level must be an object with images/annotations/categories"]),
        ("{}", [f"missing top-level key '{k}'" for k in ("categories", "images", "annotations")]),
        ('{"images": {}, "annotations": [], "categories": []}', ["'images' must be a list"]),
    ],
)
def test_structure_problems(tmp_path, content, expected):
    (tmp_path / "a.json").write_text(content)
    assert [p.message for p in check_dataset(tmp_path / "a.json", tmp_path)] == expected


def test_missing_annotation_file(tmp_path):
    (problem,) = check_dataset(tmp_path / "none.json", tmp_path)
    assert problem.file == str(tmp_path / "none.json") and "cannot read" in problem.message


@pytest.mark.parametrize("full", [False, True])
def test_truncated_images_are_found_by_the_fast_check_too(tmp_path, full):
    images = tmp_path / "images"
    images.mkdir()
    pixels = np.random.default_rng(0).integers(0, 255, (H, W, 3), np.uint8)
    for name in ("cut.jpg", "cut.png", "cut.bmp", "tail.jpg", "padded.jpg", "ok.jpg"):
        Image.fromarray(pixels).save(images / name, quality=95)
    for name in ("cut.jpg", "cut.png", "cut.bmp"):
        data = (images / name).read_bytes()
        (images / name).write_bytes(data[: len(data) // 2])
    data = (images / "tail.jpg").read_bytes()
    (images / "tail.jpg").write_bytes(data[:-2])  # only the end-of-image marker is missing:
    # Pillow refuses it as truncated, so training could not read it either
    with open(images / "padded.jpg", "ab") as f:  # complete, then more than a tail's bytes
        f.write(b"\0" * 5000)
    names = sorted(p.name for p in images.iterdir())
    entries = [{"id": i, "file_name": n, "width": W, "height": H} for i, n in enumerate(names)]
    meta = {"images": entries, "annotations": [], "categories": []}
    (tmp_path / "a.json").write_text(json.dumps(meta))
    problems = check_dataset(tmp_path / "a.json", images, full=full)
    found = sorted(Path(p.file).name for p in problems)
    assert found == ["cut.bmp", "cut.jpg", "cut.png", "tail.jpg"]
    assert {p.kind for p in problems} == {"unreadable image"}
    assert all("truncated" in p.message.lower() for p in problems)


def test_exif_rotation_explains_swapped_size(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees: the upright image is H x W
    Image.new("RGB", (W, H)).save(images / "r.jpg", exif=exif)
    Image.new("RGB", (W, H)).save(images / "plain.jpg")
    meta = {
        "images": [
            {"id": 1, "file_name": "r.jpg", "width": H, "height": W},  # upright size
            {"id": 2, "file_name": "r.jpg", "width": W, "height": H},  # stored size
            {"id": 3, "file_name": "plain.jpg", "width": H, "height": W},  # unexplained
            {"id": 4, "file_name": "r.jpg", "width": W, "height": W},  # unexplained
        ],
        "annotations": [],
        "categories": [],
    }
    (tmp_path / "a.json").write_text(json.dumps(meta))
    for full in (False, True):
        problems = check_dataset(tmp_path / "a.json", images, full=full)
        sizes = [p for p in problems if p.kind == "image size"]
        assert [(p.image_id, p.message) for p in sizes] == [
            (3, f"image is {W}x{H} but the annotations say {H}x{W}"),
            (4, f"image is {W}x{H} ({H}x{W} after EXIF rotation) but the annotations say {W}x{W}"),
        ]


def test_file_names_outside_the_image_folder_are_refused_and_never_read(tmp_path):
    images = tmp_path / "images"
    _write_images(images, ["ok.png"])
    (images / "sub").mkdir()
    (tmp_path / "secret.png").write_bytes(b"not an image: reading it would be reported")
    names = {1: "ok.png", 2: "../secret.png", 3: str(tmp_path / "secret.png"), 4: "/etc/passwd",
             5: "sub/../../secret.png", 6: "sub/../ok.png"}  # fmt: skip
    data = {
        "categories": [{"id": 1, "name": "a"}],
        "images": [{"id": i, "file_name": n, "width": W, "height": H} for i, n in names.items()],
        "annotations": [_ann(i, image_id=i) for i in names],
    }
    (tmp_path / "a.json").write_text(json.dumps(data))
    problems = check_dataset(tmp_path / "a.json", images)
    assert [(p.image_id, p.kind, p.file) for p in problems] == [
        (i, "path outside images", str(tmp_path / "a.json")) for i in (2, 3, 4, 5)
    ]
    assert problems[0].message == (
        f"file_name '../secret.png' points outside {images}: use a path relative to the image "
        "directory"
    )


def test_categories_without_images_or_annotations_are_a_problem(tmp_path):
    _write_images(tmp_path, ["a.png"])
    data = {"categories": [{"id": 1, "name": "a"}], "images": [], "annotations": []}
    (tmp_path / "a.json").write_text(json.dumps(data))
    (problem,) = check_dataset(tmp_path / "a.json", tmp_path)
    assert (problem.kind, problem.message) == ("empty", "the data set has no images")
    data["images"] = [{"id": 1, "file_name": "a.png", "width": W, "height": H}]
    data["annotations"] = [_ann(1, image_id=7)]  # on no known image: nothing to learn from
    (tmp_path / "a.json").write_text(json.dumps(data))
    problems = check_dataset(tmp_path / "a.json", tmp_path)
    assert [p.kind for p in problems] == ["unknown image", "empty"]
    assert problems[1].message.startswith("no image has an annotation")


def test_check_command_prints_instances_and_images_per_class(tmp_path, capsys):
    from spinedet.cli.data import add_data_commands

    _write_images(tmp_path, ["1.png", "2.png", "3.png"])
    data = {
        "categories": [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 9, "name": "x"}],
        "images": [{"id": i, "file_name": f"{i}.png", "width": W, "height": H} for i in (1, 2, 3)],
        "annotations": [_ann(1, 1, 7), _ann(2, 1, 7), _ann(3, 2, 7), _ann(4, 2, 3), _ann(5, 9, 3)],
    }
    (tmp_path / "a.json").write_text(json.dumps(data))
    parser = argparse.ArgumentParser()
    add_data_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "check", str(tmp_path / "a.json"), "--images", str(tmp_path)])
    assert args.func(args) == 1  # annotation 5 is on an unknown image: not counted
    lines = capsys.readouterr().out.splitlines()
    assert [line.split() for line in lines[:5]] == [
        ["class", "instances", "images"],
        ["cat", "3", "2"],
        ["dog", "1", "1"],
        ["x", "0", "0"],
        ["total", "4", "3"],
    ]
    assert lines[-1] == "1 problem: 1 unknown image"


@pytest.fixture
def clean(tmp_path):
    images = tmp_path / "images"
    _write_images(images, ["a.png", "b.png"])
    data = {
        "categories": [{"id": 1, "name": "a"}],
        "images": [
            {"id": 1, "file_name": "a.png", "width": W, "height": H},
            {"id": 2, "file_name": "b.png", "width": W, "height": H},
        ],
        "annotations": [_ann(1), _ann(2, image_id=2)],
    }
    (tmp_path / "ann.json").write_text(json.dumps(data))
    return tmp_path / "ann.json", images, data


def _forbid_reading(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the data set was read")

    monkeypatch.setattr(check, "read_json", fail)
    monkeypatch.setattr(check._Checker, "image_file", fail)


def test_cached_check_reads_nothing_the_second_time(clean, tmp_path, monkeypatch):
    ann, images, _ = clean
    run = tmp_path / "run"
    assert check.check_dataset_cached(ann, images, run) == []
    (entry,) = json.loads((run / check.CHECK_CACHE).read_text())["passed"]
    assert entry["sha256"] == hashlib.sha256(ann.read_bytes()).hexdigest()
    assert entry["images"] == str(images.resolve()) and entry["full"] is False
    _forbid_reading(monkeypatch)
    assert check.check_dataset_cached(ann, images, run) == []
    with pytest.raises(AssertionError, match="was read"):  # another folder, another check
        check.check_dataset_cached(ann, images.parent, run)
    with pytest.raises(AssertionError, match="was read"):  # a full check is more than a quick one
        check.check_dataset_cached(ann, images, run, full=True)


def test_full_check_stands_for_a_quick_one(clean, tmp_path, monkeypatch):
    ann, images, _ = clean
    assert check.check_dataset_cached(ann, images, tmp_path / "run", full=True) == []
    _forbid_reading(monkeypatch)
    assert check.check_dataset_cached(ann, images, tmp_path / "run") == []


def test_edited_annotation_file_is_checked_again(clean, tmp_path):
    ann, images, data = clean
    run = tmp_path / "run"
    assert check.check_dataset_cached(ann, images, run) == []
    data["annotations"][1]["bbox"] = [50, 40, 20, 20]  # same size on disk is no excuse
    ann.write_text(json.dumps(data))
    (problem,) = check.check_dataset_cached(ann, images, run)
    assert problem.ann_id == 2 and "lies outside the 64x48 image" in problem.message


def test_failed_check_is_not_cached_so_a_fixed_image_folder_passes(clean, tmp_path):
    ann, images, _ = clean
    run = tmp_path / "run"
    (images / "b.png").unlink()
    (problem,) = check.check_dataset_cached(ann, images, run)
    assert problem.kind == "missing file" and not (run / check.CHECK_CACHE).exists()
    _write_images(images, ["b.png"])
    assert check.check_dataset_cached(ann, images, run) == []


def test_unreadable_cache_is_checked_again_and_replaced(clean, tmp_path, caplog):
    ann, images, _ = clean
    run = tmp_path / "run"
    run.mkdir()
    (run / check.CHECK_CACHE).write_text("{not json")
    assert check.check_dataset_cached(ann, images, run) == []
    assert "ignoring the data check cache" in caplog.text
    assert len(json.loads((run / check.CHECK_CACHE).read_text())["passed"]) == 1


# What the loader refuses, data check reports as an error: both from the same rules
# (coco_files), each case asserted on both sides so that they cannot drift apart.


def _valid(tmp_path):
    """A data set both `data check --masks` and CocoDataset accept, and its image folder."""
    images = tmp_path / "images"
    _write_images(images, ["a.png", "b.png"])
    data = {
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
        "images": [
            {"id": 1, "file_name": "a.png", "width": W, "height": H},
            {"id": 2, "file_name": "b.png", "width": W, "height": H},
        ],
        "annotations": [_ann(1), _ann(2, 2, 2)],
    }
    return data, images


def _size(key, value):
    return lambda d: d["images"][1].update({key: value})


def _crowd_without_region(d):
    crowd = _ann(3, iscrowd=1)
    del crowd["segmentation"]  # COCO's mask evaluation reads a crowd's region
    d["annotations"].append(crowd)


REFUSED = [
    (_crowd_without_region,
     "1 annotations (ids 3) have no segmentation; Mask R-CNN needs masks", None),
    (lambda d: [a.update(segmentation=[]) for a in d["annotations"]],  # a boxes-only export
     "2 annotations (ids 1, 2) have no segmentation; Mask R-CNN needs masks", None),
    (lambda d: d["annotations"][1].pop("segmentation"),
     "1 annotations (ids 2) have no segmentation", None),
    (lambda d: d["categories"][1].update(name="a"),
     "category name 'a' is used 2 times (ids 1, 2)", "category names are not unique: a"),
    (lambda d: d["categories"][1].update(id=1),
     "category id 1 is used 2 times", "category ids are not unique: 1"),
    (lambda d: d["images"][1].update(id=1),
     "image 1: image id 1 is used 2 times", "image ids are not unique: 1"),
    (lambda d: d.update(images=[], annotations=[]), "the data set has no images", None),
    (lambda d: d.update(images=[], annotations=[], categories=[]),
     "the data set has no images", None),
    (lambda d: d["images"][1].update(file_name="../b.png"),
     "image 2: file_name '../b.png' points outside",
     "1 images (ids 2) have file names outside the image directory"),
    (lambda d: d["annotations"][1].update(category_id=7),
     "category id 7 is not defined", "annotations use unknown category ids [7]"),
    (_size("width", 64.5), "width must be a positive whole number of pixels, not 64.5", None),
    (_size("width", 0), "width must be a positive whole number of pixels, not 0", None),
    (_size("height", -48), "height must be a positive whole number of pixels, not -48", None),
    (_size("height", "48"), "height must be a positive whole number of pixels, not '48'", None),
    (_size("width", True), "width must be a positive whole number of pixels, not True", None),
    (lambda d: d["images"][1].pop("height"), "missing height", None),
    (lambda d: d["annotations"][1].update(area=None),
     "annotation 2 (image 2): area is not a number: None",
     "1 annotations (ids 2): area is not a number"),
]  # fmt: skip


REFUSED_IDS = ["crowd-without-region", "all-segmentations-empty", "no-segmentation",
               "category-names", "category-ids", "image-ids", "no-images", "nothing",
               "outside-folder", "unknown-category", "fractional-size", "zero-size",
               "negative-size", "text-size", "boolean-size", "missing-size", "area"]  # fmt: skip


@pytest.mark.parametrize(("edit", "checked", "refused"), REFUSED, ids=REFUSED_IDS)
def test_what_the_loader_refuses_data_check_reports_as_an_error(tmp_path, edit, checked, refused):
    from spinedet.data import CocoDataset, DataError

    data, images = _valid(tmp_path)
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    assert check_dataset(path, images, masks=True) == []
    assert len(CocoDataset(path, images)) == 2
    edit(data)
    path.write_text(json.dumps(data))

    found = [p for p in check_dataset(path, images, masks=True) if checked in str(p)]
    assert [p.severity for p in found] == ["error"], format_report(check_dataset(path, images))
    assert str(found[0]).startswith(f"{path}: ")
    with pytest.raises(DataError) as refusal:
        CocoDataset(path, images)
    assert str(refusal.value).startswith(f"{path}: ")
    assert (refused or checked.removeprefix("image 2: ")) in str(refusal.value)


def test_a_bad_image_size_names_the_image_and_its_annotations_are_not_unknown(tmp_path):
    data, images = _valid(tmp_path)
    data["images"][1]["width"] = 64.5
    (tmp_path / "a.json").write_text(json.dumps(data))
    (problem,) = check_dataset(tmp_path / "a.json", images)
    assert str(problem) == (
        f"{tmp_path / 'a.json'}: image 2: width must be a positive whole number of pixels, not 64.5"
    )
    from spinedet.data import CocoDataset, DataError

    with pytest.raises(DataError, match=r"1 images \(ids 2\) have no usable size \(image 2: wi"):
        CocoDataset(tmp_path / "a.json", images)


def test_whole_float_sizes_are_accepted_by_check_and_loader_alike(tmp_path):
    from spinedet.data import CocoDataset

    data, images = _valid(tmp_path)
    for image in data["images"]:
        image.update(width=float(W), height=float(H))  # as some tools write them
    data["annotations"][1]["bbox"] = [50, 40, 20, 20]  # outside: checked against the size
    (tmp_path / "a.json").write_text(json.dumps(data))
    (problem,) = check_dataset(tmp_path / "a.json", images, masks=True)
    assert problem.message == "box [50, 40, 20, 20] lies outside the 64x48 image"
    image, target = CocoDataset(tmp_path / "a.json", images)[0]
    assert image.shape == (3, H, W) and target["masks"].shape == (1, H, W)


def test_missing_segmentation_is_an_error_only_for_mask_rcnn(tmp_path, capsys):
    from spinedet.cli.data import add_data_commands
    from spinedet.data import CocoDataset

    data, images = _valid(tmp_path)
    for ann in data["annotations"]:
        del ann["segmentation"]  # boxes only: RetinaNet and Faster R-CNN train on it
    path = tmp_path / "a.json"
    path.write_text(json.dumps(data))
    assert len(CocoDataset(path, images, masks=False)) == 2
    (warning,) = check_dataset(path, images)
    assert (warning.kind, warning.severity) == ("no segmentation", "warning")
    assert check_dataset(path, images, masks=False) == []
    assert [p.severity for p in check_dataset(path, images, masks=True)] == ["error"]
    assert check.check_dataset_cached(path, images, tmp_path / "run") == []  # training's check

    parser = argparse.ArgumentParser()
    add_data_commands(parser.add_subparsers(dest="command"))
    command = ["data", "check", str(path), "--images", str(images)]
    args = parser.parse_args(command)
    assert args.func(args) == 0  # warnings alone pass
    out = capsys.readouterr().out.splitlines()
    assert out[-2] == f"{path}: warning: {warning.message}"
    assert out[-1] == "1 problem (1 warning): 1 no segmentation"
    args = parser.parse_args([*command, "--masks"])
    assert args.func(args) == 1
    assert capsys.readouterr().out.splitlines()[-1] == "1 problem: 1 no segmentation"


def test_annotations_without_a_usable_polygon_are_a_warning_the_loader_agrees_with(
    tmp_path, capsys, caplog
):
    """``[]`` or only broken polygons: Mask R-CNN leaves the annotation out, and says so."""
    from spinedet.cli.data import add_data_commands
    from spinedet.data import CocoDataset

    data, images = _valid(tmp_path)
    data["annotations"] += [
        _ann(3, segmentation=[]),
        _ann(4, iscrowd=1, segmentation=[]),  # never a training target
    ]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(data))
    message = (
        "1 annotations (ids 3) have a segmentation without a usable polygon: they are left out "
        "of Mask R-CNN training"
    )
    for masks in (True, None):
        (warning,) = check_dataset(path, images, masks=masks)
        assert (warning.kind, warning.severity, warning.message) == (
            "no region",
            "warning",
            message,
        )
    assert check_dataset(path, images, masks=False) == []
    with caplog.at_level("WARNING", logger="spinedet.data.coco"):
        assert CocoDataset(path, images)[0][1]["labels"].tolist() == [1]
    assert [r.getMessage() for r in caplog.records] == [f"{path}: {message}"]

    parser = argparse.ArgumentParser()
    add_data_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["data", "check", str(path), "--images", str(images), "--masks"])
    assert args.func(args) == 0  # warnings alone pass
    out = capsys.readouterr().out.splitlines()
    assert out[-2:] == [f"{path}: warning: {message}", "1 problem (1 warning): 1 no region"]

    data["annotations"].append(_ann(5, segmentation=[[1, 1, 5, 5]]))  # two points: an error too
    path.write_text(json.dumps(data))
    problems = check_dataset(path, images, masks=True)
    assert [(p.kind, p.severity) for p in problems] == [
        ("polygon", "error"),
        ("no region", "warning"),
    ]
    assert problems[1].message.startswith("2 annotations (ids 3, 5) have a segmentation without")

    for ann in data["annotations"]:
        ann["segmentation"] = []  # a boxes-only export: refused, not left out
    path.write_text(json.dumps(data))
    assert [p.kind for p in check_dataset(path, images, masks=True)] == ["no segmentation"]
