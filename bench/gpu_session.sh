#!/usr/bin/env bash
# Everything a lent GPU machine should run, as one call from the repository root (no install: the
# machine's torch, transformers and triton are used as they are):
#   bash bench/gpu_session.sh            # writes logs and gpu.json under $OUT (or /tmp/gpu-out)
# First the GPU tests (compiled kernels, captured graphs, fast vs eager paths), then bench/gpu.py;
# the two time limits (170 s + 380 s) keep the call inside the device tool's 600 s per command, and
# bench/gpu.py saves its report after every phase, so a cut run keeps what it measured.
set -o pipefail
export PYTHONPATH="$PWD/src:$PWD/tests" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu-out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/machine.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'triton', triton.__version__)" | tee -a "$OUT/machine.txt"
timeout "${TEST_TIMEOUT:-170}" python3 -m pytest -p no:cacheprovider -o addopts="" -q --maxfail=6 -rs \
    tests/test_kernels.py tests/test_gpu.py tests/test_quant_cuda.py 2>&1 | tee "$OUT/pytest.log"
tests=$?
timeout "${BENCH_TIMEOUT:-380}" python3 bench/gpu.py --output "$OUT/gpu.json" --profile-dir "$OUT" "$@" 2>&1 | tee "$OUT/bench.log"
bench=$?
echo "tests exit $tests, bench exit $bench"
exit $(( tests || bench ))
