"""The build: the compiled extension loads, `rgkernels.info` reports it, and the fallback order
holds when the extension is made unavailable (subprocesses, so the state of this one is kept)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import rgkernels
from rgkernels import _backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, **env):
    full_env = {**os.environ, **env}
    full_env.pop("RGKERNELS_BACKEND", None) if "RGKERNELS_BACKEND" not in env else None
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, cwd=ROOT,
                          timeout=300)


def _info(**env):
    r = _run("import rgkernels.info, sys; sys.exit(rgkernels.info.main(['--json']))", **env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_extension_loads_with_its_ops():
    assert _backend.extension() is not None, (
        f"compiled extension failed to load: {_backend.extension_error()} (build with pip install -e .)")
    for op in ("masked_weight_fwd", "masked_weight_bwd", "masked_weight_grouped_fwd", "masked_weight_grouped_bwd"):
        handle = getattr(torch.ops.rgkernels, op).default
        assert torch._C._dispatch_has_kernel_for_dispatch_key(handle.name(), "CPU"), op
    info = _backend.build_info()
    assert info["openmp"] > 0, "CPU kernels were built without OpenMP"


def test_cuda_kernels_built_when_toolkit_present():
    from torch.utils.cpp_extension import CUDA_HOME

    if os.environ.get("RGKERNELS_SKIP_CUDA") == "1" or torch.version.cuda is None or CUDA_HOME is None:
        pytest.skip("no CUDA toolkit / CUDA torch: CUDA kernels are not expected")
    assert _backend.build_info().get("cuda") is True
    handle = torch.ops.rgkernels.masked_weight_fwd.default
    assert torch._C._dispatch_has_kernel_for_dispatch_key(handle.name(), "CUDA")


def test_info_reports_what_is_used():
    info = _info()
    assert info["extension"]["loaded"] is True
    assert info["torch"] == torch.__version__
    for op in ("masked_weight", "masked_weight_grouped"):
        cpu = info["ops"][op]["cpu"]
        assert cpu["available"]["cpu"] and cpu["available"]["reference"]
        assert cpu["chosen"] == "cpu"
        cuda = info["ops"][op]["cuda"]
        expected = "cuda" if torch.cuda.is_available() else "reference"
        assert cuda["chosen"] == expected
    # the op really runs on the backend info names
    w, t = torch.randn(4, 3), torch.zeros(4)
    assert _backend.choose("cpu") == "cpu"
    with rgkernels.use_backend("reference"):
        assert _backend.choose("cpu") == "reference"
        rgkernels.masked_weight(w, t)


def test_info_human_readable():
    r = _run("import runpy; runpy.run_module('rgkernels.info', run_name='__main__')")
    assert r.returncode == 0, r.stderr
    assert "torch" in r.stdout and "masked_weight" in r.stdout and "extension" in r.stdout


FALLBACK = """
import warnings, torch
warnings.simplefilter('always')
import rgkernels
from rgkernels import _backend
w = torch.randn(5, 4, requires_grad=True); t = torch.zeros(5, requires_grad=True)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    rgkernels.masked_weight(w, t).sum().backward()
    rgkernels.masked_weight(w, t).sum().backward()
