#!/usr/bin/env bash
# Runs every test (creating .venv and compiling the kernels first when needed).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k masked_weight`.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
exec "$VPY" -m pytest tests "$@"
