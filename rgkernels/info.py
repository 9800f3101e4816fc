"""`python -m rgkernels.info`: versions, the device, and which backend runs each op.

Prints torch / Triton / CUDA / compiler versions, the device, what the compiled extension
contains, and for each op and device type the available backends and the one that will be used.
`--json` prints the same as one JSON object (used by the tests).
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
from typing import Dict

import torch

from . import _backend

OPS = ("masked_weight", "masked_weight_grouped")


def _nvcc_version() -> str:
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = shutil.which("nvcc") or (CUDA_HOME and f"{CUDA_HOME}/bin/nvcc")
    if not nvcc:
        return "not found"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return "not runnable"
    return out.strip().splitlines()[-1] if out.strip() else "unknown"


def collect() -> Dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception as exc:  # not installed, or broken
        triton_version = f"unavailable ({type(exc).__name__})"
    cuda_ok = torch.cuda.is_available()
    ext = _backend.extension()
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "nvcc": _nvcc_version(),
        "device": torch.cuda.get_device_name(0) if cuda_ok else f"cpu ({platform.processor() or platform.machine()}, "
                                                               f"{torch.get_num_threads()} threads)",
        "cuda_available": cuda_ok,
        "extension": {
            "loaded": _backend.extension() is not None,
            "error": _backend.extension_error(),
            "build": _backend.build_info(),
            "cpu_gemm_reason": ext.cpu_gemm_reason() if ext is not None else None,
            "cpu_gemm_pinned": ext.cpu_gemm_pinned() if ext is not None and hasattr(ext, "cpu_gemm_pinned") else None,
            "cpu_pool": dict(ext.cpu_pool_stats()) if ext is not None else None,
        },
        "ops": {},
    }
    rows = _backend.report()
    for op in OPS:
        info["ops"][op] = {
            r["device"]: {
                "available": {name: ok for name, (ok, _) in r["available"].items()},
                "why_not": {name: why for name, (ok, why) in r["available"].items() if not ok},
                "chosen": r["chosen"],
            }
            for r in rows
        }
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rgkernels.info", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    ext = info["extension"]
    print(f"python        {info['python']}")
    print(f"torch         {info['torch']} (CUDA {info['torch_cuda']})")
    print(f"triton        {info['triton']}")
    print(f"nvcc          {info['nvcc']}")
    print(f"device        {info['device']}")
    if ext["loaded"]:
        b = ext["build"]
        print(f"extension     rgkernels._C loaded: CPU kernels ({b.get('compiler')}, OpenMP {b.get('openmp')}), "
              f"CUDA kernels {'built' if b.get('cuda') else 'not built'}")
        if b.get("cpu_isa"):
            print(f"cpu kernels   {b['cpu_isa']} variant in use (this CPU runs: {', '.join(b.get('cpu_isas', []))}; "
                  f"RGKERNELS_CPU_ISA picks another)")
        if b.get("cpu_gemm"):
            why = ext.get("cpu_gemm_reason")
            if why and why != "RGKERNELS_CPU_GEMM=aten":  # no micro-kernel here
                print(f"cpu gemm      masked linear GEMMs on aten ({why})")
            elif ext.get("cpu_gemm_pinned"):
                print(f"cpu gemm      masked linear GEMMs pinned to {b['cpu_gemm']} (RGKERNELS_CPU_GEMM)")
            else:
                print("cpu gemm      masked linear GEMMs: oneDNN micro-kernel or ATen's, the faster per layer shape "
                      "(timed at its first call; RGKERNELS_CPU_GEMM=aten|ukernel pins one)")
        pool = ext.get("cpu_pool")
        if pool:
            print(f"cpu pool      {pool['cached_bytes'] / 2**20:.1f} MB cached of {pool['limit_bytes'] / 2**20:.0f} MB "
                  f"(RGKERNELS_CPU_POOL_MB), {pool['hits']} reuses, {pool['misses']} allocations")
    else:
        print(f"extension     NOT loaded: {ext['error']}")
    print()
    print(f"{'op':24s} {'device':6s} {'cuda':6s} {'triton':7s} {'cpu':5s} {'reference':10s} used")
    for op, per_dev in info["ops"].items():
        for dev, row in per_dev.items():
            a = row["available"]
            yn = lambda k: "yes" if a[k] else "no"  # noqa: E731
            print(f"{op:24s} {dev:6s} {yn('cuda'):6s} {yn('triton'):7s} {yn('cpu'):5s} {yn('reference'):10s} {row['chosen']}")
    why = {f"{dev}/{name}": w for row in info["ops"][OPS[0]].items() for dev in [row[0]]
           for name, w in row[1]["why_not"].items()}
    if why:
        print()
        for k, w in why.items():
            print(f"  {k:16s} unavailable: {w}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
