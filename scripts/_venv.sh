# Sourced by scripts/demo.sh and scripts/test.sh: creates .venv in the repo root when missing and
# installs rggan-fast into it, compiling the kernels. Needs only python3 (>= 3.10) and a network
# to the package index. Re-running is cheap: nothing is reinstalled unless setup.py,
# pyproject.toml or csrc/ changed (or the extension does not import).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
VPY="$ROOT/.venv/bin/python"

if [ ! -x "$VPY" ]; then
  echo "[setup] creating .venv"
  "$PYTHON" -m venv .venv
fi

# Without a visible GPU nothing can run the CUDA kernels: compile them for one architecture
# only, to check that they compile. With a GPU, setup.py's default list is used.
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] && ! nvidia-smi -L >/dev/null 2>&1; then
  export TORCH_CUDA_ARCH_LIST="9.0"
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

stamp="$ROOT/.venv/.rggan-fast-build"
want=$( { cat setup.py pyproject.toml; find csrc -type f | LC_ALL=C sort | xargs cat; echo "${TORCH_CUDA_ARCH_LIST:-}"; } | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ] || ! "$VPY" -c "import rgkernels._C" >/dev/null 2>&1; then
  start=$(date +%s)
  echo "[setup] installing build tools and torch (the kernels compile against it)"
  "$VPY" -m pip install --quiet --upgrade pip setuptools wheel ninja
  "$VPY" -m pip install --quiet torch torchvision
  echo "[setup] pip install -e . (compiling the kernels; CUDA archs: ${TORCH_CUDA_ARCH_LIST:-setup.py default})"
  "$VPY" -m pip install --quiet --no-build-isolation -e ".[train,test]"
  echo "$want" > "$stamp"
  echo "[setup] done in $(( $(date +%s) - start )) s"
fi
