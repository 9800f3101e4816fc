#!/usr/bin/env bash
# The main job on a built-in default: a short RG-SNGAN training on lfw100 (the 100 faces that
# ship with scikit-image), about 6 minutes on a quiet 2-core CPU. Creates .venv and compiles the
# kernels first when needed. Extra arguments go to the trainer (e.g. --outdir).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
exec "$VPY" -m rggan_fast.demo "$@"
