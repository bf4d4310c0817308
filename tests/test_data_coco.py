import json
import pickle
import shutil
from unittest.mock import patch

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.JpegImagePlugin import JpegImageFile
from pycocotools import mask as mask_utils
from torch.nn import functional as nnf
from torch.utils.data import DataLoader
from torchvision import tv_tensors

from spinedet.data import (
    CocoDataset,
    DataError,
    collate,
    load_image,
    train_transforms,
)
from spinedet.data.coco_files import (
    _rle_string_counts,
    decode_segmentation,
    regionless,
    rle_problem,
)


def _rgb(path):
    return np.asarray(load_image(path))


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("L", 100, (100, 100, 100)),
        ("1", 1, (255, 255, 255)),
        ("LA", (200, 255), (200, 200, 200)),
        ("LA", (200, 0), (0, 0, 0)),  # transparent -> black, not the hidden grey
        ("RGBA", (10, 20, 30, 255), (10, 20, 30)),
        ("RGBA", (10, 20, 30, 0), (0, 0, 0)),
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
    ],
)
def test_load_image_modes(tmp_path, mode, value, expected):
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    Image.new(mode, (5, 4), value).save(path, **({"quality": 100} if mode == "CMYK" else {}))
    rgb = _rgb(path)
    assert rgb.shape == (4, 5, 3) and rgb.dtype == np.uint8
    np.testing.assert_allclose(rgb.reshape(-1, 3).mean(0), expected, atol=2)


def test_load_palette_with_transparency(tmp_path):
    image = Image.new("P", (4, 2), 0)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((3, 1), 1)
    image.save(tmp_path / "p.png", transparency=0)
    rgb = _rgb(tmp_path / "p.png")
    assert rgb[1, 3].tolist() == [0, 0, 255]
    assert rgb[0, 0].tolist() == [0, 0, 0]  # palette entry 0 is transparent


