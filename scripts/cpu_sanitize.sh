#!/usr/bin/env bash
# The C++ CPU kernels under AddressSanitizer and UBSan: builds them (CPU only, RGKERNELS_SANITIZE=1) in
# a copy of the working tree under a temporary directory (the repo's own rgkernels/_C stays as it is)
# and runs the kernel tests against that build, stopping at the first report.
#   bash scripts/cpu_sanitize.sh [pytest args]   (default: the CPU kernel and layer test files)
# Needs .venv (scripts/test.sh makes it) and g++'s libasan. About 8 minutes of build on 2 cores.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VPY="$ROOT/.venv/bin/python"
[ -x "$VPY" ] || { echo "cpu_sanitize: no .venv; run scripts/test.sh first" >&2; exit 2; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/rgk-sanitize.XXXXXX")
echo "[sanitize] copy of the working tree in $WORK"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -) | tar -xf - -C "$WORK"
cd "$WORK"
RGKERNELS_SKIP_CUDA=1 RGKERNELS_SANITIZE=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} \
  "$VPY" setup.py build_ext --inplace > build.log 2>&1 || { tail -30 build.log; exit 1; }
# libstdc++ too: with libasan alone, ASan's __cxa_throw interceptor finds no real function when a
# library that throws (Triton's import) is loaded, and the process dies before any test runs.
export LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so.6)"
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# (RGKERNELS_CPU_POOL_MB=0 turns the buffer pool off, whose recycled blocks hide use-after-free from
# ASan; tests/test_cpu_runtime.py tests the pool itself and expects it on)
"$VPY" -c "import rgkernels._backend as b; e = b.extension(); assert e is not None; print('[sanitize] extension', e.__file__)"
if [ $# -eq 0 ]; then
  set -- tests/test_masked_weight.py tests/test_cpu_masked_linear.py tests/test_cpu_compact_conv.py \
         tests/test_cpu_runtime.py tests/test_layers.py -x -q
fi
# -s: with output captured, a report that halts the process would be swallowed by pytest
"$VPY" -m pytest -p no:cacheprovider -s "$@"
echo "[sanitize] clean; the build stays in $WORK"
