"""Start-up time and memory at the data set's real scale (issue 13): 226,000 images, ~4.5
polygons each, 178 classes, in one COCO json; one small JPEG hard-linked under every name.

Reports the time of ``data check`` (cold, then cached in the run directory), of building the
dataset, of the first batch, and after N batches the peak resident memory (``VmHWM``) of the
main process and of each DataLoader worker, with each worker's private memory (pages it no
longer shares with the main process: what copy-on-read costs). "old" is ``data/coco.py`` as of
``--old-rev`` (per-sample Python objects and a pycocotools index), "new" the working tree.
Each measurement runs in a fresh subprocess, so peaks do not mix.

    PYTHONPATH=src python benchmarks/scale_startup.py [--images 226000] [--batches 200]
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, machine, table  # noqa: E402

SIDE = 64  # pixels of the one image: small, so the loader measures indexing, not decoding
POINTS = 30  # per polygon: more numbers than the real set has (its json is 432 MiB), not fewer


def generate(out: Path, images: int, classes: int, per_image: float, seed: int) -> Path:
    """Write ``out/annotations.json`` and ``out/images`` (hard links to one JPEG)."""
    ann_path = out / "annotations.json"
    if ann_path.exists():
        return ann_path
    rng = np.random.default_rng(seed)
    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    source = out / "source.jpg"
    pixels = rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(source, quality=90)
    for i in range(images):
        name = folder / f"{i:07d}.jpg"
        if name.exists():
            continue
        try:
            os.link(source, name)
        except OSError as e:
            if e.errno != errno.EMLINK:
                raise
            # File systems cap links per file (ext4: 65,000): go on from a fresh copy.
            source = source.with_name(f"source{i}.jpg")
            shutil.copyfile(out / "source.jpg", source)
            os.link(source, name)
    counts = rng.poisson(per_image - 1, images) + 1
    owners = np.repeat(np.arange(images), counts)
    n = len(owners)
    centre = rng.uniform(12, SIDE - 12, (n, 2))
    radius = rng.uniform(3, 11, (n, 1))
    angles = np.linspace(0, 2 * np.pi, POINTS, endpoint=False)
    wobble = rng.uniform(0.7, 1.0, (n, POINTS)) * radius
    xs = np.round(centre[:, :1] + wobble * np.cos(angles), 2)
    ys = np.round(centre[:, 1:] + wobble * np.sin(angles), 2)
    polygons = np.stack([xs, ys], axis=2).reshape(n, -1)
    boxes = np.round(np.stack([xs.min(1), ys.min(1), np.ptp(xs, 1), np.ptp(ys, 1)], axis=1), 2)
    labels = rng.integers(1, classes + 1, n)
    partial = ann_path.with_suffix(".partial")  # renamed when complete: never reused half-written
    with open(partial, "w") as f:
        head = {
            "categories": [{"id": c, "name": f"class_{c}"} for c in range(1, classes + 1)],
            "images": [
                {"id": i, "file_name": f"{i:07d}.jpg", "width": SIDE, "height": SIDE}
                for i in range(images)
            ],
        }
        f.write(json.dumps(head)[:-1] + ', "annotations": [')
        chunk = 20000
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            anns = [
                {"id": k + 1, "image_id": int(owners[k]), "category_id": int(labels[k]),
                 "bbox": boxes[k].tolist(), "area": float(boxes[k, 2] * boxes[k, 3]),
                 "segmentation": [polygons[k].tolist()], "iscrowd": 0}
                for k in range(start, stop)
            ]  # fmt: skip
            f.write(("," if start else "") + json.dumps(anns)[1:-1])
        f.write("]}")
    partial.replace(ann_path)
    (out / "polygons.json").write_text(str(n))
    return ann_path


def _status(pid: int | str) -> dict[str, int]:
    """VmHWM / VmRSS (KiB) of a process, and its private memory from smaps_rollup."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmHWM:", "VmRSS:")):
            values[line.split(":")[0]] = int(line.split()[1])
    private = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            private += int(line.split()[1])
    values["Private"] = private
    return values