def test_load_16_bit_scales_instead_of_clipping(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    assert _rgb(tmp_path / "g16.png")[0, :, 0].tolist() == [0, 1, 128, 255]


@pytest.mark.parametrize("dtype", [np.int32, np.float32])
def test_load_32_bit_stretches_range(tmp_path, dtype):
    Image.fromarray(np.array([[-1000, 0, 1000]], dtype=dtype)).save(tmp_path / "x.tif")
    assert _rgb(tmp_path / "x.tif")[0, :, 1].tolist() == [0, 128, 255]


def _rotated_jpeg(path):
    """Stored 40x20 with a white block top-left; EXIF 6 means 'rotate 90 degrees clockwise'."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:8, :8] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, exif=exif, quality=95)


def test_load_image_applies_exif_orientation(tmp_path):
    _rotated_jpeg(tmp_path / "r.jpg")
    rgb = _rgb(tmp_path / "r.jpg")
    assert rgb.shape == (40, 20, 3)
    assert rgb[:8, -8:].mean() > 200 and rgb[:8, :8].mean() < 50  # block now top-right


def test_load_image_keeps_stored_orientation_when_annotations_use_it(tmp_path):
    _rotated_jpeg(tmp_path / "r.jpg")
    assert load_image(tmp_path / "r.jpg", size=(40, 20)).size == (40, 20)
    assert load_image(tmp_path / "r.jpg", size=(20, 40)).size == (20, 40)
    with pytest.raises(DataError, match=r"r\.jpg: image is 40x20 \(20x40 after EXIF rotation\)"):
        load_image(tmp_path / "r.jpg", size=(30, 30))


@pytest.mark.parametrize("annotated", ["oriented", "stored"])
def test_load_image_resized_decodes_a_jpeg_smaller_in_either_orientation(tmp_path, annotated):
    pixels = np.zeros((200, 400, 3), np.uint8)  # stored 400x200, block top-left; EXIF 6
    pixels[:80, :80] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "r.jpg", exif=exif, quality=95)
    size = (200, 400) if annotated == "oriented" else (400, 200)
    full = load_image(tmp_path / "r.jpg", size)
    resize = (size[0] // 4, size[1] // 4)
    drafted = []
    draft = JpegImageFile.draft

    def spy(self, mode, request):
        draft(self, mode, request)
        drafted.append(self.size)

    with patch.object(JpegImageFile, "draft", spy):
        small = load_image(tmp_path / "r.jpg", size, resize)
    assert drafted == [(100, 50)]  # decoded at 1/4 scale, as much as the resize keeps
    assert small.size == resize
    expected = np.asarray(full.resize(resize, Image.Resampling.BILINEAR), np.float32)
    assert np.abs(np.asarray(small, np.float32) - expected).mean() < 4
    pixels = np.asarray(small)
    corner = pixels[:20, -20:] if annotated == "oriented" else pixels[:20, :20]
    assert corner.mean() > 200  # the block where the annotations' orientation has it


@pytest.mark.parametrize("content", [b"", b"not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_broken_image_raises_data_error_naming_file(tmp_path, content):
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_image(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message


def test_truncated_image_raises_data_error(tmp_path):
    path = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError, match="cut.png"):
        load_image(path)


def test_missing_image_raises_data_error(tmp_path):
    with pytest.raises(DataError, match="nope.png: image file not found"):
        load_image(tmp_path / "nope.png")


def test_rle_string_decoder_matches_pycocotools():
    rng = np.random.default_rng(0)
    for _ in range(50):
        mask = np.asfortranarray(rng.random((17, 23)) < rng.random(), dtype=np.uint8)
        rle = mask_utils.encode(mask)
        counts = _rle_string_counts(rle["counts"].decode())
        rebuilt = mask_utils.frPyObjects({"size": [17, 23], "counts": counts}, 17, 23)
        assert rebuilt["counts"] == rle["counts"]


def test_rle_problems():
    assert rle_problem({"size": [2, 2], "counts": [1, 2, 1]}, 2, 2) is None
    assert "cover 5 pixels" in rle_problem({"size": [2, 2], "counts": [1, 2, 2]}, 2, 2)
    assert "negative" in rle_problem({"size": [2, 2], "counts": [5, -1]}, 2, 2)
    assert "does not match" in rle_problem({"size": [3, 2], "counts": [6]}, 2, 2)
    assert "malformed" in rle_problem({"size": [2, 2], "counts": "0`"}, 2, 2)  # truncated
    with pytest.raises(ValueError, match="cover"):
        decode_segmentation({"size": [2, 2], "counts": "9"}, 2, 2)


@pytest.mark.filterwarnings("ignore:__array__:DeprecationWarning")  # pycocotools
def test_decode_segmentation_matches_pycocotools():
    rng = np.random.default_rng(1)
    polygons = [[2.5, 1, 20, 3, 11, 14.2], [1, 1, 1, 1, 1, 1], [0, 9, 5, 9, 5, 13, 0, 13]]
    rle = mask_utils.merge(mask_utils.frPyObjects([polygons[0], polygons[2]], 15, 21))
    np.testing.assert_array_equal(decode_segmentation(polygons, 15, 21), mask_utils.decode(rle))
    mask = np.asfortranarray(rng.random((15, 21)) < 0.3, dtype=np.uint8)
    compressed = mask_utils.encode(mask)
    np.testing.assert_array_equal(decode_segmentation(compressed, 15, 21), mask)
    text = {"size": [15, 21], "counts": compressed["counts"].decode()}
    np.testing.assert_array_equal(decode_segmentation(text, 15, 21), mask)
    assert not decode_segmentation([[0, 0, 1, 1]], 15, 21).any()  # degenerate: skipped


@pytest.mark.filterwarnings("ignore:__array__:DeprecationWarning")  # pycocotools
def test_decode_segmentation_at_the_image_s_size_or_resized():
    rng = np.random.default_rng(2)
    for k in range(60):
        height, width = (int(v) for v in rng.integers(1, 40, 2))
        mask = np.zeros((height, width), np.uint8)
        if k % 3 == 0:
            mask[:] = rng.random((height, width)) < 0.3
        elif k % 3 == 1:  # a block, up to the last row and column
            y, x = rng.integers(0, height), rng.integers(0, width)
            mask[y:, x:] = 1
        rle = mask_utils.encode(np.asfortranarray(mask))
        np.testing.assert_array_equal(decode_segmentation(rle, height, width), mask)
        size = tuple(int(v) for v in rng.integers(1, 60, 2))
        nearest = nnf.interpolate(torch.from_numpy(mask)[None, None], size, mode="nearest")
        np.testing.assert_array_equal(decode_segmentation(rle, height, width, size), nearest[0, 0])
    # Polygons are drawn at the size asked: close to the full-size drawing resized.
    polygon = [[10.5, 4, 150, 30, 90, 110.2, 5, 70]]
    full = torch.from_numpy(decode_segmentation(polygon, 120, 160))
    small = decode_segmentation(polygon, 120, 160, (30, 40))
    resized = nnf.interpolate(full[None, None].float(), (30, 40), mode="area")[0, 0] > 0.5
    assert small.shape == (30, 40) and (small == resized.numpy()).mean() > 0.97


@pytest.fixture
def dataset_files(tmp_path):
    """Two 8x6 images: non-contiguous category ids, polygon, both RLE kinds, a crowd."""
    h, w = 6, 8
    (tmp_path / "img").mkdir()
    for name, colour in (("a.png", (255, 0, 0)), ("b.png", (0, 255, 0))):
        Image.new("RGB", (w, h), colour).save(tmp_path / "img" / name)
    square = np.zeros((h, w), np.uint8)
    square[1:4, 2:6] = 1
    compressed = mask_utils.encode(np.asfortranarray(square))["counts"].decode()
    column = np.zeros((h, w), np.uint8)
    column[:, 7] = 1
    uncompressed = _run_lengths(column)
    data = {
        "images": [
            {"id": 40, "file_name": "a.png", "width": w, "height": h},
            {"id": 9, "file_name": "b.png", "width": w, "height": h},
        ],
        "categories": [{"id": 90, "name": "late"}, {"id": 5, "name": "early"}],
        "annotations": [
            {"id": 1, "image_id": 40, "category_id": 90, "bbox": [0, 0, 4, 4], "area": 16,
             "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]], "iscrowd": 0},
            {"id": 2, "image_id": 40, "category_id": 5, "bbox": [2, 1, 4, 3], "area": 12,
             "segmentation": {"size": [h, w], "counts": compressed}, "iscrowd": 0},
            {"id": 3, "image_id": 40, "category_id": 5, "bbox": [7, 0, 1, 6], "area": 6,
             "segmentation": {"size": [h, w], "counts": uncompressed}, "iscrowd": 1},
            {"id": 4, "image_id": 40, "category_id": 5, "bbox": [7, 0, 1, 6], "area": 6,
             "segmentation": {"size": [h, w], "counts": uncompressed}, "iscrowd": 0},
        ],
    }  # fmt: skip
    (tmp_path / "ann.json").write_text(json.dumps(data))
    return tmp_path / "ann.json", tmp_path / "img", {"square": square, "column": column}


def _run_lengths(mask):
    """Uncompressed COCO RLE counts (column-major, starting with zeros)."""
    flat = mask.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    return counts if flat[0] == 0 else [0, *counts]


def test_category_mapping_is_contiguous_and_sorted(dataset_files):
    ann, img, _ = dataset_files
    ds = CocoDataset(ann, img)
    assert ds.categories == [{"id": 5, "name": "early"}, {"id": 90, "name": "late"}]
    assert ds.cat_id_to_label == {5: 1, 90: 2}
    assert ds.label_to_cat_id == {1: 5, 2: 90}
    assert ds.class_names == ["early", "late"]
    assert ds.num_classes == 3
    assert len(ds.coco.getAnnIds(imgIds=[40], iscrowd=None)) == 4  # crowd kept for evaluation


@pytest.mark.filterwarnings("ignore:__array__:DeprecationWarning")  # pycocotools
def test_getitem_decodes_polygon_and_rle_and_drops_crowd(dataset_files):
    ann, img, expected = dataset_files
    image, target = CocoDataset(ann, img)[0]
    assert isinstance(image, tv_tensors.Image) and image.dtype == torch.uint8
    assert image.shape == (3, 6, 8) and image[0].eq(255).all() and image[1].eq(0).all()
    assert target["image_id"] == 40
    assert target["labels"].tolist() == [2, 1, 1]
    assert target["iscrowd"].tolist() == [0, 0, 0]
    assert target["area"].tolist() == [16, 12, 6]
    boxes = target["boxes"]
    assert isinstance(boxes, tv_tensors.BoundingBoxes) and boxes.dtype == torch.float32
    assert boxes.format == tv_tensors.BoundingBoxFormat.XYXY and boxes.canvas_size == (6, 8)
    assert boxes.tolist() == [[0, 0, 4, 4], [2, 1, 6, 4], [7, 0, 8, 6]]
    masks = target["masks"]
    assert isinstance(masks, tv_tensors.Mask) and masks.dtype == torch.uint8
    assert masks.shape == (3, 6, 8)
    square = mask_utils.frPyObjects([[0, 0, 4, 0, 4, 4, 0, 4]], 6, 8)
    np.testing.assert_array_equal(masks[0], mask_utils.decode(mask_utils.merge(square)))
    np.testing.assert_array_equal(masks[1], expected["square"])
    np.testing.assert_array_equal(masks[2], expected["column"])


@pytest.mark.filterwarnings("ignore:__array__:DeprecationWarning")  # pycocotools
def test_a_larger_image_than_max_size_loads_at_it_with_its_boxes_and_masks(dataset_files):
    ann, img, _ = dataset_files
    image, target = CocoDataset(ann, img)[0]
    for max_size in (8, 100):  # the image's long side or more: as without
        same, again = CocoDataset(ann, img, max_size=max_size)[0]
        assert torch.equal(same, image) and torch.equal(again["masks"], target["masks"])
    small, scaled = CocoDataset(ann, img, max_size=4)[0]  # 8x6 -> 4x3
    assert small.shape == (3, 3, 4) and scaled["boxes"].canvas_size == (3, 4)
    torch.testing.assert_close(scaled["boxes"], target["boxes"] / 2)
    assert torch.equal(scaled["area"], target["area"])  # the annotations'
    nearest = nnf.interpolate(target["masks"][None], (3, 4), mode="nearest")[0]
    assert torch.equal(scaled["masks"][1:], nearest[1:])  # RLE: resized as torch does
    assert scaled["masks"][0].sum() == 4  # the polygon [0, 4] x [0, 4], drawn at half size


def test_image_without_annotations_gives_empty_targets(dataset_files):
    ann, img, _ = dataset_files
    _, target = CocoDataset(ann, img)[1]
    assert target["image_id"] == 9
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert target["masks"].shape == (0, 6, 8)
    _, target = CocoDataset(ann, img, masks=False)[1]
    assert "masks" not in target and target["boxes"].shape == (0, 4)


def test_degenerate_boxes_are_not_targets(dataset_files):
    ann, img, _ = dataset_files
    data = json.loads(ann.read_text())
    data["annotations"][0]["bbox"] = [3, 3, 0, 2]
    ann.write_text(json.dumps(data))
    _, target = CocoDataset(ann, img)[0]
    assert target["labels"].tolist() == [1, 1] and target["masks"].shape[0] == 2


def test_annotations_without_a_usable_polygon_are_left_out_of_mask_targets(dataset_files, caplog):
    """An empty mask would teach Mask R-CNN that the object has no pixels: such annotations
    are dropped whole (box, label, area, mask), said once when the data set is built."""
    ann, img, _ = dataset_files
    data = json.loads(ann.read_text())
    data["annotations"][1]["segmentation"] = []  # id 2
    data["annotations"][3]["segmentation"] = [[1, 1, 5, 5]]  # id 4: two points
    ann.write_text(json.dumps(data))
    with caplog.at_level("WARNING", logger="spinedet.data.coco"):
        ds = CocoDataset(ann, img)
        _, target = ds[0]
        ds[0]
    (record,) = caplog.records  # once, when built
    assert record.getMessage() == (
        f"{ann}: 2 annotations (ids 2, 4) have a segmentation without a usable polygon: they "
        "are left out of Mask R-CNN training"
    )
    assert target["labels"].tolist() == [2] and target["area"].tolist() == [16]
    assert target["boxes"].tolist() == [[0, 0, 4, 4]] and target["iscrowd"].tolist() == [0]
    assert target["masks"].shape == (1, 6, 8) and target["masks"][0].sum() == 16

    caplog.clear()
    with caplog.at_level("WARNING", logger="spinedet.data.coco"):
        _, target = CocoDataset(ann, img, masks=False)[0]
    assert not caplog.records  # boxes-only models train on every box
    assert target["labels"].tolist() == [2, 1, 1] and "masks" not in target


def test_transforms_are_applied(dataset_files):
    ann, img, _ = dataset_files
    calls = []

    def record(image, target):
        calls.append(target["image_id"])
        return image.flip(-1), target

    image, _ = CocoDataset(ann, img, transforms=record)[0]
    assert calls == [40] and image[0, 0, 0] == 255


def test_collate_returns_lists(dataset_files):
    ann, img, _ = dataset_files
    ds = CocoDataset(ann, img)
    images, targets = collate([ds[0], ds[1]])
    assert isinstance(images, list) and isinstance(targets, list)
    assert [t["image_id"] for t in targets] == [40, 9] and images[1].shape == (3, 6, 8)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("categories"), "needs 'images' and 'categories'"),
        (lambda d: d["annotations"][0].update(category_id=77), r"unknown category ids \[77\]"),
        (lambda d: d["categories"].append({"id": 5, "name": "again"}), "not unique"),
        (lambda d: d["annotations"][0].pop("segmentation"), "no segmentation"),
        # A boxes-only export's empty lists, and a crowd without its region (COCO's mask
        # evaluation reads it): refused before training, not an empty mask or a late crash.
        (
            lambda d: [a.update(segmentation=[]) for a in d["annotations"]],
            r"4 annotations \(ids 1, 2, 3, 4\) have no segmentation; .*train a _fasterrcnn or _ret",
        ),
        (lambda d: d["annotations"][2].pop("segmentation"), r"\(ids 3\) have no segm"),
        (
            lambda d: d["images"].append({**d["images"][0], "file_name": "b.png"}),
            "image ids are not unique: 40",
        ),
        # Names key the class list and the per-class metrics: one would hide the other.
        (lambda d: d["categories"][0].update(name="early"), "category names are not unique: early"),
    ],
)
def test_invalid_json_fails_fast(dataset_files, edit, message):
    ann, img, _ = dataset_files
    data = json.loads(ann.read_text())
    edit(data)
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError, match=message):
        CocoDataset(ann, img)


def test_a_model_s_categories_number_the_labels_and_others_are_refused(dataset_files):
    """A validation file listing fewer categories than training's keeps training's labels;
    one listing a category the model lacks is refused when loaded, not at its first loss."""
    ann, img, _ = dataset_files
    model = [{"id": 1, "name": "first"}, {"id": 5, "name": "early"}, {"id": 90, "name": "late"}]
    ds = CocoDataset(ann, img, categories=model)
    assert ds.cat_id_to_label == {1: 1, 5: 2, 90: 3} and ds.class_names == [
        "first",
        "early",
        "late",
    ]
    assert ds[0][1]["labels"].tolist() == [3, 2, 2]
    with pytest.raises(DataError, match=r"ann\.json: category ids \[90\] are not among the mod"):
        CocoDataset(ann, img, categories=model[:2])


def test_boxes_only_dataset_needs_no_segmentation(dataset_files):
    ann, img, _ = dataset_files
    data = json.loads(ann.read_text())
    for a in data["annotations"]:
        a.pop("segmentation")
    ann.write_text(json.dumps(data))
    assert CocoDataset(ann, img, masks=False)[0][1]["labels"].tolist() == [2, 1, 1]


def test_malformed_rle_raises_data_error_with_annotation_id(dataset_files):
    ann, img, _ = dataset_files
    data = json.loads(ann.read_text())
    data["annotations"][1]["segmentation"]["counts"] = "zzzz"
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"ann\.json: annotation 2: RLE"):
        CocoDataset(ann, img)[0]


def test_image_size_mismatch_raises_data_error(dataset_files):
    ann, img, _ = dataset_files
    Image.new("RGB", (9, 6)).save(img / "b.png")
    with pytest.raises(DataError, match=r"b\.png: image is 9x6 but the annotations say 8x6"):
        CocoDataset(ann, img)[1]


def test_unparsable_json_raises_data_error(tmp_path):
    (tmp_path / "bad.json").write_text('{"images": [\n  {"id": 1,}\n]}')
    with pytest.raises(DataError, match=r"bad\.json: invalid JSON at line 2, column 12"):
        CocoDataset(tmp_path / "bad.json", tmp_path)


def test_data_error_is_one_line_and_survives_worker_reraise():
    error = DataError("cannot decode image: bad\nheader", "x.png")
    assert str(error) == "x.png: cannot decode image: bad header"
    assert (error.file, error.reason) == ("x.png", "cannot decode image: bad header")
    assert str(pickle.loads(pickle.dumps(error))) == str(error)
    # torch's DataLoader rebuilds worker errors as type(error)(traceback_text)
    assert str(DataError("Traceback:\n  line")) == "Traceback:\n  line"


@pytest.mark.parametrize("name", ["../a.png", "/etc/passwd", "x/../../a.png"])
def test_dataset_refuses_file_names_outside_the_image_folder(dataset_files, name):
    ann, img, _ = dataset_files
    data = json.loads(ann.read_text())
    data["images"][1]["file_name"] = name
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError) as info:
        CocoDataset(ann, img)
    assert str(info.value) == (
        f"{ann}: 1 images (ids 9) have file names outside the image directory {img}; "
        "use paths relative to it"
    )


def test_dataset_without_images_is_refused(dataset_files):
    ann, img, _ = dataset_files
    data = json.loads(ann.read_text())
    data["images"], data["annotations"] = [], []
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"ann\.json: the data set has no images$"):
        CocoDataset(ann, img)


def _with_truncated_jpeg(shapes, tmp_path):
    """A copy of the shapes train split whose first image is a JPEG cut in half."""
    data = json.loads(shapes["train"].read_text())
    first = data["images"][0]
    images = tmp_path / "images"
    shutil.copytree(shapes["images"], images)
    jpeg = images / "cut.jpg"
    Image.open(images / first["file_name"]).save(jpeg, quality=90)
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    first["file_name"] = "cut.jpg"
    (tmp_path / "train.json").write_text(json.dumps(data))
    return tmp_path / "train.json", images, first


def test_undecodable_image_stands_as_blank_and_is_logged_once(shapes, tmp_path, caplog):
    ann, images, first = _with_truncated_jpeg(shapes, tmp_path)
    ds = CocoDataset(ann, images)
    with caplog.at_level("WARNING", logger="spinedet.data.coco"):
        for _ in range(2):
            image, target = ds[0]
            assert image.shape == (3, first["height"], first["width"]) and not image.any()
            assert target["image_id"] == first["id"] and target["boxes"].shape == (0, 4)
            assert target["labels"].numel() == 0 and target["masks"].shape[0] == 0
    (record,) = caplog.records  # once per image, not once per epoch
    assert record.getMessage().startswith(f"skipping image {first['id']} (")
    assert f"{images / 'cut.jpg'}: cannot decode image: image file is truncated" in record.message
    _, other = ds[1]  # the rest of the set is untouched
    assert other["boxes"].shape[0] == len(ds.coco.imgToAnns[ds.ids[1]])


def test_loader_workers_run_past_an_undecodable_image_with_augmentation(shapes, tmp_path):
    """What training does: augmented samples from a DataLoader worker, batched by collate."""
    ann, images, first = _with_truncated_jpeg(shapes, tmp_path)
    ds = CocoDataset(ann, images, train_transforms(64, (0.8, 1.25), 0.5))
    loader = DataLoader(ds, batch_size=3, num_workers=1, collate_fn=collate)
    targets = [t for _, batch in loader for t in batch]
    assert [t["image_id"] for t in targets] == ds.ids
    assert targets[0]["image_id"] == first["id"] and targets[0]["boxes"].shape == (0, 4)
    assert all(t["boxes"].shape[0] > 0 for t in targets[1:])


def _reference_target(ds, index):
    """What the dataset gave before its compact index: targets read from pycocotools' index."""
    image_id = ds.ids[index]
    info = ds.coco.imgs[image_id]
    height, width = info["height"], info["width"]
    anns = [
        a
        for a in ds.coco.imgToAnns[image_id]
        if not a.get("iscrowd", 0) and not regionless(a["segmentation"])
    ]
    boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    keep = ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).tolist()
    anns = [a for a, k in zip(anns, keep, strict=True) if k]
    masks = [decode_segmentation(a["segmentation"], height, width) for a in anns]
    return {
        "image_id": image_id,
        "boxes": boxes[torch.tensor(keep, dtype=torch.bool)],
        "labels": torch.tensor([ds.cat_id_to_label[a["category_id"]] for a in anns]),
        "area": torch.tensor([float(a.get("area", 0.0)) for a in anns], dtype=torch.float32),
        "masks": torch.from_numpy(np.array(masks, np.uint8).reshape(-1, height, width)),
    }


