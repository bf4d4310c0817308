import errno
import json
import os
import random
import re
import signal
from collections import Counter

import pytest

from spinedet import files
from spinedet.cli import main
from spinedet.cli.data import add_data_commands
from spinedet.data import DataError, split_dataset
from spinedet.files import atomic_write

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
        ((float("inf"), 1.0), None, "positive and finite"),
        ((float("nan"), 1.0), None, "positive and finite"),
        ((1.0,), None, "at least two"),
        ((0.5, 0.5), ("x", "y", "z"), "2 ratios but 3"),
        ((0.5, 0.5), ("x", "x"), "unique"),
        ((0.5, 0.5), ("x", "../y"), "plain file names"),
        ((1, 1, 1, 1), None, "4 ratios but 3"),
    ],
)
def test_bad_ratios_are_rejected(skewed, tmp_path, ratios, names, message):
    with pytest.raises(ValueError, match=message):
        split_dataset(skewed[0], tmp_path, ratios=ratios, names=names)


def test_data_training_would_refuse_is_not_split(tmp_path):
    """Split refuses what `data check` (and so training) refuses, naming the first problem: it
    wrote such files into every part and exited 0 (a category id outside the categories, string
    ids, an annotation without a box), which failed only at training."""

    def image(i):
        return {"id": i, "file_name": f"{i}.png", "width": 10, "height": 10}

    def annotation(i, **changes):
        return {"id": i, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2]} | changes

    good = {"images": [image(1), image(2)], "annotations": [annotation(1)],
            "categories": [{"id": 1, "name": "a"}]}  # fmt: skip
    (tmp_path / "good.json").write_text(json.dumps(good))
    assert set(split_dataset(tmp_path / "good.json", tmp_path / "parts", (1, 1))) == {
        "train",
        "val",
    }
    broken = [
        ({"annotations": [annotation(1, image_id=3)]}, "refers to unknown image id 3"),
        ({"images": [image(1), image(1)]}, "image id 1 is used 2 times"),
        ({"annotations": [annotation(1, category_id=999)]}, "category id 999 is not defined"),
        ({"images": [image(1) | {"id": "1"}, image(2)]}, "images[0] has no integer 'id'"),
        ({"annotations": [{k: v for k, v in annotation(1).items() if k != "bbox"}]}, "has no bbox"),
    ]
    for change, message in broken:
        (tmp_path / "a.json").write_text(json.dumps(good | change))
        with pytest.raises(DataError, match=r"a\.json: .*" + re.escape(message)) as caught:
            split_dataset(tmp_path / "a.json", tmp_path / "out")
        assert str(caught.value).endswith("(run `spinedet data check` for details)")
        assert not (tmp_path / "out").exists()


def _run(*argv):
    import argparse

    parser = argparse.ArgumentParser(prog="spinedet")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", *argv])
    return args.func(args)


