"""benchmarks/report.py: the tables and target verdicts that BENCHMARKS.md is written from.

Synthetic pytest-benchmark files with known medians (ratios and verdicts computed by hand), one real
paired CPU benchmark run end to end (its JSON must carry the versions, and the report must read it), and
the errors for files that are not these benchmarks' results."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import report  # noqa: E402  (benchmarks/report.py)


def _layer(model, layer, phase, impl, sparsity, median, device="cuda", path=None, host=None):
    extra = dict(model=model, layer=layer, device=device, phase=phase, impl=impl, sparsity=sparsity,
                 dtype="torch.float32")
    if path:
        extra["path"] = path
    if host is not None:
        extra["host_median_s"] = host
    return {"name": f"test_masked_layer[{model}-{layer}-{device}-{phase}-{impl}-{sparsity}]",
            "stats": {"median": median}, "extra_info": extra}


def _paired(model, layer, sparsity, dense, masked, skipped=False):
    return {"name": f"test_masked_layer_cpu_ratio[{model}-{layer}-cpu-{sparsity}]", "stats": {"median": dense + masked},
            "extra_info": dict(model=model, layer=layer, device="cpu", sparsity=sparsity, threads=1, clock="thread_time",
                               dense_median_s=dense, masked_median_s=masked, ratio=masked / dense,
                               rows_skipped=skipped)}


def _write(tmp_path, benches, name="r.json"):
    data = {"machine_info": {"cpu": {"brand_raw": "Test CPU", "count": 2},
                             "rgkernels": {"torch": "9.9", "triton": "8.8", "cuda": "13.0", "gpu": "Test GPU",
                                           "extension": "compiled, with CUDA kernels"}},
            "commit_info": {"id": "abcdef1234567890", "dirty": False}, "datetime": "2026-11-27T00:00:00",
            "benchmarks": benches}
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return str(p)


def test_theoretical_ratios_follow_active_flops():
    # DESIGN.md §4: a step is 1/3 weight gradient (dense) + 2/3 forward and input gradient (scaled by density)
    assert report.theoretical("step", "keep1.0") == pytest.approx(1.0)
    assert report.theoretical("step", "keep0.5") == pytest.approx(2.0 / 3.0)
    assert report.theoretical("step", "rows25") == pytest.approx(1.0 / 3.0 + 2.0 / 3.0 * 0.75)
    assert report.theoretical("fwd_dgrad", "rows50") == pytest.approx(0.5)
    assert report.theoretical("fwd_dgrad", "keep0.3") == pytest.approx(0.3)
    with pytest.raises(report.ReportError, match="sparsity"):
        report.density("half")
    with pytest.raises(report.ReportError, match="phase"):
        report.theoretical("forward", "keep1.0")


def test_gpu_tables_and_verdicts(tmp_path):
    benches = [
        # layer A: keep 1.0 at exactly the bound (within it), rows50 fwd_dgrad 0.6 (within 0.65)
        _layer("m", "A", "step", "dense", "-", 2.0), _layer("m", "A", "step", "masked", "keep1.0", 2.1, path="fused"),
        _layer("m", "A", "fwd_dgrad", "dense", "-", 1.0),
        _layer("m", "A", "fwd_dgrad", "masked", "rows50", 0.6, path="fused"),
        # layer B: keep 1.0 just over; rows50 0.67 against its own fwd_dgrad baseline (2 s, not the step's 1 s)
        _layer("m", "B", "step", "dense", "-", 1.0),
        _layer("m", "B", "step", "masked", "keep1.0", 1.0511, path="masked_weight"),
        _layer("m", "B", "fwd_dgrad", "dense", "-", 2.0),
        _layer("m", "B", "fwd_dgrad", "masked", "rows50", 1.34, path="masked_weight"),
        # the fused path on its own: within both bounds; the eager reference far over (never a target)
        _layer("m", "A", "step", "fused", "keep1.0", 2.0), _layer("m", "B", "step", "fused", "keep1.0", 1.0),
        _layer("m", "A", "step", "eager", "keep1.0", 9.0), _layer("m", "B", "step", "eager", "keep1.0", 9.0),
    ]
    text = report.report(_write(tmp_path, benches))
    assert "- GPU: Test GPU" in text and "torch 9.9, Triton 8.8" in text and "commit: abcdef123456" in text
    assert "| m A | 2 s | 1.05 (fused) |" in text
    assert "| m B | 1 s | 1.05 (mw) |" in text
    assert "| m B | 2 s | - | - | - | - | - | 0.67 (mw) |" in text  # fwd_dgrad over its own baseline
    assert "| m A | 1 s | - | - | - | - | - | 0.60 (fused) |" in text
    assert "| m A | 2 s | 4.50 |" in text  # the eager table
    assert "| theoretical (active FLOPs) | | 1.00 | 0.70 | 0.50 | 0.30 | 0.75 | 0.50 |" in text  # fwd_dgrad: d
    assert "| theoretical (active FLOPs) | | 1.00 | 0.80 | 0.67 | 0.53 | 0.83 | 0.67 |" in text  # step
    verdicts = text.split("Targets (#4):")[1]
    assert "eager" not in verdicts and "4.5" not in verdicts
    lines = [ln for ln in verdicts.splitlines() if ln.strip()]
    keep_auto = next(ln for ln in lines if "keep ratio 1.0" in ln and 'execution "auto"' in ln)
    assert keep_auto.startswith("- GPU target (float32)")
    assert "**missed** (1 of 2 layers within 1.05x; worst m B 1.051x); over: m B 1.051x" in keep_auto
    keep_fused = next(ln for ln in lines if '"fused" alone' in ln)
    assert "not the target" in keep_fused and "**met** (2 of 2 layers" in keep_fused and "worst m A 1.000x" in keep_fused
    rows = next(ln for ln in lines if "50% of rows" in ln and 'execution "auto"' in ln)
    assert "**missed** (1 of 2 layers within 0.65x; worst m B 0.670x); over: m B 0.670x" in rows


def test_gpu_verdict_incomplete_or_not_measured(tmp_path):
    # a layer measured dense but not masked (a crashed or deselected case): not "met"
    benches = [_layer("m", "A", "step", "dense", "-", 1.0), _layer("m", "A", "step", "masked", "keep1.0", 1.0),
               _layer("m", "B", "step", "dense", "-", 1.0)]
    text = report.report(_write(tmp_path, benches))
    line = next(ln for ln in text.splitlines() if 'execution "auto"' in ln and ln.startswith("- GPU target"))
    assert "**incomplete** (1 of 2 layers within 1.05x" in line and "not measured (dense baseline only): m B" in line
    # only the fused path measured: the target's own case is reported absent
    benches = [_layer("m", "A", "step", "dense", "-", 1.0), _layer("m", "A", "step", "fused", "keep1.0", 1.0)]
    text = report.report(_write(tmp_path, benches, "f.json"))
    assert '**not measured** (no execution "auto" case in this file)' in text
    assert '"fused" alone: **met**' in text
    # two dtypes are judged apart
    benches = [_layer("m", "A", "step", "dense", "-", 1.0), _layer("m", "A", "step", "masked", "keep1.0", 1.2)]
    bf16 = [dict(b, extra_info=dict(b["extra_info"], dtype="torch.bfloat16")) for b in
            (_layer("m", "A", "step", "dense", "-", 1.0), _layer("m", "A", "step", "masked", "keep1.0", 1.0))]
    text = report.report(_write(tmp_path, benches + bf16, "d.json"))
    assert "GPU target (float32), keep ratio 1.0" in text and "GPU target (bfloat16), keep ratio 1.0" in text
    assert "**missed** (0 of 1" in text and "**met** (1 of 1" in text


def test_host_time_table(tmp_path):
    benches = [_layer("m", "A", "step", "dense", "-", 100e-6, host=50e-6),
               _layer("m", "A", "step", "masked", "keep1.0", 130e-6, path="masked_weight", host=120e-6),
               _layer("m", "B", "step", "dense", "-", 2e-3, host=1e-4),
               _layer("m", "B", "step", "masked", "keep1.0", 2e-3, host=1e-4),
               _layer("m", "C", "step", "dense", "-", 2e-3)]  # no host time: not in the table
    text = report.report(_write(tmp_path, benches))
    assert "the host's time to issue a step" in text
    assert "| m A | 100 us / 50 us | 130 us / 120 us | auto |" in text  # 120/130 >= 0.8; 50/100 not
    assert "| m B | 2 ms / 100 us | 2 ms / 100 us | - |" in text
    assert "| m C |" not in text.split("the host's time")[1]


def test_node_host_time_table(tmp_path):
    bench = {"name": "test_autograd_node_host_time[cpu]", "stats": {"median": 1.0},
             "extra_info": dict(device="cpu", numel=4096, cpp_median_s=64e-6, python_median_s=128e-6, ratio=0.5)}
    text = report.report(_write(tmp_path, [bench]))
    assert "| cpu | 64 us | 128 us | 0.50 |" in text and "not tabulated" not in text


def test_cpu_gemm_paths_table(tmp_path):
    bench = {"name": "test_cpu_masked_linear_gemm_paths[s-L-cpu-keep1.0]", "stats": {"median": 1.0},
             "extra_info": dict(model="s", layer="L", sparsity="keep1.0", dense_median_s=0.002,
                                ratio_ukernel=0.9, ratio_aten=1.3)}
    text = report.report(_write(tmp_path, [bench]))
    assert "| layer | sparsity | dense | oneDNN micro-kernel | ATen |" in text
    assert "| s L | keep1.0 | 2 ms | 0.90 | 1.30 |" in text


def test_missing_dense_baseline_is_shown_not_divided(tmp_path):
    text = report.report(_write(tmp_path, [_layer("m", "A", "step", "masked", "keep1.0", 1.0)]))
    assert "| m A | - | no dense |" in text
    assert "no case of a #4 target" in text


def test_cpu_paired_table_and_verdict(tmp_path):
    benches = [_paired("s", "L", "keep1.0", 1.0, 1.05), _paired("s", "L", "rows50", 2.0, 1.4, skipped=True),
               _paired("s", "C", "keep0.5", 1.0, 1.2)]
    text = report.report(_write(tmp_path, benches))
    assert "| s L | 1, thread_time | 1 s-2 s | 1.05 | - | - | - | - | 0.70* |" in text
    assert "| theoretical (active FLOPs) | | | 1.00 | 0.80 | 0.67 | 0.53 | 0.83 | 0.67 |" in text  # a step
    verdict = next(ln for ln in text.splitlines() if ln.startswith("- CPU target"))
    assert "**missed** (2 of 3 cases within it; range 0.700-1.200x)" in verdict
    assert "s C keep0.5 (1 thread) 1.200x" in verdict and "s L" not in verdict.split("over:")[1]


def test_bad_files_name_the_problem(tmp_path, capsys):
    not_json = tmp_path / "x.json"
    not_json.write_text("{oops")
    other = tmp_path / "y.json"
    other.write_text(json.dumps({"results": []}))
    no_extra = _write(tmp_path, [{"name": "test_masked_layer[x]", "stats": {"median": 1.0}, "extra_info": {}}], "z.json")
    paired = _paired("s", "L", "keep1.0", 1.0, 1.0)
    del paired["extra_info"]["dense_median_s"]
    no_dense = _write(tmp_path, [paired], "w.json")
    good = _write(tmp_path, [_paired("s", "L", "keep1.0", 1.0, 1.0)], "v.json")
    assert report.main([str(not_json), str(other), no_extra, no_dense, good]) == 1
    out, err = capsys.readouterr()
    assert "x.json: cannot read a JSON file" in err
    assert "y.json: not a pytest-benchmark JSON file" in err
    assert "test_masked_layer[x]: lacks device, dtype" in err
    assert "test_masked_layer_cpu_ratio[s-L-cpu-keep1.0]: lacks dense_median_s" in err
    assert "v.json" in out and "**met**" in out  # the files after a bad one are still reported


def test_a_real_paired_run_reports_its_versions(tmp_path):
    """The benchmark's own JSON (benchmarks/conftest.py adds the versions) read back by the report."""
    pytest.importorskip("pytest_benchmark", reason="the benchmarks need pytest-benchmark")
    out = tmp_path / "bench.json"
    env = dict(os.environ, RGKERNELS_BENCH_PAIRED_ROUNDS="2")
    r = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/bench_masked_layers.py", "-q", "-p",
                        "no:cacheprovider", "--benchmark-only", f"--benchmark-json={out}",
                        "-k", "test_masked_layer_cpu_ratio and sngan32-G.l1 and (keep1.0 or rows50)"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    info = json.loads(out.read_text())["machine_info"]["rgkernels"]
    import torch

    assert info["torch"] == torch.__version__ and info["triton"] and "extension" in info
    r = subprocess.run([sys.executable, "benchmarks/report.py", str(out)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"torch {torch.__version__}" in r.stdout
    assert "| sngan32 G.l1 | 1, thread_time |" in r.stdout and "- CPU target" in r.stdout
