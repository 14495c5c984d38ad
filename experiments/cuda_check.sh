#!/usr/bin/env bash
# The checks that need a GPU, in one run: the CUDA tests (tests/test_cuda.py; CI has no GPU and
# skips them) and the CUDA benchmark (module, training step, memory, fp16 autocast, compile).
# Usage: experiments/cuda_check.sh [OUTDIR, default runs/cuda-check]   (writes cuda_tests.log, bench_cuda.txt and
# bench_cuda_compile.txt there)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-runs/cuda-check}}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, segmentation_models_pytorch as smp; print('torch', torch.__version__, 'smp', smp.__version__)"
python3 -m pytest -q -p no:cacheprovider -n 0 -rs tests/test_cuda.py 2>&1 | tee "$out/cuda_tests.log"
tests=$?
timeout 240 python3 -m smp_cbam bench --device cuda --sections module,step,memory,amp \
    --repeats 15 2>&1 | tee "$out/bench_cuda.txt"
bench=$?
# compiling each model takes tens of seconds: fp32 only, and bounded
timeout 240 python3 -m smp_cbam bench --device cuda --sections compile --repeats 10 2>&1 | tee "$out/bench_cuda_compile.txt"
compiled=$?
echo "tests rc $tests, bench rc $bench, compile bench rc $compiled"
exit $((tests || bench || compiled))
