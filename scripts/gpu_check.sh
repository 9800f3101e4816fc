#!/usr/bin/env bash
# What a session with a GPU runs (the lent H100 has torch and Triton preinstalled and no network):
#
#   bash scripts/gpu_check.sh build      pip install --no-build-isolation --no-deps -e . (sm_90), info
#   bash scripts/gpu_check.sh test       the GPU tests (pytest -m gpu) and the CPU tests of the kernels
#   bash scripts/gpu_check.sh sanitize   compute-sanitizer memcheck + racecheck over the CUDA op tests
#   bash scripts/gpu_check.sh bench [K]  all GPU benchmarks (or those matching -k K) to a JSON file
#   bash scripts/gpu_check.sh targets [M] the masked-layer cases the #4 GPU targets need (keep 1.0 step,
#                                        50% rows fwd_dgrad, their dense baselines), for model M
#                                        (sngan32, stylegan2_256, fastgan256; default all)
#
# Results go to $OUT when set (the device tool copies that folder back), else benchmarks/results/.
# Each step fits the device tool's 10-minute limit; `build` must have run in the same machine
# lease (a fresh machine starts bare). The file names carry the device and the date, as
# BENCHMARKS.md expects; commit them and summarise them there.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
DEST=${OUT:-$ROOT/benchmarks/results}
mkdir -p "$DEST"
device=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0).lower().replace(' ', '-'))" 2>/dev/null || echo no-gpu)
tag="${device}_$(date -u +%Y-%m-%d)"

case "${1:-}" in
  build)
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
    "$PY" -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -3
    "$PY" -m rgkernels.info | tee "$DEST/${tag}_info.txt"
    ;;
  test)
    # TRITON_INTERPRET stays unset: with a device the Triton kernels run compiled.
    "$PY" -m pytest -m gpu tests -q -p no:cacheprovider 2>&1 | tee "$DEST/${tag}_gpu_tests.txt" | tail -15
    "$PY" -m pytest tests/test_masked_weight.py tests/test_sparse_exec.py tests/test_triton_masked_linear.py \
      tests/test_cpu_masked_linear.py -q -p no:cacheprovider 2>&1 | tail -3
    ;;
  sanitize)
    san=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
    for tool in memcheck racecheck; do
      "$san" --tool "$tool" --error-exitcode 1 --target-processes all \
        "$PY" -m pytest -m gpu tests/test_masked_weight.py -k cuda -q -p no:cacheprovider \
        2>&1 | tee "$DEST/${tag}_sanitizer_${tool}.txt" | tail -5
    done
    ;;
  bench)
    filter=${2:-cuda}
    "$PY" -m pytest benchmarks -k "$filter" --benchmark-only -q -p no:cacheprovider \
      --benchmark-json="$DEST/${tag}_benchmarks_${filter//[^A-Za-z0-9_.-]/_}.json" 2>&1 | tail -5
    ;;
  targets)
    model=${2:-}
    filter="cuda and ${model:+$model and }((step and (dense or keep1.0)) or (fwd_dgrad and (dense or rows50)))"
    "$PY" -m pytest benchmarks/bench_masked_layers.py -k "$filter" --benchmark-only -q -p no:cacheprovider \
      --benchmark-json="$DEST/${tag}_targets${model:+_$model}.json" 2>&1 | tail -5
    ;;
  *)
    sed -n 2,16p "$0"
    exit 2
    ;;
esac
