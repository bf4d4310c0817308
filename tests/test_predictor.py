"""spinedet.Predictor: every input type, the data set's ids, the optimised model, huge and
thin images."""

import itertools
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from itertools import count, islice

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL
from PIL import Image
from pycocotools import mask as mask_utils
from torch.nn import functional as F
from torchvision.ops import box_iou

import spinedet
from spinedet.errors import SpinedetError
from spinedet.models import Category, ModelDescription
from spinedet.predictor import default_device, tile_origins, to_image_tensor

CATEGORIES = [{"id": 3, "name": "circle"}, {"id": 7, "name": "square"}]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = spinedet.create_model("spinenet49s_maskrcnn", categories=CATEGORIES, image_size=64,
                                  box_score_thresh=0.0, **TINY_MODEL)  # fmt: skip
    path = tmp_path_factory.mktemp("weights") / "best.safetensors"
    spinedet.save_weights(model, path)
    return path


@pytest.fixture(scope="module")
def predictor(weights):
    return spinedet.Predictor(weights.parent, device="cpu", score_threshold=0.0)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)


def test_every_input_type_gives_the_same_detections(predictor, image, tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(image).save(path)
    chw = torch.from_numpy(image).permute(2, 0, 1)
    inputs = {
        "path": path,
        "str": str(path),
        "pil": Image.fromarray(image),
        "numpy": image,
        "uint8 tensor": chw,
        "float tensor": chw.float() / 255,
    }
    ref = predictor(image)
    assert len(ref) > 0 and ref.image_size == (48, 64)
    for name, x in inputs.items():
        got = predictor(x)
        assert torch.allclose(got.boxes, ref.boxes, atol=1e-4), name
        assert torch.allclose(got.scores, ref.scores, atol=1e-5), name
    bgr = predictor(np.ascontiguousarray(image[:, :, ::-1]), bgr=True)
    assert torch.equal(bgr.boxes, ref.boxes)
    batch = predictor([path, image, chw])
    assert len(batch) == 3
    assert all(torch.allclose(d.boxes, ref.boxes, atol=1e-4) for d in batch)
    # Stacked batches (a DataLoader's NCHW tensor, an NHWC array): one result per image.
    for stacked in (torch.stack([chw, chw.flip(2)]), np.stack([image, image[:, ::-1]])):
        first, flipped = predictor(stacked)
        assert torch.allclose(first.boxes, ref.boxes, atol=1e-4)
        assert flipped.image_size == ref.image_size


def test_image_dtypes_are_converted_or_refused_in_one_line(predictor, image, recwarn):
    ref = predictor(image)
    chw = torch.from_numpy(image).permute(2, 0, 1)
    same = {
        "float64 array": image / 255,
        "float64 tensor": chw.double() / 255,
        "int64 array": image.astype(np.int64),
        "int32 tensor": chw.int(),
        "uint16 array": image.astype(np.uint16) * 257,  # 16 bit: 65535 is white
        "read-only array": np.asarray(Image.fromarray(image)),
    }
    for name, x in same.items():
        got = predictor(x)
        assert len(got) == len(ref), name
        assert torch.allclose(got.scores, ref.scores, atol=1e-4), name
    # Half precision rounds the pixels (and so the random model's detections): compare inputs.
    for half in ((image / 255).astype(np.float16), (chw.float() / 255).bfloat16()):
        got = to_image_tensor(half)
        assert got.dtype == torch.float32 and torch.allclose(got, chw / 255, atol=4e-3)
    assert not [w for w in recwarn if "not writable" in str(w.message)]
    with pytest.raises(
        SpinedetError, match=r"float image with values 0\.\.255: pass uint8 0\.\.255"
    ):
        predictor(image.astype(np.float32))
    with pytest.raises(SpinedetError, match=r"torch.int64 image with values -1\.\.255"):
        predictor(np.concatenate([image.astype(np.int64), np.full((1, 64, 3), -1)]))
    with pytest.raises(SpinedetError, match="numpy image of dtype bool"):
        predictor(image > 128)
    with pytest.raises(SpinedetError, match="image of dtype torch.bool"):
        predictor(chw > 128)


def test_16_bit_pil_image_is_scaled_like_a_16_bit_file(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    pil = to_image_tensor(Image.fromarray(values))
    assert torch.equal(pil, to_image_tensor(tmp_path / "g16.png"))
    assert pil[0].tolist() == [[0, 1, 128, 255]]
    assert torch.allclose(to_image_tensor(values) * 255, pil.float())


def test_rgba_array_is_composited_on_black_like_an_rgba_file(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 256, (5, 6, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    from_file = to_image_tensor(tmp_path / "a.png")
    assert torch.equal(to_image_tensor(rgba), from_file)
    assert torch.equal(to_image_tensor(rgba[:, :, [2, 1, 0, 3]], bgr=True), from_file)
    floats = to_image_tensor(rgba.astype(np.float32) / 255)
    assert (floats * 255 - from_file.float()).abs().max() <= 0.5 + 1e-4  # PIL rounds


def test_category_ids_names_and_masks(predictor, image, weights):
    det = predictor(image)
    assert set(det.category_ids) <= {3, 7}
    assert det.names == [{3: "circle", 7: "square"}[c] for c in det.category_ids]
    assert det.masks.dtype == torch.bool and det.masks.shape == (len(det), 48, 64)
    rle = spinedet.Predictor(weights, device="cpu", score_threshold=0.0, masks="rle")(image)
    assert len(rle.masks) == len(det)
    decoded = mask_utils.decode(rle.masks[0])
    assert np.array_equal(decoded.astype(bool), det.masks[0].numpy())
    entries = det.to_coco(5)
    assert entries[0]["image_id"] == 5 and entries[0]["category_name"] in ("circle", "square")
    json.dumps(entries)


def test_optimised_model_equals_plain_model(weights, image):
    fast = spinedet.Predictor(weights, device="cpu", score_threshold=0.0)(image)
    plain = spinedet.Predictor(weights, device="cpu", score_threshold=0.0, optimize=False)(image)
    assert len(fast) == len(plain) > 0
    assert torch.allclose(fast.boxes, plain.boxes, atol=1e-4)
    assert torch.allclose(fast.scores, plain.scores, atol=1e-4)
    assert fast.labels.tolist() == plain.labels.tolist()


def test_plain_model_matches_torchvision_output(weights, image):
    predictor = spinedet.Predictor(weights, device="cpu", score_threshold=0.0, optimize=False)
    det = predictor(image)
    tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    with torch.no_grad():
        raw = spinedet.load_model(weights).eval()([tensor])[0]
    assert torch.allclose(det.boxes, raw["boxes"], atol=1e-4)


def test_huge_image_is_resized_before_the_model(predictor, monkeypatch):
    seen = []
    model = predictor.model
    monkeypatch.setattr(predictor, "model", lambda xs: seen.extend(xs) or model(xs))
    image = np.zeros((4000, 4000, 3), dtype=np.uint8)
    image[1000:3000, 1000:3000] = 255
    det = predictor(image)
    assert max(seen[0].shape[-2:]) <= 64
    assert det.image_size == (4000, 4000) and det.masks.shape[-2:] == (4000, 4000)
    assert float(det.boxes.max()) <= 4000 and float(det.boxes.max()) > 64


def test_masks_of_a_resized_image_equal_the_model_s_masks_resized_whole(predictor):
    image = np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    det = predictor(image)
    with torch.no_grad():
        raw = predictor.model([predictor.prepare(to_image_tensor(image))])[0]
    assert raw["masks"].shape[-2:] == (48, 64)  # the model saw the image at its size, 64
    probs = raw["masks"][raw["scores"] >= predictor.score_threshold]
    expected = F.interpolate(probs, (300, 400), mode="bilinear")[:, 0] > 0.5
    assert len(det) > 0 and det.mask_crops is not None and torch.equal(det.masks, expected)
    rles = [mask_utils.encode(np.asfortranarray(m.numpy().astype(np.uint8))) for m in expected]
    counts = [r["counts"].decode() for r in rles]
    assert [e["segmentation"]["counts"] for e in det.to_coco(0)] == counts
    given = spinedet.Detections(det.boxes, det.scores, det.labels, det.category_ids, det.names,
                                det.image_size, expected)  # fmt: skip
    assert [e["segmentation"]["counts"] for e in given.to_coco(0)] == counts


@pytest.mark.parametrize("shape", [(1, 1000), (1000, 1), (3, 5)])
def test_thin_and_tiny_images(predictor, shape):
    det = predictor(np.full((*shape, 3), 128, dtype=np.uint8))
    assert det.image_size == shape and det.masks.shape[-2:] == shape
    assert bool((det.boxes[:, 2] <= shape[1]).all() and (det.boxes[:, 3] <= shape[0]).all())


def test_bad_inputs_are_one_line_errors(predictor, tmp_path, weights):
    with pytest.raises(SpinedetError, match="expected 3 x H x W"):
        predictor(torch.zeros(4, 8, 8))
    with pytest.raises(SpinedetError, match="an image of 0 x 0 pixels: empty"):
        predictor(np.zeros((0, 0, 3), np.uint8))
    with pytest.raises(SpinedetError, match="cannot read an image from a int"):
        predictor(3)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(SpinedetError, match="bad.png"):
        predictor(bad)
    backbone = tmp_path / "backbone.safetensors"
    spinedet.save_weights(spinedet.create_model("spinenet49s", filter_scale=0.25), backbone)
    with pytest.raises(SpinedetError, match="backbone"):
        spinedet.Predictor(backbone)


def test_default_device_names_a_device_this_machine_lacks_in_one_line():
    assert default_device("cpu") == torch.device("cpu")
    assert default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    for name in ("gpu", "cuda:x", "mps"):
        with pytest.raises(SpinedetError, match=f"device '{name}': expected cpu, cuda or cuda:N"):
            default_device(name)
    if not torch.cuda.is_available():
        with pytest.raises(SpinedetError, match="device 'cuda': no CUDA device is available"):
            default_device("cuda")
    with pytest.raises(SpinedetError, match="device 'cuda:99'"):
        default_device("cuda:99")


def _retinanet(**options):
    torch.manual_seed(0)
    return spinedet.create_model("spinenet49s_retinanet", categories=CATEGORIES, image_size=64,
                                 filter_scale=0.25, endpoint_filters=32, **options)  # fmt: skip


def test_a_threshold_below_the_model_s_own_keeps_those_detections(image):
    """A fresh RetinaNet scores about 0.01 (its prior), below torchvision's 0.05: asked for
    scores from 0, the Predictor returns them instead of silently none."""
    model = _retinanet()
    det = spinedet.Predictor(model, device="cpu", score_threshold=0.0, optimize=False)(image)
    assert len(det) > 0 and float(det.scores.max()) < 0.05
    assert model.score_thresh == 0.05  # lowered only while the Predictor ran it
    assert len(spinedet.Predictor(model, device="cpu", score_threshold=0.05)(image)) == 0
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(SpinedetError, match="use a score in 0..1"):
            spinedet.Predictor(model, device="cpu", score_threshold=bad)


def test_max_detections_keeps_the_best_under_or_over_the_model_s_own_cap(image):
    model = _retinanet(detections_per_img=50)  # of 181 detections at a threshold of 0

    def run(**options) -> spinedet.Detections:
        predictor = spinedet.Predictor(model, device="cpu", score_threshold=0.0, optimize=False,
                                       **options)  # fmt: skip
        return predictor(image)

    own = run()
    assert len(own) == 50
    few, more = run(max_detections=3), run(max_detections=150)
    assert torch.equal(few.scores, own.scores[:3]) and torch.equal(few.boxes, own.boxes[:3])
    assert len(more) == 150 and torch.equal(more.scores[:50], own.scores)
    assert model.detections_per_img == 50  # a model given is left as it was
    for bad in (0, -2, 2.5, True, "3"):
        with pytest.raises(SpinedetError, match="max_detections=.*: use a positive integer"):
            spinedet.Predictor(model, device="cpu", max_detections=bad)


def test_predictors_sharing_a_model_in_threads_each_get_their_own_settings(weights, image):
    """Three Predictors on one plain model, run from three threads, all inside the model's
    post-processing at once: each gets what it gets alone, and the model keeps its own."""
    model = spinedet.load_model(weights)
    heads = model.roi_heads
    settings = [{"max_detections": 3}, {"classes": "square", "nms_threshold": 0.2}, {}]
    predictors = [spinedet.Predictor(model, device="cpu", score_threshold=0.0, optimize=False,
                                     **options) for options in settings]  # fmt: skip
    alone = [p(image) for p in predictors]
    assert [len(d) for d in alone] != [len(alone[0])] * 3  # settings that change the result
    together = threading.Barrier(3, timeout=60)
    own = type(heads).postprocess_detections

    def meeting(*args):  # every thread's selection starts once all are in it
        together.wait()
        return own(heads, *args)

    heads.postprocess_detections = meeting
    with ThreadPoolExecutor(3) as pool:
        shared = list(pool.map(lambda p: p(image), predictors))
    del heads.postprocess_detections
    for a, b in zip(alone, shared, strict=True):
        assert a.category_ids == b.category_ids and torch.equal(a.boxes, b.boxes)
    assert heads.detections_per_img == 100 and heads.kept_labels is None
    assert heads.nms_thresh == 0.5


def test_image_size_runs_the_model_at_another_size(weights, image):
    options = {"device": "cpu", "score_threshold": 0.0}
    small = spinedet.Predictor(weights, image_size=32, **options)
    assert small.image_size == 32
    built = spinedet.Predictor(spinedet.load_model(weights, image_size=32), **options)
    assert torch.equal(small(image).boxes, built(image).boxes)
    own = spinedet.Predictor(weights, **options)
    assert own.image_size == 64 and not torch.equal(small(image).boxes, own(image).boxes)
    with pytest.raises(SpinedetError, match="image_size: give the weights' path"):
        spinedet.Predictor(spinedet.load_model(weights), image_size=32, **options)


@pytest.mark.parametrize(
    ("height", "width", "tile", "overlap"),
    [(200, 300, 64, 0.2), (64, 64, 64, 0.2), (50, 300, 64, 0.5), (1000, 1001, 640, 0.0)],
)
def test_tiles_cover_the_image_from_border_to_border_and_overlap(height, width, tile, overlap):
    origins = list(tile_origins(height, width, tile, overlap))
    covered = torch.zeros(height, width, dtype=torch.bool)
    for y, x in origins:
        covered[y : y + tile, x : x + tile] = True
    assert covered.all()
    for starts, length in (({y for y, _ in origins}, height), ({x for _, x in origins}, width)):
        starts = sorted(starts)
        assert starts[0] == 0 and starts[-1] == max(0, length - tile)
        assert all(0 < b - a <= tile * (1 - overlap) for a, b in itertools.pairwise(starts))
    assert len(origins) == len(set(origins))


@pytest.mark.parametrize("whole", [False, True])
def test_tiled_detections_are_those_of_each_view_merged(weights, whole, caplog):
    """Each view (the image whole with ``tile_whole``, its tiles) alone, boxes and masks moved
    to where the view lies, then merged best first, those within 2% of a tile of a tile's
    inner border after all others: a detection drops the others of its class from other views
    that it covers, or that cover it, by half of the smaller box. An image no larger than a
    tile is detected as without tiles."""
    model = spinedet.load_model(weights)
    big = np.random.default_rng(1).integers(0, 256, (150, 200, 3), dtype=np.uint8)
    options = {"device": "cpu", "score_threshold": 0.0, "optimize": False, "batch_size": 1}
    tiled = spinedet.Predictor(model, tile=64, tile_whole=whole, **options)(big)
    plain = spinedet.Predictor(model, **options)
    views = [(y, x, plain(big[y : y + 64, x : x + 64])) for y, x in tile_origins(150, 200, 64, 0.2)]
    views = [(0, 0, plain(big))] * whole + views
    assert len(views) == 12 + whole
    found = []  # (score, view, label, box, mask, cut) in the image
    for v, (y, x, d) in enumerate(views):
        height, width = d.image_size
        for box, score, label, mask in zip(d.boxes, d.scores, d.labels, d.masks, strict=True):
            whole_mask = torch.zeros(150, 200, dtype=torch.bool)
            whole_mask[y : y + mask.shape[0], x : x + mask.shape[1]] = mask
            x0, y0, x1, y1 = box.tolist()
            cut = ((x > 0 and x0 <= 1.28) or (y > 0 and y0 <= 1.28)
                   or (x + width < 200 and x1 >= width - 1.28)
                   or (y + height < 150 and y1 >= height - 1.28))  # fmt: skip
            found.append((float(score), v, int(label), box + torch.tensor([x, y, x, y]),
                          whole_mask, cut))  # fmt: skip

    def covered(a: torch.Tensor, b: torch.Tensor) -> bool:
        inter = (torch.minimum(a[2:], b[2:]) - torch.maximum(a[:2], b[:2])).clamp(min=0).prod()
        smaller = min((a[2:] - a[:2]).prod(), (b[2:] - b[:2]).prod())
        return bool(inter / max(float(smaller), 1e-6) >= 0.5)

    def merged(order: list[int], any_class: bool) -> list[int]:
        kept: list[int] = []
        for i in order:
            if not any(found[k][1] != found[i][1] and covered(found[k][3], found[i][3])
                       and (found[k][2] == found[i][2]
                            or any_class and found[i][5] and not found[k][5])
                       for k in kept):  # fmt: skip
                kept.append(i)
        return kept

    order = sorted(range(len(found)), key=lambda i: (found[i][5], -found[i][0]))
    kept = merged(order, any_class=True)
    assert len(tiled) == len(kept) < len(found)  # pieces of the same objects were dropped
    assert kept != merged(sorted(range(len(found)), key=lambda i: -found[i][0]), False)  # cut last
    assert kept != merged(order, any_class=False)  # whole ones dropped pieces of other classes
    capped_kept = kept[:7]  # whole ones before pieces, then by score
    kept.sort(key=lambda i: -found[i][0])
    capped_kept.sort(key=lambda i: -found[i][0])
    assert torch.allclose(tiled.boxes, torch.stack([found[i][3] for i in kept]))
    assert tiled.scores.tolist() == [found[i][0] for i in kept]
    assert tiled.labels.tolist() == [found[i][2] for i in kept]
    assert torch.equal(tiled.masks, torch.stack([found[i][4] for i in kept]))
    capped = spinedet.Predictor(model, tile=64, tile_whole=whole, max_detections=7, **options)
    assert torch.allclose(capped(big).boxes, torch.stack([found[i][3] for i in capped_kept]))
    assert capped(big).scores.tolist() == [found[i][0] for i in capped_kept]
    small = np.ascontiguousarray(big[:64, :60])
    alone = spinedet.Predictor(model, tile=64, **options)(small)
    assert torch.equal(alone.boxes, plain(small).boxes)
    one = spinedet.Predictor(model, tile=64, max_detections=2, **options)(small)  # one view
    assert torch.equal(one.boxes, alone.boxes[:2])
    with pytest.raises(SpinedetError, match="tile=16: use a size in pixels, at least 32"):
        spinedet.Predictor(model, tile=16, **options)
    for unused in ({"tile_overlap": 0.3}, {"tile_whole": True}):  # silently unused otherwise
        with pytest.raises(SpinedetError, match="applies to tiles only; give a tile size too"):
            spinedet.Predictor(model, **unused, **options)
    with pytest.raises(SpinedetError, match=r"tile_overlap=1: use a fraction in 0..1 \(not 1\)"):
        spinedet.Predictor(model, tile=64, tile_overlap=1, **options)
    caplog.clear()
    spinedet.Predictor(model, tile=128, **options)  # the model's 64: tiles shrunk 2x
    assert "tiles of 128 px are shrunk 2.0x to the model's 64" in caplog.text
    with pytest.raises(SpinedetError, match="top_k: a detector gives detections, not classes"):
        spinedet.Predictor(model, top_k=3, **options)  # was ignored without a word
    bad = {"batch_size": 0, "score_threshold": "0.5"}  # no image at all; a TypeError deep inside
    for key, value in bad.items():
        with pytest.raises(SpinedetError, match=f"{value!r}: use a"):
            spinedet.Predictor(model, **(options | {key: value}))


def test_an_nms_threshold_suppresses_more_or_fewer_overlaps(weights, image):
    model = spinedet.load_model(weights)

    def run(nms: float | None) -> spinedet.Detections:
        return spinedet.Predictor(model, device="cpu", score_threshold=0.0, optimize=False,
                                  max_detections=1000, nms_threshold=nms)(image)  # fmt: skip

    own, strict, loose = run(None), run(0.1), run(0.9)
    assert len(strict) < len(own) < len(loose)
    assert torch.equal(run(0.5).boxes, own.boxes)  # the model's own is torchvision's 0.5
    ious = box_iou(strict.boxes, strict.boxes).fill_diagonal_(0)
    same_class = strict.labels[:, None] == strict.labels[None]
    assert float(ious[same_class].max()) <= 0.1  # no two of a class overlap by more
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(SpinedetError, match="nms_threshold=.*: use an IoU in 0..1"):
            spinedet.Predictor(model, device="cpu", nms_threshold=bad)


def test_a_class_filter_acts_before_the_cap_of_detections_per_image(weights, image):
    """The random Mask R-CNN's best 23 detections are circles: capped at 10, squares come only
    from a filter applied before the cap, and then they are the best 10 squares."""
    model = spinedet.load_model(weights)

    def run(**options) -> spinedet.Detections:
        predictor = spinedet.Predictor(model, device="cpu", score_threshold=0.0, optimize=False,
                                       **options)  # fmt: skip
        return predictor(image)

    every = run()
    squares = [i for i, c in enumerate(every.category_ids) if c == 7][:10]
    assert len(squares) == 10 and squares[0] >= 10 and 7 not in run(max_detections=10).category_ids
    for classes in (["square"], [7], "7", np.int64(7), ("7", "square")):
        got = run(classes=classes, max_detections=10)
        assert got.category_ids == [7] * 10 and got.names == ["square"] * 10, classes
        assert torch.equal(got.scores, every.scores[squares])
        assert torch.equal(got.boxes, every.boxes[squares])
        assert torch.equal(got.masks, every.masks[squares])
    assert model.roi_heads.kept_labels is None  # a model given is left as it was
    message = r"class {}: not one of the model's categories: circle \(3\), square \(7\)$"
    for unknown in ("triangle", "4", 4):
        with pytest.raises(SpinedetError, match=message.format(repr(unknown))):
            spinedet.Predictor(model, device="cpu", classes=[unknown])
    with pytest.raises(SpinedetError, match="classes: none given"):
        spinedet.Predictor(model, device="cpu", classes=[])


def test_a_retinanet_s_class_filter_acts_before_its_best_candidates_per_level(image):
    """A RetinaNet keeps each level's best ``topk_candidates`` (class, anchor) scores before
    NMS: the classes left out must not take those places either."""
    model = _retinanet(topk_candidates=10)
    every = spinedet.Predictor(model, device="cpu", score_threshold=0.0, optimize=False)(image)
    circles = spinedet.Predictor(model, device="cpu", score_threshold=0.0, optimize=False,
                                 classes="circle")(image)  # fmt: skip
    assert set(circles.names) == {"circle"}
    assert len(circles) > every.names.count("circle")


def test_classes_are_names_or_ids_and_one_that_is_both_is_refused():
    named = ModelDescription("spinenet", "49s", "retinanet",
                             categories=[Category(3, "7"), Category(7, "square")])  # fmt: skip
    assert named.labels_of([7, "3", "square", "square"]) == [2, 1]
    with pytest.raises(SpinedetError, match="class '7': the name of category 3 and the id of "
                       "category 7 \\('square'\\); give 3 or 'square'"):  # fmt: skip
        named.labels_of(["7"])
    unnamed = ModelDescription("spinenet", "49s", "retinanet",
                               categories=[Category(1, "1"), Category(2, "2")])  # fmt: skip
    assert unnamed.labels_of(["2", 1]) == [2, 1]
    with pytest.raises(SpinedetError, match="class True: not one"):
        unnamed.labels_of([True])


def test_a_string_of_classes_splits_at_commas_unless_it_is_one_whole_name():
    named = ModelDescription("spinenet", "49s", "retinanet",
                             categories=[Category(1, "car, sedan"), Category(2, "truck"),
                                         Category(5, "car")])  # fmt: skip
    assert named.labels_of(["car, sedan"]) == named.labels_of([" car, sedan "]) == [1]
    assert named.labels_of([" truck "]) == [2]
    assert named.labels_of(["truck, car", "5"]) == [2, 3]
    assert named.labels_of(["truck,5 ,", "car, sedan"]) == [2, 3, 1]
    with pytest.raises(SpinedetError, match="class 'sedan': not one of the model's categories"):
        named.labels_of(["truck,sedan"])


def test_a_classifier_s_top_k_of_chosen_classes():
    torch.manual_seed(0)
    model = spinedet.create_model("spinenet49s_classifier", categories=CATEGORIES, image_size=32,
                                  filter_scale=0.25, endpoint_filters=32)  # fmt: skip
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    both = spinedet.Predictor(model, device="cpu", optimize=False)(image)
    worse = both.names[1]
    only = spinedet.Predictor(model, device="cpu", optimize=False, classes=[worse])(image)
    assert only.names == [worse] and torch.equal(only.scores, both.scores[1:])
    with pytest.raises(SpinedetError, match="max_detections: a classifier gives its top_k"):
        spinedet.Predictor(model, device="cpu", max_detections=3)


def test_any_iterable_is_a_list_of_images_and_stream_reads_it_as_it_goes(predictor, image):
    ref = predictor(image)
    asked = []

    def frames():  # endless, as a camera; reading all of it would be a fault
        for i in count():
            assert i < 100, "read far ahead"
            asked.append(i)
            yield image

    listed = predictor(islice(frames(), 6))
    assert len(listed) == 6 and all(torch.allclose(d.boxes, ref.boxes, atol=1e-4) for d in listed)
    asked.clear()
    results = predictor.stream(frames())
    assert not asked  # nothing is read before the first result is asked for
    first = next(results)
    assert len(asked) == predictor.batch_size and torch.allclose(first.boxes, ref.boxes, atol=1e-4)
    assert [len(d) for d in predictor.stream(map(np.copy, [image] * 5))] == [len(ref)] * 5
    assert len(list(predictor.stream(image))) == 1 and predictor([]) == []


def test_a_thin_image_batched_with_a_larger_one_is_padded_to_its_size_on_a_cpu(
    predictor, image, monkeypatch
):
    """As documented: its detections can change with its batch mates; alone they do not."""
    thin = image[:16]
    alone = predictor(thin)
    for batch_size, same in ((1, True), (2, False)):
        monkeypatch.setattr(predictor, "batch_size", batch_size)
        got = predictor([thin, image])[0]
        equal = len(got) == len(alone) and torch.allclose(got.scores, alone.scores, atol=1e-5)
        assert equal == same, batch_size