def _state(folder):
    """Every file under ``folder`` (hidden ones included) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_existing_splits_are_kept_unless_overwrite(skewed, tmp_path, capsys):
    path, _ = skewed
    split_dataset(path, tmp_path, seed=1)
    before = _state(tmp_path)
    with pytest.raises(
        DataError, match=r"train\.json, val\.json, test\.json already exist; use --ov"
    ):
        split_dataset(path, tmp_path, seed=2)
    assert _state(tmp_path) == before
    assert main(["data", "split", str(path), "--out", str(tmp_path), "--seed", "2"]) == 2
    assert "use --overwrite" in capsys.readouterr().err
    assert _run("split", str(path), "--out", str(tmp_path), "--seed", "2", "--overwrite") == 0
    after = _state(tmp_path)
    assert after.keys() == before.keys() and after != before  # replaced, nothing left over


@pytest.mark.parametrize("overwrite", [False, True])
def test_split_never_replaces_its_input(tmp_path, skewed, overwrite):
    _, data = skewed
    (tmp_path / "train.json").write_text(json.dumps(data))
    before = _state(tmp_path)
    with pytest.raises(DataError, match=r"writing train\.json would replace the input annotations"):
        split_dataset(tmp_path / "train.json", tmp_path, overwrite=overwrite)
    (tmp_path / "link").symlink_to(tmp_path)  # the same folder under another name
    with pytest.raises(DataError, match="would replace the input annotations"):
        split_dataset(tmp_path / "link" / "train.json", tmp_path, overwrite=overwrite)
    assert _state(tmp_path) == before


def test_split_prints_paths_and_per_class_counts_per_split(skewed, tmp_path, capsys):
    path, data = skewed
    assert _run("split", str(path), "--out", str(tmp_path), "--seed", "0") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == [f"{n}: {tmp_path / n}.json" for n in ("train", "val", "test")]
    assert out[3].split() == ["class", "train", "val", "test", "(instances/images)"]
    parts = _load({n: tmp_path / f"{n}.json" for n in ("train", "val", "test")})
    for row, cat in zip(out[4:8], (1, 2, 3, 4), strict=True):
        cells = []
        for part in parts.values():
            anns = [a for a in part["annotations"] if a["category_id"] == cat]
            cells.append(f"{len(anns)}/{len({a['image_id'] for a in anns})}")
        assert row.split() == [str(cat), *cells]
    totals = [f"{len(p['annotations'])}/{len(p['images'])}" for p in parts.values()]
    assert out[8].split() == ["total", *totals] and len(out) == 9


def test_disk_full_midway_leaves_previous_splits_whole(skewed, tmp_path, monkeypatch, capsys):
    path, _ = skewed
    split_dataset(path, tmp_path, seed=1)
    before = _state(tmp_path)
    real_dump, calls = json.dump, []

    def dump(obj, f, *args, **kwargs):  # the second split file hits a full disk
        calls.append(f.name)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_dump(obj, f, *args, **kwargs)

    monkeypatch.setattr(json, "dump", dump)
    argv = ["data", "split", str(path), "--out", str(tmp_path), "--seed", "2", "--overwrite"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.endswith(": cannot write (No space left on device)\n") and err.count("\n") == 1
    assert "val.json" in err
    assert _state(tmp_path) == before  # no split replaced, no temp file or folder left


def test_sigkill_while_writing_leaves_no_split_at_all(skewed, tmp_path, monkeypatch):
    """A kill after the first part is written: nothing half-written becomes a split file."""
    path, _ = skewed
    real_dump, calls = json.dump, []

    def dump(obj, f, *args, **kwargs):
        calls.append(f.name)
        if len(calls) == 2:
            f.write('{"images": [')
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        real_dump(obj, f, *args, **kwargs)

    monkeypatch.setattr(json, "dump", dump)
    child = os.fork()  # a real process to kill, with everything already imported
    if child == 0:
        try:
            split_dataset(path, tmp_path / "out")
        finally:
            os._exit(1)  # never reached: the kill comes first
    _, status = os.waitpid(child, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    # only the staging folder is left behind, holding what was written: no <name>.json
    assert not list((tmp_path / "out").glob("*.json"))
    assert len(list((tmp_path / "out").rglob("*"))) == 3  # staging, train.json, temp of val.json


def test_atomic_write_syncs_before_renaming(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("replace") or real_replace(a, b))
    atomic_write(tmp_path / "a.txt", lambda tmp: open(tmp, "w").write("x"))
    assert (tmp_path / "a.txt").read_text() == "x"
    assert events[:2] == ["fsync", "replace"]  # the data is on disk before the name points at it


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "No space left on device"),
        (PermissionError(errno.EROFS, os.strerror(errno.EROFS)), "Read-only file system"),
    ],
)
def test_atomic_write_failure_is_one_line_and_removes_the_temp_file(tmp_path, error, reason):
    target = tmp_path / "keep.json"
    target.write_text("old")

    def write(tmp):
        open(tmp, "w").write("partial")
        raise error

    with pytest.raises(OSError) as info:
        atomic_write(target, write)
    assert str(info.value) == f"{target}: cannot write ({reason})"
    assert info.value.errno == error.errno
    assert _state(tmp_path) == {"keep.json": b"old"}


def test_atomic_write_in_a_read_only_folder(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path))

    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)
    with pytest.raises(OSError, match=r"^.*a\.json: cannot write \(Permission denied\)$"):
        atomic_write(tmp_path / "a.json", lambda tmp: None)


def test_writer_failing_without_errno_on_a_full_disk_says_so(tmp_path, monkeypatch):
    """torch.save reports a full disk as RuntimeError('[enforce fail at inline_container...')."""

    def write(tmp):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")

    usage = files.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: usage._replace(free=4096))
    with pytest.raises(OSError, match=r"ck\.pt: cannot write \(No space left on device\)$"):
        atomic_write(tmp_path / "ck.pt", write)
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: usage._replace(free=1 << 30))
    with pytest.raises(RuntimeError, match="enforce fail"):  # not a full disk: as it was
        atomic_write(tmp_path / "ck.pt", write)
    assert not list(tmp_path.iterdir())
