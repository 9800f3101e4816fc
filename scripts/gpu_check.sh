#!/usr/bin/env bash
# What a session with a GPU runs (the lent H100 has torch and Triton preinstalled and no network):
#
#   bash scripts/gpu_check.sh build      pip install --no-build-isolation --no-deps -e . (sm_90), info
#   bash scripts/gpu_check.sh test       the tests that run on the device (op tests -m gpu, Triton layers)
#   bash scripts/gpu_check.sh sanitize   compute-sanitizer memcheck + racecheck over the CUDA backend's op tests
#   bash scripts/gpu_check.sh train      the trainer on the device (tests/test_training_devices.py -m gpu):
#                                        losses and gradients of each execution path against float64 on
#                                        the CPU, training iterations, checkpoint, resume on the CPU (no
#                                        clean-fid needed: the loop's evaluations are not run)
#   bash scripts/gpu_check.sh bench [K]  all GPU benchmarks (or those matching -k K) to a JSON file, then
#                                        its tables and target verdicts (benchmarks/report.py)
#   bash scripts/gpu_check.sh targets [M] the masked-layer cases the #4 GPU targets need (keep 1.0 step,
#                                        50% rows fwd_dgrad, their dense baselines), for model M
#                                        (sngan32, stylegan2_256, fastgan256; default all), then their
#                                        tables and target verdicts (benchmarks/report.py); with sngan32
#                                        (or all) also the masked-weight node's host time per call
#   bash scripts/gpu_check.sh all [S]    build, test, targets per model, train, sanitize, in that order, within
#                                        S seconds (default 330): a step that would start with less than
#                                        30 s left is skipped and one that overruns is interrupted, so one
#                                        device call brings back whatever finished (rerun the rest after)
#
# Results go to $OUT when set (the device tool copies that folder back, at most 8 files: `all` writes
# 8), else benchmarks/results/. Each step fits the device tool's 10-minute limit; `build` must have
# run in the same machine lease (a fresh machine starts bare). The lent machine has no clean-fid, so
# the test steps name the files that hold device tests instead of collecting all of tests/ (one
# module that imports it fails collection, and pytest then runs nothing). The file names carry the
# device and the date, as BENCHMARKS.md expects; commit them and summarise them there.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-python3}
DEST=${OUT:-$ROOT/benchmarks/results}
mkdir -p "$DEST"
device=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0).lower().replace(' ', '-'))" 2>/dev/null || echo no-gpu)
tag="${device}_$(date -u +%Y-%m-%d)"
XDIST=()  # pytest-xdist's arguments when it is installed (RGKERNELS_GPU_CHECK_WORKERS=0: none)
workers=${RGKERNELS_GPU_CHECK_WORKERS:-8}
if ((workers > 0)) && "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n "$workers" --dist load); fi