msgs = [str(c.message) for c in caught if issubclass(c.category, rgkernels.RGKernelsWarning)]
print(_backend.choose('cpu'), len(msgs), msgs[0] if msgs else '')
"""


def test_fallback_to_reference_with_one_warning():
    r = _run(FALLBACK, RGKERNELS_DISABLE_EXTENSION="1")
    assert r.returncode == 0, r.stderr
    chosen, n, msg = r.stdout.strip().split(" ", 2)
    assert chosen == "reference"
    assert n == "1", r.stdout  # warned once, not silently and not every call
    assert "pip install" in msg and "\n" not in msg
    info = _info(RGKERNELS_DISABLE_EXTENSION="1")
    assert info["extension"]["loaded"] is False
    assert info["ops"]["masked_weight"]["cpu"]["chosen"] == "reference"


def test_env_override_and_bad_backend():
    assert _info(RGKERNELS_BACKEND="reference")["ops"]["masked_weight"]["cpu"]["chosen"] == "reference"
    r = _run("import torch, rgkernels; rgkernels.masked_weight(torch.randn(2, 2), torch.zeros(2))",
             RGKERNELS_BACKEND="cuda")
    assert r.returncode != 0 and "cannot run cpu tensors" in r.stderr


def test_automatic_choice_is_kept_per_extension(monkeypatch):
    """choose() keeps its automatic choice (it runs in every masked forward), but made afresh, with its
    warning, when the extension it was made with is gone; and again once it is back."""
    assert _backend.choose("cpu") == "cpu"
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.setattr(_backend, "_ext", None)
    monkeypatch.setattr(_backend, "_ext_error", "unloaded by the test")
    with pytest.warns(_backend.RGKernelsWarning, match="unloaded by the test"):
        assert _backend.choose("cpu") == "reference"
    monkeypatch.undo()
    assert _backend.choose("cpu") == "cpu"


def test_triton_reported_under_interpreter():
    info = _info(TRITON_INTERPRET="1")
    assert "triton" in info["ops"]["masked_weight"]["cpu"]["available"]
    if not info["triton"].startswith("unavailable"):
        assert info["ops"]["masked_weight"]["cpu"]["available"]["triton"] is True
        # ...but never chosen for CPU tensors unless asked for
        assert info["ops"]["masked_weight"]["cpu"]["chosen"] == "cpu"


# ---- scripts/gpu_check.sh: what a session with a GPU runs, so it must not rot where none is ----------

GPU_CHECK = os.path.join(ROOT, "scripts", "gpu_check.sh")


def test_gpu_check_names_existing_files_and_benchmarks():
    """The device steps name test files and benchmark ids: a rename here would make them run nothing."""
    import re

    text = open(GPU_CHECK).read()
    files = set(re.findall(r"tests/test_\w+\.py", text))
    assert files and all(os.path.isfile(os.path.join(ROOT, f)) for f in files), files
    benches = set(re.findall(r"benchmarks/bench_\w+\.py", text))
    assert benches and all(os.path.isfile(os.path.join(ROOT, f)) for f in benches), benches
    named = set(re.findall(r"\((test_\w+) and cuda\)", text))  # benchmark functions a -k names
    sources = "".join(open(os.path.join(ROOT, f)).read() for f in benches)
    assert named and all(f"def {n}(" in sources for n in named), named
    targets = re.search(r'filter="cuda and \$\{model:\+\$model and \}(.+)"', text).group(1)  # the -k of `targets`
    for model in ("sngan32", "stylegan2_256", "fastgan256"):
        assert model in text
        out = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/bench_masked_layers.py", "--collect-only",
                              "-q", "-p", "no:cacheprovider", "-k", f"cuda and {model} and {targets}"],
                             cwd=ROOT, capture_output=True, text=True)
        assert re.search(r"^(\d+)/\d+ tests collected", out.stdout, re.M), out.stdout[-500:]
        assert int(re.search(r"^(\d+)/\d+ tests collected", out.stdout, re.M).group(1)) > 0


def test_gpu_check_all_keeps_to_its_budget(tmp_path):
    """`all` with no time left skips every step after the build check and says so, writing its log
    to $OUT; no argument prints the usage and exits 2."""
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    r = subprocess.run(["bash", GPU_CHECK, "all", "0"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    for step in ("build", "test", "targets sngan32", "targets fastgan256", "sanitize"):
        assert f"== {step}: skipped" in r.stdout, r.stdout
    logs = [f for f in os.listdir(tmp_path) if f.endswith("_all.log")]
    assert len(logs) == 1 and "sanitize: skipped" in open(tmp_path / logs[0]).read()
    r = subprocess.run(["bash", GPU_CHECK], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "gpu_check.sh all" in r.stdout


def test_cpu_sanitize_script_and_its_build_switch():
    """scripts/cpu_sanitize.sh (not run here: its build takes minutes) parses, and RGKERNELS_SANITIZE makes
    setup.py add the sanitizer flags (checked from setup.py's own report, without compiling)."""
    script = os.path.join(ROOT, "scripts", "cpu_sanitize.sh")
    assert subprocess.run(["bash", "-n", script], capture_output=True).returncode == 0
    env = dict(os.environ, RGKERNELS_SANITIZE="1", RGKERNELS_SKIP_CUDA="1")
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "built with -fsanitize=address,undefined" in out.stdout
    env.pop("RGKERNELS_SANITIZE")
    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "fsanitize" not in out.stdout