def _assert_same_targets(ds):
    for index in range(len(ds)):
        _, target = ds[index]
        expected = _reference_target(ds, index)
        assert target["image_id"] == expected["image_id"]
        assert type(target["image_id"]) is int
        for key in ("boxes", "labels", "area", "masks"):
            assert target[key].dtype == expected[key].dtype, key
            assert torch.equal(target[key].as_subclass(torch.Tensor), expected[key]), key
        assert target["iscrowd"].tolist() == [0] * len(target["labels"])


@pytest.mark.filterwarnings("ignore:__array__:DeprecationWarning")  # pycocotools
def test_samples_match_pycocotools_index_on_shapes(shapes):
    ds = CocoDataset(shapes["annotations"], shapes["images"])
    assert len(ds) == 12
    _assert_same_targets(ds)


@pytest.mark.filterwarnings("ignore:__array__:DeprecationWarning")  # pycocotools
def test_samples_match_pycocotools_index_with_rle_crowd_and_odd_polygons(dataset_files):
    ann, img, _ = dataset_files
    data = json.loads(ann.read_text())
    odd = [
        [[1, 1, 5, 1, 5, 5, 1, 5], [0, 0, 1, 1, 2, 2]],  # second polygon has no area: skipped
        [[1.25, 0.5, 7.75, 0.5, 7.75, 5.5], [True, 0, 3, 0, 3, 3]],  # a boolean: not a number
        [],  # no polygon at all: left out
    ]
    for k, segmentation in enumerate(odd):
        data["annotations"].append(
            {"id": 10 + k, "image_id": 9, "category_id": 90, "bbox": [1, 0.5, 6.5, 5],
             "area": 7.5 + k, "segmentation": segmentation, "iscrowd": 0}
        )  # fmt: skip
    ann.write_text(json.dumps(data))
    ds = CocoDataset(ann, img)
    _assert_same_targets(ds)
    assert [len(ds[i][1]["labels"]) for i in range(2)] == [3, 2]


