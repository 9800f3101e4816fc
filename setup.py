"""Build script for rggan-fast.

`pip install -e .` compiles one extension, `rgkernels._C`, from `csrc/`:
  * the C++ CPU kernels (OpenMP) always;
  * the CUDA kernels whenever a CUDA toolkit (nvcc) and a CUDA-enabled torch are present.

Environment variables:
  RGKERNELS_SKIP_EXTENSION=1  build no extension at all (pure Python install; the
                              library then runs on Triton / the PyTorch reference).
  RGKERNELS_SKIP_CUDA=1       build only the CPU kernels even where CUDA is available.
  TORCH_CUDA_ARCH_LIST        CUDA architectures, default "8.0;8.6;9.0"
                              (A100, RTX 3090/A6000, H100).
  MAX_JOBS                    parallel compile jobs (ninja).
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

DEFAULT_ARCHS = "8.0;8.6;9.0"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _find_cuda_home() -> None:
    """Set CUDA_HOME when it is unset and torch would guess it wrong.

    torch derives CUDA_HOME from the `nvcc` on PATH; when that is a wrapper script (here
    /usr/local/bin/nvcc execs /usr/local/cuda-13.0/bin/nvcc) the guess (/usr/local) has no CUDA
    headers. Prefer a directory that really holds include/cuda_runtime.h.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")) and \
                os.path.exists(os.path.join(home, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = home
            return


def _extensions():
    if _flag("RGKERNELS_SKIP_EXTENSION"):
        print("rggan-fast: RGKERNELS_SKIP_EXTENSION set, building no extension")
        return [], {}
    _find_cuda_home()
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    here = os.path.dirname(os.path.abspath(__file__))
    cpu_sources = ["csrc/ops.cpp", "csrc/masked_weight_node.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    include_dirs = [os.path.join(here, "csrc", "include")]
    # -ffp-contract=off: no FMA contraction, so the kernels match the reference bit for bit.
    cxx_flags = ["-O3", "-fopenmp", "-std=c++20", "-ffp-contract=off"]
    link_flags = ["-fopenmp"]
    if _flag("RGKERNELS_SANITIZE"):  # AddressSanitizer + UBSan build of the C++ kernels (scripts/cpu_sanitize.sh)
        cxx_flags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g", "-O1"]
        link_flags += ["-fsanitize=address,undefined"]
        print("rggan-fast: RGKERNELS_SANITIZE set: C++ kernels built with -fsanitize=address,undefined")

    use_cuda = (
        not _flag("RGKERNELS_SKIP_CUDA")
        and torch.version.cuda is not None
        and CUDA_HOME is not None
        and bool(cuda_sources)
    )
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
        print(f"rggan-fast: building CPU + CUDA kernels (CUDA_HOME={CUDA_HOME}, "
              f"archs={os.environ['TORCH_CUDA_ARCH_LIST']})")
        ext = CUDAExtension(
            "rgkernels._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[("RGKERNELS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo", "-std=c++20"]},
            extra_link_args=link_flags,
        )
    else:
        why = ("RGKERNELS_SKIP_CUDA set" if _flag("RGKERNELS_SKIP_CUDA")
               else "torch has no CUDA" if torch.version.cuda is None
               else "no CUDA toolkit found (set CUDA_HOME)")
        print(f"rggan-fast: building CPU kernels only ({why})")
        ext = CppExtension(
            "rgkernels._C",
            cpu_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["rgkernels", "rgkernels.*", "rggan_fast", "rggan_fast.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
