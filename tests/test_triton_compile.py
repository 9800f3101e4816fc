"""Every Triton kernel compiles for the H100 (sm_90) with the tile sizes and dot dtypes the wrappers
choose on a GPU (scripts/triton_compile_check.py): the interpreter, which runs the other Triton
tests here, accepts programs the compiler refuses and runs other tile sizes, and bf16 dots only
exist compiled. bf16 covers the kernels' compiled-only dot dtype; the script's full run (every dtype
and more shapes, ~7 min) is for kernel changes."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.usefixtures("triton_required")  # conftest: fails on Linux without Triton
def test_every_triton_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "triton_compile_check.py"), "--arch", "90",
                        "--quick", "--dtypes", "bfloat16"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-6000:]
    compiled = set(re.search(r"kernels \((.*)\) compiled", r.stdout).group(1).split(", "))
    assert compiled == _launchable_kernels(), "scripts/triton_compile_check.py must launch every kernel"


def _launchable_kernels():
    """The kernels (not the helpers) the Triton modules jit: their launchable names start with _k_."""
    from rgkernels.ops import triton_mask_stats, triton_masked_conv, triton_masked_linear, triton_masked_weight

    names = set()
    for mod in (triton_mask_stats, triton_masked_conv, triton_masked_linear, triton_masked_weight):
        names |= {n for n in mod._KERNELS._names if n.startswith("_k_")}
    return names
