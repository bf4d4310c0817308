#!/usr/bin/env bash
# Every GPU check in one run, for a lent GPU machine (run from the repository root): the
# fast-path and CUDA-graph equality tests on CUDA, the throughput table (bf16, batches 8 and
# 16, peak memory), a profile of one training step, the quickstart trained with CUDA graphs
# on and off, and the training loader's images/s on the machine's cores. Tables go to $OUT (default gpu_results/); put them in RESULTS.md with
# `python benchmarks/run_all.py --only gpu_throughput.py gpu_profile.py --tables $OUT`.
#
# The device's python has torch, torchvision, numpy, pyyaml, tqdm, pytest, tensorboard,
# safetensors and matplotlib, not pycocotools or faster-coco-eval: download their cp312 wheels
# here first (`echo /.whl/ >> .git/info/exclude`), carry `.whl`, and this script installs them:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     --platform manylinux_2_28_x86_64 -d .whl pycocotools==2.0.11 faster-coco-eval==1.8.0
# About 7 minutes on an H100 (2026-11-27: 378 s with the profile cut short at 80 s); each step
# has its own limit. Give the call a 540 s limit: with the machine's start that is most of a
# session's 15 device minutes.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
step() { echo "== $1 ($(date +%T))"; }
# SECTIONS picks what runs (default: all), e.g. SECTIONS="tests throughput" for a short call.
want() { [[ " ${SECTIONS:-tests throughput profile quickstart loader} " == *" $1 "* ]]; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, torchvision; print(torch.__version__, torchvision.__version__)" | tee -a "$OUT/gpu.txt"

if want tests; then
step "fast paths and CUDA graphs equal the plain ones on CUDA"
timeout 90 python3 -m pytest -q -p no:cacheprovider -rs --tb=short \
    tests/test_cuda_graphs.py tests/test_fast_paths.py tests/test_postprocess.py \
    tests/test_matching.py 2>&1 | tail -40 | tee "$OUT/tests.txt"
fi

if want throughput; then
step "throughput"
timeout 210 python3 benchmarks/gpu_throughput.py --repeats 8 | tee "$OUT/gpu_throughput.md"
fi

if want profile; then
step "profile"
timeout 150 python3 benchmarks/gpu_profile.py | tee "$OUT/gpu_profile.md"
fi

if want quickstart; then
step "quickstart on CUDA, CUDA graphs on (the default) and off"
DATA=/tmp/shapes
python3 -m spinedet.cli data shapes --out "$DATA" --num-images 400 --size 192 --splits 0.8 0.1 0.1 >/dev/null
sets=()
for s in train val; do
    sets+=(--set "data.$s.annotations=$DATA/$s.json" --set "data.$s.images=$DATA/images")
done
for graphs in true false; do
    timeout 60 python3 -m spinedet.cli train quickstart --out "/tmp/demo-$graphs" --device cuda \
        "${sets[@]}" --set data.workers=4 --set "train.epochs=${EPOCHS:-4}" \
        --set "train.cuda_graphs=$graphs" 2>&1 | tr '\r' '\n' | grep -E "CUDA graphs|100%|trained" \
        | tail -2 | tee "$OUT/train-$graphs.txt"
    grep -h "CUDA graphs" "/tmp/demo-$graphs/log.txt" | tee -a "$OUT/train-$graphs.txt"
done
timeout 40 python3 -m spinedet.cli eval /tmp/demo-true --annotations "$DATA/test.json" \
    --images "$DATA/images" --device cuda 2>&1 | tail -8 | tee "$OUT/eval.txt"
fi
if want loader; then
step "training loader: images/s per DataLoader process count (the machine's cores)"
timeout 60 python3 benchmarks/loader_throughput.py | tee "$OUT/loader_throughput.md"
fi
step "done"
