"""ATen ops dispatched per training step, and host time per step at a tiny input: spinedet vs
torchvision's ResNet-50-FPN detectors.

At 64 x 64 (batch 2) the arithmetic is negligible, so the time per step is what the host spends
dispatching ops: on a GPU each non-view op is about one kernel launch, and a launch-bound step
costs in proportion to them. Every op the dispatcher runs in a step (forward, backward, SGD
update) is counted by a ``TorchDispatchMode``; view ops (``view``, ``permute``, ``slice``, ...)
launch no kernel and are counted apart. Host syncs are the ops that wait for a GPU: reading a
value back, and making a tensor from Python data (``torch.tensor(..., device=...)`` copies it
and waits), except through ``spinedet.models.host_data.device_tensor``, which queues the copy.
``--baseline REV`` also measures spinedet as of the git revision ``REV`` (its ``src`` in a
subprocess) beside this tree, each against torchvision measured in the same process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from io import BytesIO
from pathlib import Path
from types import CodeType

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.models.detection import maskrcnn_resnet50_fpn, retinanet_resnet50_fpn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, compare, detection_batch, machine, ms, parse_args, table  # noqa: E402

import spinedet  # noqa: E402
from spinedet import create_model  # noqa: E402

SIZE, BATCH, NUM_CLASSES = 64, 2, 91
PAIRS = [
    ("spinenet49s_retinanet", "retinanet_resnet50_fpn"),
    ("spinenet49s_maskrcnn", "maskrcnn_resnet50_fpn"),
    ("spinenet49_retinanet", "retinanet_resnet50_fpn"),
]
TORCHVISION = {f.__name__: f for f in (retinanet_resnet50_fpn, maskrcnn_resnet50_fpn)}
TOP = 15


# Ops that only allocate (no kernel), and ops that wait for the device to read a value back.
ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
SYNCS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2"}
MASKED_INDEXING = {"index", "index_put", "index_put_"}  # a boolean index runs a nonzero
FROM_PYTHON = {"lift_fresh", "lift_fresh_copy"}  # a tensor made from Python data


def _queued_copy() -> CodeType | None:
    """The code of spinedet's copy to the device that does not wait (absent in old trees)."""
    try:
        from spinedet.models.host_data import device_tensor
    except ImportError:
        return None
    return device_tensor.__code__


QUEUED_COPY = _queued_copy()


def _queued() -> bool:
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code is QUEUED_COPY:
            return True
        frame = frame.f_back
    return False


def _kind(func, args: tuple) -> str:
    name = func.overloadpacket.__name__
    if name in FROM_PYTHON:  # an alias of the new tensor, so before the views
        return "view" if _queued() else "sync"
    if func.is_view:
        return "view"
    if name in ALLOCATIONS:
        return "allocation"
    if name in SYNCS:
        return "sync"
    if name in MASKED_INDEXING and any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1]
    ):
        return "sync"
    return "kernel"


