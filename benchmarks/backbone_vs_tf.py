"""Backbone latency, batch 1, 640 x 640 on CPU: spinedet's SpineNet vs TensorFlow Model Garden's.

Model Garden runs as a ``tf.function`` with the same intra-op thread count (inter-op 1) as
torch. Both live in one process, so the TF reference venv (``.venv-tf``, which also holds
spinedet) runs this script when the current interpreter has no TensorFlow.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _common import ROOT, compare, inference, machine, ms, parse_args, table  # noqa: E402

from spinedet import create_model  # noqa: E402 - before TensorFlow (see tf_reference)
from spinedet.optimize import optimize_for_inference  # noqa: E402

SIZE = 640
TF_PYTHON = ROOT / ".venv-tf" / "bin" / "python"
CHECK = "import tensorflow, official"


def has_tensorflow(python: str) -> bool:
    run = subprocess.run([python, "-c", CHECK], capture_output=True, timeout=300)
    return run.returncode == 0


def main() -> int:
    args = parse_args(
        __doc__.splitlines()[0],
        compile={"action": "store_true", "help": "also time torch.compile'd backbones"},
    )
    title = f"# Backbone inference, batch 1, {SIZE} x {SIZE}: spinedet vs Model Garden"
    if not has_tensorflow(sys.executable):
        if not os.environ.get("SPINEDET_BENCH_IN_TF") and TF_PYTHON.exists():
            if has_tensorflow(str(TF_PYTHON)):
                env = {**os.environ, "SPINEDET_BENCH_IN_TF": "1"}
                return subprocess.run([str(TF_PYTHON), __file__, *sys.argv[1:]], env=env).returncode
        why = f"{TF_PYTHON} is missing" if not TF_PYTHON.exists() else f"`{CHECK}` fails there"
        print(f"{title}\n\nskipped: needs TensorFlow + tf-models-official ({why}).")
        return 0

    import tensorflow as tf

    sys.path.insert(0, str(ROOT / "tests"))
    from tf_reference import build_spinenet

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    print(f"{title}\n\n{machine()}; TensorFlow {tf.__version__}\n")
    image = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    image_tf = tf.constant(image.permute(0, 2, 3, 1).numpy())
    rows = []
    for variant in ("49s", "49"):
        reference = build_spinenet(variant, (SIZE, SIZE))
        run_tf = tf.function(lambda x, m=reference: m(x, training=False))
        model = create_model(f"spinenet{variant}").eval()
        fast = optimize_for_inference(model)
        candidates = {
            "Model Garden (tf.function)": lambda f=run_tf: f(image_tf)["7"].numpy(),
            "spinedet": inference(lambda m=model: m(image)),
            "spinedet optimised": inference(lambda m=fast: m(image)),
        }
        if args.compile:
            compiled = optimize_for_inference(model, compile=True)
            candidates["spinedet optimised+compiled"] = inference(lambda m=compiled: m(image))
        times = compare(candidates, "Model Garden (tf.function)", args.repeats, args.warmup)
        for label, t in times.items():
            rows.append([f"SpineNet-{variant.upper()}", label, ms(t.median_s), f"{t.ratio:.2f}"])
    print(table(["backbone", "implementation", "median ms", "ratio vs Model Garden"], rows))
    print("\nratio: median over interleaved rounds of time / Model Garden time in that round.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
