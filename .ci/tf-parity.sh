#!/usr/bin/env bash
# TensorFlow parity tests (tests/test_tf_parity.py) in their own venv, .venv-tf, created on
# first use: TensorFlow and Model Garden are only needed as the reference.
#
# .venv-tf is layered on .venv: a .pth file puts .venv's site-packages after its own, so torch
# (with its CUDA libraries, most of .venv's 5.9 GB) is installed once, and .venv-tf holds only
# TensorFlow, Model Garden and the one pin they need changed (tensorboard ~=2.20, which shadows
# .venv's).
# A second copy of torch filled the CI runner's disk.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-tf
make .venv/.installed
if [ ! -x "$VENV/bin/python" ] || [ ! -f "$VENV/.installed" ]; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    purelib='import sysconfig; print(sysconfig.get_path("purelib"))'
    .venv/bin/python -c "$purelib" >"$("$VENV/bin/python" -c "$purelib")/spinedet-base.pth"
    # immutabledict and opencv: imported by official.vision at module level.
    "$VENV/bin/pip" install -q tensorflow-cpu==2.20.0 pyyaml gin-config scipy immutabledict \
        opencv-python-headless
    "$VENV/bin/pip" install -q --no-deps tf_keras==2.20.1 tf-models-official==2.20.0
    "$VENV/bin/pip" install -q --no-deps -e .
    touch "$VENV/.installed"
fi
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_tf_parity.py
