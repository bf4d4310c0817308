"""eval / predict from the command line, with the user's category ids and names."""

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL
from PIL import Image

import spinedet
from spinedet.cli import main
from spinedet.engine import api
from spinedet.engine.predict import collect_inputs, predict_images


@pytest.fixture(scope="module")
def checkpoint(shapes, tmp_path_factory):
    """Untrained tiny weights with the shapes categories, saved as training would save them."""
    categories = json.loads(shapes["annotations"].read_text())["categories"]
    model = spinedet.create_model("spinenet49s_maskrcnn", categories=categories, image_size=64,
                                  box_score_thresh=0.0, **TINY_MODEL)  # fmt: skip
    path = tmp_path_factory.mktemp("ckpt") / "best.safetensors"
    spinedet.save_weights(model, path)
    return path


def test_predict_draws_images_and_writes_user_ids(checkpoint, shapes, tmp_path):
    images = sorted(shapes["images"].iterdir())[:3]
    code = main(["predict", str(checkpoint), *map(str, images), "--out", str(tmp_path),
                 "--score-threshold", "0"])  # fmt: skip
    assert code == 0
    for image in images:
        drawn = Image.open(tmp_path / f"{image.stem}.png")
        assert drawn.size == Image.open(image).size
    results = json.loads((tmp_path / "predictions.json").read_text())
    assert results, "an untrained model with threshold 0 still returns detections"
    names = {3: "circle", 7: "square", 11: "triangle", 20: "star"}
    assert all(names[r["category_id"]] == r["category_name"] for r in results)
    assert {"bbox", "score", "segmentation", "file_name"} <= set(results[0])


def test_predict_max_detections(checkpoint, shapes, tmp_path):
    images = [str(p) for p in sorted(shapes["images"].iterdir())[:2]]
    argv = ["predict", str(checkpoint), *images, "--score-threshold", "0", "--no-draw"]
    assert main([*argv, "--out", str(tmp_path / "all")]) == 0
    assert main([*argv, "--out", str(tmp_path / "two"), "--max-detections", "2"]) == 0
    every, two = ([json.loads(line) for line in (tmp_path / out / "predictions.jsonl").open()]
                  for out in ("all", "two"))  # fmt: skip
    for record, best in zip(every, two, strict=True):
        assert len(record["detections"]) > 2 and best["detections"] == record["detections"][:2]


def test_predict_classes_by_name_or_id(checkpoint, shapes, tmp_path, capsys):
    image = str(sorted(shapes["images"].iterdir())[0])
    argv = ["predict", str(checkpoint), image, "--score-threshold", "0", "--no-draw",
            "--max-detections", "5"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "a"), "--classes", "star, 3"]) == 0
    results = json.loads((tmp_path / "a" / "predictions.json").read_text())
    assert len(results) == 5 and {r["category_name"] for r in results} <= {"star", "circle"}
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "b"), "--classes", "dog"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("class 'dog': not one of the model's categories: circle (3), "
                        "square (7), triangle (11), star (20)")  # fmt: skip
    assert len(err.splitlines()) == 1