def _load(rev: str | None):
    """``CocoDataset`` of the working tree, or of ``data/coco.py`` at git revision ``rev``."""
    if rev is None:
        from spinedet.data.coco import CocoDataset

        return CocoDataset
    source = subprocess.run(
        ["git", "show", f"{rev}:src/spinedet/data/coco.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"spinedet_coco_{rev.replace('/', '_')}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("spinedet.data._coco_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CocoDataset


def measure_check(ann: Path, images: Path, run: Path) -> dict:
    from spinedet.data.check import check_dataset_cached

    start = time.perf_counter()
    problems = check_dataset_cached(ann, images, run, progress=False)
    cold = time.perf_counter() - start
    assert not problems, problems[:3]
    start = time.perf_counter()
    check_dataset_cached(ann, images, run, progress=False)
    return {"cold": cold, "cached": time.perf_counter() - start, "peak": _status("self")["VmHWM"]}


def measure_loader(ann: Path, images: Path, rev: str | None, batches: int, batch: int) -> dict:
    import torch
    from torch.utils.data import DataLoader

    from spinedet.data import collate, train_transforms

    torch.set_num_threads(1)
    dataset_class = _load(rev)
    start = time.perf_counter()
    dataset = dataset_class(ann, images, train_transforms(SIDE, (0.8, 1.25), True))
    built = time.perf_counter() - start
    after_build = _status("self")
    loader = DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        num_workers=2,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(0),
    )
    batches = min(batches, len(loader))
    start = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    first = time.perf_counter() - start
    for _ in range(batches - 1):
        next(iterator)
    epoch = time.perf_counter() - start
    workers = [_status(w.pid) for w in iterator._workers]
    return {
        "build": built,
        "first": first,
        "batches_s": epoch,
        "batches": batches,
        "main_after_build": after_build["VmRSS"],
        "main": _status("self"),
        "workers": workers,
    }


def _subprocess(args: list[str]) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, *args], check=True, capture_output=True, text=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def mib(kib: int) -> str:
    return f"{kib / 1024:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=226000)
    parser.add_argument("--classes", type=int, default=178)
    parser.add_argument("--per-image", type=float, default=4.5, help="mean polygons per image")
    parser.add_argument("--batches", type=int, default=200, help="batches before measuring")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--old-rev", default="main", help="git revision of the old coco.py")
    parser.add_argument("--out", type=Path, default=Path("/tmp/spinedet_scale"))
    parser.add_argument("--measure", choices=["check", "old", "new"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    data = args.out / f"{args.images}"
    ann, images = data / "annotations.json", data / "images"
    if args.measure == "check":
        print(json.dumps(measure_check(ann, images, data / "run")))
        return
    if args.measure:
        rev = args.old_rev if args.measure == "old" else None
        print(json.dumps(measure_loader(ann, images, rev, args.batches, args.batch_size)))
        return

    start = time.perf_counter()
    generate(data, args.images, args.classes, args.per_image, seed=0)
    generated = time.perf_counter() - start
    size = ann.stat().st_size / 2**20
    polygons = json.loads((data / "polygons.json").read_text())
    (data / "run" / "data_check.json").unlink(missing_ok=True)
    common = ["--images", str(args.images), "--out", str(args.out)]
    common += ["--batches", str(args.batches), "--batch-size", str(args.batch_size)]
    check = _subprocess([*common, "--measure", "check"])
    results = {name: _subprocess([*common, "--measure", name, "--old-rev", args.old_rev])
               for name in ("old", "new")}  # fmt: skip
    old, new = results["old"], results["new"]

    def row(label: str, key, fmt) -> list[str]:
        a, b = key(old), key(new)
        return [label, fmt(a), fmt(b), f"{b / a:.2f}x" if a else ""]

    def seconds(value: float) -> str:
        return f"{value:.2f} s" if value < 10 else f"{value:.0f} s"

    cold, cached = seconds(check["cold"]), seconds(check["cached"])
    rows = [
        ["`data check`, first start (same code)", cold, cold, "1.00x"],
        ["`data check`, resume (cached)", cold, cached, f"{check['cached'] / check['cold']:.3f}x"],
        ["peak RSS of `data check` (MiB)", mib(check["peak"]), mib(check["peak"]), "1.00x"],
        row("build the dataset", lambda r: r["build"], seconds),
        row("first batch (2 workers start)", lambda r: r["first"], seconds),
        row(f"{new['batches']} batches of {args.batch_size}", lambda r: r["batches_s"], seconds),
        row("main RSS after building (MiB)", lambda r: r["main_after_build"], mib),
        row("main peak RSS (MiB)", lambda r: r["main"]["VmHWM"], mib),
    ]
    for w in range(2):
        rows.append(row(f"worker {w} peak RSS (MiB)", lambda r, w=w: r["workers"][w]["VmHWM"], mib))
        rows.append(
            row(f"worker {w} private memory (MiB)", lambda r, w=w: r["workers"][w]["Private"], mib)
        )
    print(
        f"{args.images:,} images, {polygons:,} polygons, {args.classes} classes, "
        f"{size:.0f} MiB json "
        f"(generated or reused in {generated:.0f} s); {machine()}"
    )
    print(table(["", "old", "new", "new / old"], rows))


if __name__ == "__main__":
    main()
