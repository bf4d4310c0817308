"""Run every benchmark and write benchmarks/RESULTS.md: ``python benchmarks/run_all.py``.

Each script runs in its own process; its printed tables become a section of the file, after
the hand-written analysis in benchmarks/notes.md. Scripts' stderr (warnings, TensorFlow's
logs) goes to a log file in the temporary directory, named at the end. ``--only SCRIPT ...``
reruns those scripts and keeps the other sections of the existing file. Without CUDA the GPU
scripts print a skip line, and their sections from a GPU run stay; ``--tables DIR`` takes the
sections of the scripts it names from DIR (e.g. ``gpu_throughput.md``, as
``benchmarks/gpu_checks.sh`` writes them on a lent GPU machine) instead of running them.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = [
    ("backbone_vs_tf.py", ["--compile"]),
    ("detector_latency.py", []),
    ("train_step.py", []),
    ("profile_inference.py", []),
    ("gpu_throughput.py", []),
    ("gpu_profile.py", []),
    ("coco_eval_speed.py", []),
    ("op_count.py", ["--baseline", "0fa51dc"]),  # the tree before the op reductions
    ("cpu_contention.py", []),
    ("roi_align_cpu.py", []),
    ("loader_throughput.py", []),
    ("mask_output.py", []),
    ("tiled_predict.py", []),
]
SECTION = "<!-- {} -->"  # opens each script's section, so that --only can replace it
# How a script says it cannot run here (the GPU scripts without CUDA, tiled_predict.py without
# a trained run): an earlier run's section, if any, stays.
SKIPPED = "skipped:"


def kept_sections(text: str) -> dict[str, str]:
    """Existing sections by script name."""
    parts = re.split(r"^<!-- (\S+\.py) -->\n", text, flags=re.M)
    return {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--only", nargs="+", metavar="SCRIPT", help="rerun only these scripts")
    parser.add_argument("--tables", type=Path, help="take SCRIPT's output from DIR/SCRIPT.md")
    args = parser.parse_args()
    unknown = set(args.only or ()) - {script for script, _ in SCRIPTS}
    if unknown:
        parser.error(
            f"unknown script(s) {sorted(unknown)}; expected some of {[s for s, _ in SCRIPTS]}"
        )
    previous = args.out.read_text() if args.out.exists() else ""
    kept = kept_sections(previous)
    extra = ["--threads", str(args.threads)] if args.threads else []
    sections, failed = [], []
    log_path = Path(tempfile.gettempdir()) / "spinedet-run_all.log"
    with open(log_path, "w") as log:
        for script, options in SCRIPTS:
            if args.only and script not in args.only:
                if script in kept:
                    sections.append(f"{SECTION.format(script)}\n{kept[script]}")
                continue
            table_file = args.tables / f"{Path(script).stem}.md" if args.tables else None
            if table_file and table_file.exists():
                body = table_file.read_text()
                run_line = (
                    f"_Taken from `{table_file.name}` (`--tables`), on {time.strftime('%Y-%m-%d')}"
                )
            else:
                print(f"running {script} ...", flush=True)
                start = time.perf_counter()
                run = subprocess.run(
                    [sys.executable, str(HERE / script), *options, *extra],
                    stdout=subprocess.PIPE,
                    stderr=log,
                    text=True,
                )
                took = time.perf_counter() - start
                if run.stdout.startswith(SKIPPED) and not kept.get(script, SKIPPED).startswith(
                    SKIPPED
                ):
                    sections.append(f"{SECTION.format(script)}\n{kept[script]}")  # a real run's
                    continue
                body = run.stdout
                if run.returncode:
                    failed.append(script)
                    body += f"\n\n**{script} failed (exit {run.returncode}).**"
                run_line = f"_`{script} {' '.join(options)}` took {took:.0f} s"
                if args.only:
                    run_line = f"_`{' '.join([script, *options, *extra])}` took {took:.0f} s"
                    run_line += f", on {time.strftime('%Y-%m-%d')}"
            body = body.strip().replace("\n# ", "\n## ")
            if body.startswith("# "):
                body = "#" + body
            sections.append(f"{SECTION.format(script)}\n{body}\n\n{run_line}._")
    notes = (HERE / "notes.md").read_text().strip()
    command = " ".join(["python benchmarks/run_all.py", *extra])
    when = f"on {time.strftime('%Y-%m-%d')}"
    full_run = args.only and re.search(r"Generated by `([^`]*)` (on [\d-]+)", previous)
    if full_run:  # --only: the header of the full run stays, with the date of its run
        command, when = full_run.groups()
        when += " (sections marked with a date rerun alone, `--only`)"
    header = (
        f"# spinedet benchmarks\n\nGenerated by `{command}` {when}; do not edit by hand (the"
        " analysis lives in benchmarks/notes.md)."
    )
    args.out.write_text("\n\n".join([header, notes, *sections]) + "\n")
    print(f"wrote {args.out}; scripts' stderr in {log_path}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
