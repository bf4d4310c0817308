#!/usr/bin/env bash
# Every GPU check in one run, for a lent GPU machine (run from the repository root):
# the fast-path equality tests on CUDA, the throughput table (bf16, batches 8 and 16, peak
# memory), a profile of one training step, and a short training + evaluation of the
# quickstart on CUDA. Tables go to $OUT (default gpu_results/); put them in RESULTS.md.
#
# The device's python has torch, torchvision, numpy, pyyaml, tqdm, pytest, tensorboard,
# safetensors and matplotlib, not pycocotools or faster-coco-eval: download their cp312 wheels
# here first (`echo /.whl/ >> .git/info/exclude`), carry `.whl`, and this script installs them:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --platform manylinux_2_28_x86_64 -d .whl pycocotools==2.0.11 faster-coco-eval==1.8.0
# About 6-8 minutes on an H100; give the call a 540 s limit.
set -uo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
step() { echo "== $1 ($(date +%T))"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, torchvision; print(torch.__version__, torchvision.__version__)" | tee -a "$OUT/gpu.txt"

step "fast paths equal the plain ones on CUDA"
timeout 120 python3 -m pytest -q -p no:cacheprovider -rs tests/test_fast_paths.py 2>&1 | tail -4 \
    | tee "$OUT/fast_paths.txt"

step "throughput"
timeout 240 python3 benchmarks/gpu_throughput.py --repeats 10 | tee "$OUT/gpu_throughput.md"

step "profile"
timeout 90 python3 benchmarks/gpu_profile.py | tee "$OUT/gpu_profile.md"

step "quickstart on CUDA"
DATA=/tmp/shapes
python3 -m spinedet.cli data shapes --out "$DATA" --num-images 400 --size 192 --splits 0.8 0.1 0.1 >/dev/null
sets=()
for s in train val; do
    sets+=(--set "data.$s.annotations=$DATA/$s.json" --set "data.$s.images=$DATA/images")
done
timeout 150 python3 -m spinedet.cli train quickstart --out /tmp/demo --device "${DEVICE:-cuda}" "${sets[@]}" \
    --set data.workers=4 --set "train.epochs=${EPOCHS:-12}" 2>&1 | tail -5 | tee "$OUT/train.txt"
timeout 60 python3 -m spinedet.cli eval /tmp/demo --annotations "$DATA/test.json" --images "$DATA/images" \
    --device "${DEVICE:-cuda}" 2>&1 | tail -8 | tee "$OUT/eval.txt"
step "done"