def test_index_holds_no_per_annotation_python_objects(tmp_path):
    """Python containers per sample would be copied into every worker as it reads them."""
    counts = {}
    for n in (10, 300):
        data = {
            "images": [{"id": i, "file_name": "x.png", "width": 9, "height": 9} for i in range(n)],
            "categories": [{"id": 1, "name": "a"}],
            "annotations": [
                {"id": k, "image_id": k // 3, "category_id": 1, "bbox": [1, 1, 4, 4], "area": 8,
                 "segmentation": [[1, 1, 5, 1, 5, 5]], "iscrowd": 0}
                for k in range(3 * n)
            ],
        }  # fmt: skip
        (tmp_path / f"{n}.json").write_text(json.dumps(data))
        ds = CocoDataset(tmp_path / f"{n}.json", tmp_path)
        arrays = vars(ds.index).values()
        assert all(isinstance(v, np.ndarray) and v.dtype != object for v in arrays)
        containers = [v for v in vars(ds).values() if isinstance(v, list | dict | set | tuple)]
        counts[n] = sum(len(v) for v in containers)
        assert ds._coco is None  # built only for evaluation
    assert counts[300] == counts[10]  # categories only, whatever the number of samples


def test_coco_index_is_built_lazily_and_never_pickled(dataset_files):
    ann, img, _ = dataset_files
    ds = CocoDataset(ann, img)
    ds[0]
    assert ds._coco is None
    assert len(ds.coco.getAnnIds(iscrowd=None)) == 4 and ds._coco is not None
    copy = pickle.loads(pickle.dumps(ds))
    assert copy._coco is None and torch.equal(copy[0][1]["labels"], ds[0][1]["labels"])
    assert copy.coco.getImgIds() == ds.coco.getImgIds()


def test_malformed_box_fails_fast_naming_the_file(dataset_files):
    ann, img, _ = dataset_files
    data = json.loads(ann.read_text())
    data["annotations"][0]["bbox"] = [1, 2, 3]
    ann.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"ann\.json: malformed images or annotations \(run"):
        CocoDataset(ann, img)


def test_a_category_the_model_names_otherwise_is_refused(dataset_files):
    """Evaluating a model on a file whose ids mean other classes would silently score one
    class's detections against another's objects; an unnamed model's names (its ids) match."""
    ann, img, _ = dataset_files
    swapped = [{"id": 5, "name": "late"}, {"id": 90, "name": "early"}]
    with pytest.raises(DataError, match=r"5 is 'early' here but 'late' in the model, 90 is"):
        CocoDataset(ann, img, categories=swapped)
    unnamed = [{"id": 5, "name": "5"}, {"id": 90, "name": "90"}]
    assert CocoDataset(ann, img, categories=unnamed).class_names == ["5", "90"]
    renumbered = [{"id": 6, "name": "early"}, {"id": 91, "name": "late"}]
    with pytest.raises(DataError, match=r"numbers them otherwise \('early' is 6, 'late' is 91"):
        CocoDataset(ann, img, categories=renumbered)
