"""CPU training under contention: 6 steps of the quickstart model alone, and beside one busy
process, with torch's default threading and with spinedet's.

Each measurement is a fresh process (the OpenMP wait policy is read when torch loads): it
builds the quickstart model (``configs/quickstart.yaml``: a narrowed SpineNet-49S Mask R-CNN,
192 px, batch 8), takes one untimed step, then times 6. The competitor is a single-threaded
busy loop in its own process, started first and stopped after the measurement (it also stops
itself after ``--busy-limit`` seconds). Settings:

- default: what a process gets from torch alone (libgomp's default wait, torch's thread count);
- PASSIVE: ``OMP_WAIT_POLICY=PASSIVE`` in the environment (threads never spin), then
  ``spinedet.engine.runtime.configure_cpu_threads()``;
- spinedet: ``import spinedet`` before torch (it sets a short spin, ``GOMP_SPINCOUNT``), then
  ``configure_cpu_threads()``: what ``spinedet train`` does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

STEPS = 6
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
SETTINGS = {
    "default": {"env": {}, "spinedet_first": False, "configure": False},
    "PASSIVE": {"env": {"OMP_WAIT_POLICY": "PASSIVE"}, "spinedet_first": False, "configure": True},
    "spinedet": {"env": {}, "spinedet_first": True, "configure": True},
}
BUSY_LOOP = """
import sys, time
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    pass
"""


def worker(setting: dict) -> None:
    if setting["spinedet_first"]:
        import spinedet  # noqa: F401 - sets the OpenMP wait before torch loads
    import torch

    if setting["configure"]:
        from spinedet.engine.runtime import configure_cpu_threads

        configure_cpu_threads()
    from _common import detection_batch
    from train_step import train_step

    from spinedet import create_model
    from spinedet.config import load_config
    from spinedet.engine.distributed import flush_denormals

    flush_denormals()
    cfg = load_config("quickstart")
    size, batch = cfg["model"]["image_size"], cfg["train"]["batch_size"]
    model = create_model(
        cfg["model"]["name"], num_classes=4, image_size=size, **cfg["model"]["options"]
    )
    step = train_step(model, *detection_batch(size, batch, 4))
    step()
    start = time.perf_counter()
    for _ in range(STEPS):
        step()
    took = time.perf_counter() - start
    print(json.dumps({"seconds": took, "threads": torch.get_num_threads()}))


def measure(setting: dict, busy: bool, busy_limit: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in WAIT_VARIABLES}
    env.update(setting["env"])
    competitor = None
    if busy:
        competitor = subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(busy_limit)])
    try:
        run = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(setting)],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
    finally:
        if competitor is not None:
            competitor.terminate()
            competitor.wait()
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        return worker(json.loads(sys.argv[2]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="rounds (median reported)")
    parser.add_argument("--busy-limit", type=float, default=600, help="competitor's life, s")
    parser.add_argument("--threads", type=int, help="ignored: threading is what is measured")
    args = parser.parse_args()
    from _common import machine, table

    print(f"# Training beside a busy process ({STEPS} quickstart steps)\n\n{machine()}\n")
    times: dict[tuple[str, bool], list[float]] = {}
    threads: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, setting in SETTINGS.items():
            for busy in (False, True):
                result = measure(setting, busy, args.busy_limit)
                times.setdefault((name, busy), []).append(result["seconds"])
                threads[name] = result["threads"]
    quiet_default = statistics.median(times[("default", False)])
    rows = []
    for name in SETTINGS:
        quiet = statistics.median(times[(name, False)])
        busy = statistics.median(times[(name, True)])
        rows.append(
            [
                name,
                threads[name],
                f"{quiet:.1f}",
                f"{busy:.1f}",
                f"{busy / quiet:.2f}",
                f"{busy / quiet_default:.2f}",
            ]
        )
    headers = ["setting", "threads", "quiet s", "busy s", "busy / quiet", "busy / default quiet"]
    print(table(headers, rows))
    print(
        f"\nSeconds for {STEPS} steps (median of {args.repeats} round(s)); busy: one"
        " single-threaded busy loop in another process. The machine's other load moves these"
        " figures; compare the ratios."
    )


if __name__ == "__main__":
    main()