def test_predict_in_tiles_gives_the_predictor_s_tiled_detections(checkpoint, shapes, tmp_path):
    image = sorted(shapes["images"].iterdir())[0]
    argv = ["predict", str(checkpoint), str(image), "--score-threshold", "0", "--no-draw",
            "--tile", "40", "--tile-overlap", "0.5", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    (line,) = [json.loads(x) for x in (tmp_path / "predictions.jsonl").open()]
    tiled = spinedet.Predictor(checkpoint, device="cpu", score_threshold=0.0, tile=40,
                               tile_overlap=0.5)(image)  # fmt: skip
    assert len(tiled) > 0
    assert line["detections"] == [e | {"file_name": str(image)} for e in tiled.to_coco(0)]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_predict_on_a_full_disk_names_the_file_and_cuts_no_drawing(checkpoint, shapes, tmp_path,
                                                                    capsys):  # fmt: skip
    image = sorted(shapes["images"].iterdir())[0]
    argv = ["predict", str(checkpoint), str(image), "--out", str(tmp_path), "--overwrite"]
    # Drawn in place, the new drawing would go through the link into the full device.
    (tmp_path / f"{image.stem}.png").symlink_to("/dev/full")
    assert main(argv) == 0
    assert Image.open(tmp_path / f"{image.stem}.png").size == Image.open(image).size
    (tmp_path / "predictions.jsonl").unlink()
    (tmp_path / "predictions.jsonl").symlink_to("/dev/full")  # every write: no space left
    assert main(argv) == 2
    assert "predictions.jsonl: cannot write (No space left on device)" in capsys.readouterr().err


def test_eval_writes_metrics_and_results(checkpoint, shapes, tmp_path, capsys):
    code = main(["eval", str(checkpoint.parent), "--annotations", str(shapes["val"]),
                 "--images", str(shapes["images"]), "--out", str(tmp_path)])  # fmt: skip
    assert code == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) == {"bbox", "segm"}
    assert set(metrics["segm"]["per_class"]) == {"circle", "square", "triangle", "star"}
    assert isinstance(json.loads((tmp_path / "results.json").read_text()), list)
    for name in ("pr_curve_segm.png", "confusion_bbox.csv", "per_class.csv"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert "per-class segm AP" in capsys.readouterr().out
    # A second evaluation into the same folder is refused before it runs, unless told.
    (tmp_path / "metrics.json").write_text("{}")
    argv = ["eval", str(checkpoint.parent), "--annotations", str(shapes["val"]),
            "--images", str(shapes["images"]), "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) != 0
    assert "metrics.json: exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "metrics.json").read_text() == "{}"
    assert main([*argv, "--overwrite"]) == 0
    assert set(json.loads((tmp_path / "metrics.json").read_text())) == {"bbox", "segm"}
    # The confusion matrix's operating point: at 0 it also counts the detections under 0.5.
    results = json.loads((tmp_path / "results.json").read_text())
    assert any(r["score"] < 0.5 for r in results)
    default = (tmp_path / "confusion_bbox.csv").read_text()
    assert main([*argv, "--overwrite", "--confusion-score", "0"]) == 0
    assert (tmp_path / "confusion_bbox.csv").read_text() != default
    with pytest.raises(SystemExit):
        main([*argv, "--overwrite", "--confusion-score", "nan"])
    assert "expected a score in 0..1, got nan" in capsys.readouterr().err
    # At another size the model sees the images resized otherwise: other detections.
    assert main([*argv, "--overwrite", "--image-size", "96"]) == 0
    resized = json.loads((tmp_path / "results.json").read_text())
    first = sorted(results, key=lambda r: (r["image_id"], -r["score"]))[0]
    again = sorted(resized, key=lambda r: (r["image_id"], -r["score"]))[0]
    assert first["image_id"] == again["image_id"] and first["bbox"] != again["bbox"]


def test_eval_leaves_unreadable_images_out_of_the_ap(checkpoint, shapes, tmp_path, caplog):
    """An image that will not decode was scored as a blank image, its objects all missed,
    with nothing in metrics.json to tell: now the AP is that of the readable images, and
    metrics.json names the others."""
    coco = json.loads(shapes["val"].read_text())
    images = tmp_path / "images"
    images.mkdir()
    for im in coco["images"]:
        (images / im["file_name"]).write_bytes((shapes["images"] / im["file_name"]).read_bytes())
    broken = coco["images"][1]
    (images / broken["file_name"]).write_bytes(b"not an image")
    rest = tmp_path / "rest.json"
    rest.write_text(json.dumps(coco | {
        "images": [im for im in coco["images"] if im is not broken],
        "annotations": [a for a in coco["annotations"] if a["image_id"] != broken["id"]],
    }))  # fmt: skip
    assert any(a["image_id"] == broken["id"] for a in coco["annotations"])
    argv = ["eval", str(checkpoint), "--images", str(images), "--no-optimize", "--out"]
    assert main([*argv, str(tmp_path / "all"), "--annotations", str(shapes["val"])]) == 0
    assert f"images (ids {broken['id']}) left out of the AP" in caplog.text
    assert main([*argv, str(tmp_path / "rest"), "--annotations", str(rest)]) == 0
    left, readable = (json.loads((tmp_path / out / "metrics.json").read_text())
                      for out in ("all", "rest"))  # fmt: skip
    for iou_type in ("bbox", "segm"):
        assert left[iou_type].pop("unreadable_images") == [broken["id"]]
    assert left == readable
    for name in ("per_class.csv", "confusion_bbox.csv", "pr_curve_segm.csv"):  # the analysis too
        assert (tmp_path / "all" / name).read_text() == (tmp_path / "rest" / name).read_text()


def test_eval_refuses_images_without_a_file(checkpoint, shapes, tmp_path, capsys):
    # Scored as blank images, their objects would all count as missed: a wrong --images
    # gave AP near 0 and exit 0.
    argv = ["eval", str(checkpoint), "--annotations", str(shapes["val"]), "--out",
            str(tmp_path / "out")]  # fmt: skip
    assert main([*argv, "--images", str(tmp_path)]) == 2
    count = len(json.loads(shapes["val"].read_text())["images"])
    assert f"{count} images (ids " in capsys.readouterr().err
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_eval_out_is_checked_before_the_pass_and_metrics_json_comes_last(
    checkpoint, shapes, tmp_path, capsys, monkeypatch
):
    argv = ["eval", str(checkpoint), "--annotations", str(shapes["val"]),
            "--images", str(shapes["images"]), "--out"]  # fmt: skip
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(api, "evaluate_distributed", lambda *a, **k: pytest.fail("evaluated first"))
    assert main([*argv, str(tmp_path / "file")]) == 2
    assert "file: exists and is not a folder" in capsys.readouterr().err
    monkeypatch.undo()

    # Killed while writing the analysis: no metrics.json, so a rerun is not refused.
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "write_analysis", killed)
    assert main([*argv, str(tmp_path / "run")]) == 130
    assert capsys.readouterr().err.endswith("spinedet: interrupted\n")
    assert not (tmp_path / "run" / "metrics.json").exists()
    monkeypatch.undo()
    assert main([*argv, str(tmp_path / "run")]) == 0


@pytest.mark.parametrize(
    "argv,message",
    [
        (["info", "spinenet49_maskrnn"], "did you mean spinenet49_maskrcnn"),
        (["predict", "missing.safetensors", "x.png", "--out", "o"], "missing.safetensors: no such"),
        (["train", "nope.yaml", "--out", "o"], "nope.yaml: no such config file"),
    ],
)
def test_cli_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_info_json(capsys):
    assert main(["info", "spinenet49s", "--size", "128", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == 9_089_215 and len(info["levels"]) == 5


def test_export_from_run_directory_checks_with_onnxruntime(checkpoint, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    assert main(["export", str(checkpoint.parent), "--format", "onnx", "--out", str(out)]) == 0
    assert out.stat().st_size > 0 and out.stat().st_mode & 0o044  # readable like any file
    assert "diff" in capsys.readouterr().out


def _tree(shapes, root):
    """root/a/img.png and root/b/img.png (two different images), plus a corrupt one."""
    images = sorted(shapes["images"].iterdir())
    for sub, source in (("a", images[0]), ("b", images[1])):
        (root / sub).mkdir(parents=True)
        (root / sub / "img.png").write_bytes(source.read_bytes())
    (root / "b" / "broken.png").write_bytes(b"not an image")
    return images


def test_predict_skips_unreadable_and_keeps_relative_paths(checkpoint, shapes, tmp_path, capsys):
    _tree(shapes, tmp_path / "in")
    out = tmp_path / "out"
    code = main(["predict", str(checkpoint), str(tmp_path / "in"), str(tmp_path / "nope*.png"),
                 "--out", str(out), "--score-threshold", "0", "--batch-size", "2",
                 "--save-masks", "image"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert err.startswith("spinedet: error: 2 input(s) skipped")
    assert "broken.png (cannot decode image" in err and "nope*.png" in err
    assert (out / "a" / "img.png").is_file() and (out / "b" / "img.png").is_file()
    assert Image.open(out / "masks" / "a" / "img.png").size == (64, 64)
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["name"] for r in lines] == ["a/img", "b/img"]
    assert [r["image_id"] for r in lines] == [0, 1]
    results = json.loads((out / "predictions.json").read_text())
    assert results == [d for r in lines for d in r["detections"]]


def test_predict_runs_batches_of_batch_size_and_pairs_each_result_with_its_input(
    checkpoint, shapes, tmp_path
):
    images = sorted(shapes["images"].iterdir())[:4]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    inputs = [*images[:2], broken, *images[2:], images[0]]  # 5 of the 6 are readable
    predictor = spinedet.Predictor(checkpoint, device="cpu", score_threshold=0.0, batch_size=2)
    batches, run = [], predictor.predict_batch
    predictor.predict_batch = lambda batch: batches.append(len(batch)) or run(batch)
    items, _ = collect_inputs(inputs)
    report = predict_images(predictor, items, tmp_path / "out", draw=False)
    assert batches == [2, 2, 1] and report.images == 5
    assert [path for path, _ in report.skipped] == [str(broken)]
    lines = [json.loads(x) for x in (tmp_path / "out" / "predictions.jsonl").open()]
    readable = [p for p in inputs if p != broken]
    assert [x["file_name"] for x in lines] == list(map(str, readable))
    expected = [d.to_coco(i) for i, d in enumerate(predictor(readable))]  # the same batches
    for line, entries in zip(lines, expected, strict=True):
        assert line["detections"] == [e | {"file_name": line["file_name"]} for e in entries]


def test_predict_keeps_every_dot_of_a_file_name(checkpoint, shapes, tmp_path):
    images = sorted(shapes["images"].iterdir())
    for name, source in (("photo.v1.png", images[0]), ("photo.v2.png", images[1])):
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / name).write_bytes(source.read_bytes())
    out = tmp_path / "out"
    code = main(["predict", str(checkpoint), str(tmp_path / "in"), "--out", str(out),
                 "--score-threshold", "0", "--save-masks", "image"])  # fmt: skip
    assert code == 0  # both were drawn to photo.png: the second refused as existing
    for name in ("photo.v1.png", "photo.v2.png"):
        assert (out / name).is_file() and (out / "masks" / name).is_file()
    assert not (out / "photo.png").exists()


def test_predict_never_overwrites_inputs(checkpoint, shapes, tmp_path, capsys):
    images = _tree(shapes, tmp_path)
    before = (tmp_path / "a" / "img.png").read_bytes()
    code = main(["predict", str(checkpoint), str(tmp_path / "a"), "--out", str(tmp_path / "a")])
    assert code == 2 and "img.png: exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "a" / "img.png").read_bytes() == before == images[0].read_bytes()
    # An output folder inside the input directory is never read back as input.
    out = tmp_path / "a" / "pred"
    for extra in ([], ["--overwrite"]):
        argv = ["predict", str(checkpoint), str(tmp_path / "a"), "--out", str(out), *extra]
        assert main(argv) == 0
        assert len((out / "predictions.jsonl").read_text().splitlines()) == 1
    assert main(argv[:-1]) == 2  # the second run's files exist


def test_predict_video_annotation_ids_and_no_draw(checkpoint, shapes, tmp_path):
    av = pytest.importorskip("av")
    import numpy as np

    video = tmp_path / "clip.mp4"
    with av.open(str(video), "w") as container:
        stream = container.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(5):
            array = np.full((48, 64, 3), 40 * i, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())
    image = sorted(shapes["images"].iterdir())[0]
    out = tmp_path / "out"
    code = main(["predict", str(checkpoint), str(video), str(image), "--out", str(out),
                 "--every", "2", "--annotations", str(shapes["annotations"]),
                 "--score-threshold", "0"])  # fmt: skip
    assert code == 0
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    names = [r["name"] for r in lines]
    assert names == ["clip/frame_000000", "clip/frame_000002", "clip/frame_000004", image.stem]
    assert lines[0]["height"] == 48 and (out / "clip" / "frame_000002.png").is_file()
    assert [r.get("frame") for r in lines] == [0, 2, 4, None]
    frames = {d.get("frame") for d in json.loads((out / "predictions.json").read_text())}
    assert frames <= {0, 2, 4, None} and frames & {0, 2, 4}  # each detection names its frame
    coco = json.loads(shapes["annotations"].read_text())
    expected = next(im["id"] for im in coco["images"] if Path(im["file_name"]).name == image.name)
    assert lines[-1]["image_id"] == expected
    code = main(["predict", str(checkpoint), str(image), "--out", str(tmp_path / "o2"),
                 "--no-draw", "--device", "cpu", "--no-optimize"])  # fmt: skip
    assert code == 0 and sorted(p.name for p in (tmp_path / "o2").iterdir()) == [
        "predictions.json",
        "predictions.jsonl",
    ]


def test_predict_annotation_ids_by_path_then_unique_base_name(
    checkpoint, shapes, tmp_path, capsys, caplog
):
    source = sorted(shapes["images"].iterdir())[0].read_bytes()
    for name in ("a/x.png", "b/x.png", "c/x.png", "d/u.png", "new.png"):
        (tmp_path / "pimg" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "pimg" / name).write_bytes(source)
    ann = tmp_path / "ann.json"
    images = [{"id": 101, "file_name": "a/x.png"}, {"id": 202, "file_name": "b/x.png"},
              {"id": 2, "file_name": "other/u.png"}]  # fmt: skip
    ann.write_text(json.dumps({"images": images, "annotations": [], "categories": []}))
    pimg, out = tmp_path / "pimg", tmp_path / "out"
    inputs = [str(pimg / "[ab]" / "x.png"), str(pimg / "new.png"), str(pimg / "d" / "u.png")]
    argv = ["predict", str(checkpoint), *inputs, "--out", str(out), "--annotations", str(ann),
            "--no-draw"]  # fmt: skip
    assert main(argv) == 0
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    ids = {Path(r["file_name"]).relative_to(pimg).as_posix(): r["image_id"] for r in lines}
    # By path (was: both 202), by unique base name, the rest above the json's ids (was 2: u's).
    assert ids == {"a/x.png": 101, "b/x.png": 202, "d/u.png": 2, "new.png": 203}
    assert "1 of 4 input(s) not in" in caplog.text and "numbered from image id 203" in caplog.text
    # A base name of several entries that no path tells apart is refused.
    argv = ["predict", str(checkpoint), str(pimg / "c" / "x.png"), "--out", str(tmp_path / "o2"),
            "--annotations", str(ann), "--no-draw"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        f"{pimg / 'c' / 'x.png'}: its base name matches 2 images of {ann} (a/x.png, b/x.png)" in err
    )


def test_predict_annotation_ids_come_in_their_annotations_orientation(
    checkpoint, shapes, tmp_path, capsys
):
    """A photo stored sideways with an EXIF rotation: predicted upright, unless the json gives
    its stored size, then in the stored orientation (as training and eval read it); a size
    that fits neither skips the image, naming both."""
    stored = Image.open(sorted(shapes["images"].iterdir())[0]).convert("RGB").resize((96, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show
    stored.save(tmp_path / "p.jpg", exif=exif)
    sizes = {"stored": (96, 64), "upright": (64, 96), "neither": (50, 50)}
    for name, (width, height) in sizes.items():
        ann = tmp_path / f"{name}.json"
        images = [{"id": 7, "file_name": "p.jpg", "width": width, "height": height}]
        ann.write_text(json.dumps({"images": images, "annotations": [], "categories": []}))
        out = tmp_path / name
        code = main(["predict", str(checkpoint), str(tmp_path / "p.jpg"), "--out", str(out),
                     "--annotations", str(ann), "--no-draw", "--score-threshold", "0"])  # fmt: skip
        if name == "neither":
            assert code == 2
            assert "image is 96x64 (64x96 after EXIF rotation) but the annotations say 50x50" in (
                capsys.readouterr().err
            )
            continue
        assert code == 0
        line = json.loads((out / "predictions.jsonl").read_text())
        assert (line["image_id"], line["width"], line["height"]) == (7, width, height)
        boxes = torch.tensor([d["bbox"] for d in line["detections"]])
        assert len(boxes) and (boxes[:, 0] + boxes[:, 2] <= width + 1e-3).all()
        assert (boxes[:, 1] + boxes[:, 3] <= height + 1e-3).all()


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.5)" in text and "(default: 4)" in text


def test_eval_in_tiles_scores_the_predictor_s_tiled_detections(
    checkpoint, shapes, tmp_path, capsys
):
    argv = ["eval", str(checkpoint), "--annotations", str(shapes["val"]), "--images",
            str(shapes["images"]), "--batch-size", "4", "--out"]  # fmt: skip
    assert main([*argv, str(tmp_path / "tiled"), "--tile", "40", "--tile-overlap", "0.5"]) == 0
    tiled = json.loads((tmp_path / "tiled" / "results.json").read_text())
    val = json.loads(shapes["val"].read_text())["images"]
    predictor = spinedet.Predictor(checkpoint, device="cpu", score_threshold=0.0, tile=40,
                                   tile_overlap=0.5, max_detections=100)  # fmt: skip
    found = predictor([shapes["images"] / im["file_name"] for im in val])
    expected = [{k: v for k, v in e.items() if k != "category_name"}
                for im, d in zip(val, found, strict=True) for e in d.to_coco(im["id"])]  # fmt: skip
    assert len(tiled) > 0 and tiled == expected
    # A tile as large as the images: each is one view, the image whole, as without tiles.
    assert main([*argv, str(tmp_path / "whole")]) == 0
    assert main([*argv, str(tmp_path / "one"), "--tile", "64"]) == 0
    whole, one = (json.loads((tmp_path / out / "metrics.json").read_text())
                  for out in ("whole", "one"))  # fmt: skip
    assert one == whole and tiled != json.loads((tmp_path / "whole" / "results.json").read_text())
    assert main([*argv, str(tmp_path / "none"), "--tile-whole"]) == 2  # silently untiled before
    err = capsys.readouterr().err
    assert err.endswith("tile_whole (--tile-whole): applies to tiles only; give a tile size too "
                        "(tile=, --tile)\n")  # fmt: skip