case "${1:-}" in
  build)
    export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
    "$PY" -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -3
    "$PY" -m rgkernels.info | tee "$DEST/${tag}_info.txt"
    ;;
  test)
    # TRITON_INTERPRET stays unset: with a device the Triton kernels run compiled.
    # The device cases of the op tests (-m gpu), then every test of the files whose tests run on the
    # device whenever there is one (Triton linear/conv kernels, sparse execution).
    # With pytest-xdist (the lent image has it) the tests run in parallel processes: most of their time
    # is Triton compiling one kernel per specialisation, single-threaded in each process.
    "$PY" -m pytest -m gpu tests/test_masked_weight.py tests/test_triton_masked_weight.py -q -p no:cacheprovider \
      "${XDIST[@]}" 2>&1 | tee "$DEST/${tag}_gpu_tests.txt" | tail -15
    "$PY" -m pytest tests/test_sparse_exec.py tests/test_triton_masked_linear.py -q -p no:cacheprovider \
      "${XDIST[@]}" 2>&1 | tee -a "$DEST/${tag}_gpu_tests.txt" | tail -15
    ;;
  sanitize)
    san=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
    for tool in memcheck racecheck; do
      "$san" --tool "$tool" --error-exitcode 1 --target-processes all \
        "$PY" -m pytest -m gpu tests/test_masked_weight.py -k cuda-cuda -q -p no:cacheprovider \
        2>&1 | tee -a "$DEST/${tag}_sanitizer.txt" | tail -5
    done
    ;;
  train)
    "$PY" -m pytest -m gpu tests/test_training_devices.py -q -p no:cacheprovider "${XDIST[@]}" 2>&1 \
      | tee "$DEST/${tag}_gpu_training.txt" | tail -15
    ;;
  bench)
    filter=${2:-cuda}
    rc=0  # a failed case still leaves the others' JSON: report it, then exit with pytest's status
    "$PY" -m pytest benchmarks -k "$filter" --benchmark-only -q -p no:cacheprovider \
      --benchmark-json="$DEST/${tag}_benchmarks_${filter//[^A-Za-z0-9_.-]/_}.json" 2>&1 | tail -5 || rc=$?
    "$PY" benchmarks/report.py "$DEST/${tag}_benchmarks_${filter//[^A-Za-z0-9_.-]/_}.json" || true
    exit "$rc"
    ;;
  targets)
    model=${2:-}
    filter="cuda and ${model:+$model and }((step and (dense or keep1.0)) or (fwd_dgrad and (dense or rows50)))"
    files=(benchmarks/bench_masked_layers.py)
    if [[ -z "$model" || "$model" == sngan32 ]]; then
      # with the first model: the host's time per call of the masked-weight op's C++ node against its Python
      # Function (a few seconds; why a small layer's step costs what it costs), in the same JSON file
      files+=(benchmarks/bench_masked_weight.py)
      filter="($filter) or (test_autograd_node_host_time and cuda)"
    fi
    if ((${#XDIST[@]})); then
      # Untimed warm-up, in parallel: each case once, so that Triton's kernels for these shapes are compiled
      # into its disk cache before the timed run, which then loads them (the "auto" decisions are not
      # kept: they are made again, alone on the device, in the timed run).
      "$PY" -m pytest "${files[@]}" -k "$filter" --benchmark-disable -q -p no:cacheprovider \
        "${XDIST[@]}" 2>&1 | tail -2
    fi
    rc=0  # a failed case still leaves the others' JSON: report it, then exit with pytest's status
    "$PY" -m pytest "${files[@]}" -k "$filter" --benchmark-only -q -p no:cacheprovider \
      --benchmark-json="$DEST/${tag}_targets${model:+_$model}.json" 2>&1 | tail -5 || rc=$?
    # the tables and the target verdicts, into this step's output (and `all`'s log)
    "$PY" benchmarks/report.py "$DEST/${tag}_targets${model:+_$model}.json" || true
    exit "$rc"
    ;;
  all)
    deadline=$((SECONDS + ${2:-330}))
    log="$DEST/${tag}_all.log"
    step() {  # step NAME ARGS...: run "$0 ARGS" if 30 s are left, interrupted (SIGINT) at the deadline
      local left=$((deadline - SECONDS))
      if ((left < 30)); then echo "== $1: skipped, ${left} s left" | tee -a "$log"; return 0; fi
      echo "== $1 ($(date -u +%H:%M:%S), ${left} s left)" | tee -a "$log"
      local rc=0
      timeout -s INT -k 10 "$left" bash "$0" "${@:2}" 2>&1 | tee -a "$log" || rc=$?
      echo "== $1: exit ${rc}, $((SECONDS))s" | tee -a "$log"
    }
    step build build
    "$PY" -c "import rgkernels._C" 2>/dev/null || { echo "== the extension did not build: stopping" | tee -a "$log"; exit 1; }
    step test test
    for m in sngan32 stylegan2_256 fastgan256; do step "targets $m" targets "$m"; done
    step train train  # before sanitize, the slowest step (kernels under compute-sanitizer)
    step sanitize sanitize
    ;;
  *)
    sed -n "2,/^set -euo/p" "$0" | grep "^#"
    exit 2
    ;;
esac
