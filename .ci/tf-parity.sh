#!/usr/bin/env bash
# TensorFlow parity tests (tests/test_tf_parity.py) in their own venv, .venv-tf, created on
# first use: TensorFlow and Model Garden are only needed as the reference.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-tf
if [ ! -x "$VENV/bin/python" ] || [ ! -f "$VENV/.installed" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q -r requirements.txt
    # immutabledict and opencv: imported by official.vision at module level.
    "$VENV/bin/pip" install -q tensorflow-cpu==2.20.0 pyyaml gin-config scipy immutabledict \
        opencv-python-headless
    "$VENV/bin/pip" install -q --no-deps tf_keras==2.20.1 tf-models-official==2.20.0
    "$VENV/bin/pip" install -q --no-deps -e .
    touch "$VENV/.installed"
fi
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_tf_parity.py