class OpCounter(TorchDispatchMode):
    """Counts every op dispatched while active, by name and by kind (view, allocation, host
    sync, or other: an op that runs a kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_name: Counter = Counter()
        self.by_kind: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.by_name[str(func.overloadpacket)] += 1
        self.by_kind[_kind(func, args)] += 1
        return func(*args, **(kwargs or {}))

    # ``Tensor.tolist`` reads the values without dispatching an op (on a GPU: a copy to the
    # host and a wait for it), so it is counted as a sync where it is called.
    def __enter__(self) -> OpCounter:
        tolist = self._tolist = torch.Tensor.tolist

        def counted(tensor: torch.Tensor) -> list:
            self.by_name["Tensor.tolist"] += 1
            self.by_kind["sync"] += 1
            return tolist(tensor)

        torch.Tensor.tolist = counted
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        torch.Tensor.tolist = self._tolist
        super().__exit__(*exc)


def build(name: str) -> torch.nn.Module:
    if name in TORCHVISION:
        return TORCHVISION[name](
            weights=None,
            weights_backbone=None,
            num_classes=NUM_CLASSES,
            min_size=SIZE,
            max_size=SIZE,
        )
    return create_model(name, num_classes=NUM_CLASSES, image_size=SIZE)


def train_step(model: torch.nn.Module):
    """One step as the trainer takes it (SGD with momentum and weight decay), with the
    multi-tensor update CUDA uses by default (one op per update, not one per parameter)."""
    images, targets = detection_batch(SIZE, BATCH, NUM_CLASSES)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=1e-4, momentum=0.9, weight_decay=4e-5, foreach=True
    )
    model.train()

    def step() -> None:
        torch.manual_seed(0)  # the same proposals and samples every step
        loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def count(step) -> dict:
    with OpCounter() as counter:
        step()
    return {"by_kind": dict(counter.by_kind), "by_name": dict(counter.by_name)}


def kernels(counts: dict) -> int:
    return counts["by_kind"].get("kernel", 0) + counts["by_kind"].get("sync", 0)


def measure(repeats: int, warmup: int) -> dict:
    """Op counts and host times of every model of :data:`PAIRS` (run in this process)."""
    names = list(dict.fromkeys(n for pair in PAIRS for n in pair))
    steps = {n: train_step(build(n)) for n in names}
    for step in steps.values():  # caches (anchors), lazy initialisation, optimizer state
        step()
    result = {"spinedet": str(Path(spinedet.__file__).parent), "models": {}}
    for n, step in steps.items():
        result["models"][n] = count(step)
    for ours, reference in PAIRS:
        times = compare(
            {reference: steps[reference], ours: steps[ours]}, reference, repeats, warmup
        )
        result["models"][ours]["time"] = {k: [v.median_s, v.ratio] for k, v in times.items()}
    return result


def run_worker(threads: int, repeats: int, warmup: int, src: Path | None) -> dict:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")])
    worker = [sys.executable, __file__, "--worker", json.dumps([threads, repeats, warmup])]
    out = subprocess.run(worker, capture_output=True, text=True, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def checkout_src(rev: str, into: Path) -> Path:
    """``src`` of git revision ``rev``, extracted under ``into``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "src"], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        threads, repeats, warmup = json.loads(sys.argv[2])
        torch.set_num_threads(threads)
        print(json.dumps(measure(repeats, warmup)))
        return
    args = parse_args(
        __doc__.splitlines()[0],
        repeats=7,
        baseline={"default": None, "help": "also measure spinedet at this git revision"},
    )
    print(
        f"# Ops per training step, {SIZE} x {SIZE}, batch {BATCH}\n\n{machine()}\n\n"
        "Forward, backward and SGD update (foreach) of randomly initialised models with "
        f"{NUM_CLASSES} classes. Op counts vary a little with the sampled proposals; host times "
        "vary with the machine's load (ratios are medians over interleaved steps).\n"
    )
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.baseline:
            src = checkout_src(args.baseline, Path(tmp))
            runs[f"`{args.baseline}`"] = run_worker(args.threads, args.repeats, args.warmup, src)
        runs["this tree"] = run_worker(args.threads, args.repeats, args.warmup, None)
    rows = []
    for ours, reference in PAIRS:
        for label, run in runs.items():
            m, ref = run["models"][ours], run["models"][reference]
            (ref_s, _), (ours_s, ratio) = m["time"].values()
            rows.append(
                [
                    ours,
                    label,
                    f"{sum(m['by_kind'].values()):,}",
                    f"{kernels(m):,}",
                    m["by_kind"].get("sync", 0),
                    f"{kernels(ref):,}",
                    ref["by_kind"].get("sync", 0),
                    f"{kernels(m) / kernels(ref):.2f}",
                    ms(ours_s),
                    ms(ref_s),
                    f"{ratio:.2f}",
                ]
            )
    headers = [
        "model",
        "spinedet at",
        "all ops",
        "kernel ops",
        "host syncs",
        "torchvision kernel ops",
        "torchvision syncs",
        "kernel op ratio",
        "ms/step",
        "torchvision ms/step",
        "time ratio",
    ]
    print(table(headers, rows))
    print(
        "\ntorchvision counterparts: "
        + ", ".join(f"{ours}: {reference}" for ours, reference in PAIRS)
        + ". all ops: every op dispatched in the step; kernel ops: all but views and bare"
        " allocations (about one kernel launch each on a GPU); host syncs: ops that read a"
        " value back from the device (``.item()``, ``.tolist()``, ``nonzero``, boolean"
        " indexing) or copy Python data to it and wait (``torch.tensor(..., device=...)``;"
        " not spinedet's ``host_data.device_tensor``, which queues the copy). Ratios:"
        " spinedet / torchvision (time: median over interleaved steps)."
    )
    for ours, reference in PAIRS[:2]:
        print(f"\n### Most frequent ops in a step of {ours}\n")
        by = {label: run["models"][ours]["by_name"] for label, run in runs.items()}
        ref = runs["this tree"]["models"][reference]["by_name"]
        top = sorted(
            set().union(*by.values()), key=lambda k: -max(b.get(k, 0) for b in by.values())
        )
        rows = [[op, *(b.get(op, 0) for b in by.values()), ref.get(op, 0)] for op in top[:TOP]]
        print(table(["op", *(f"spinedet at {label}" for label in by), reference], rows))


if __name__ == "__main__":
    main()
