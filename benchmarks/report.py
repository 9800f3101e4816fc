"""Turns pytest-benchmark JSON files of the masked-layer benchmarks into BENCHMARKS.md tables and target verdicts.

    python benchmarks/report.py benchmarks/results/FILE.json [FILE.json ...]

For each file: the machine (CPU, GPU, torch / Triton versions as benchmarks/conftest.py records them), then

  * `test_masked_layer` (bench_masked_layers.py): one table per device, phase and implementation, with each
    layer's dense median and the masked / dense ratio of the medians per sparsity, under a row with the
    theoretical ratio (active FLOPs, DESIGN.md §4: a step is forward + input gradient + weight gradient,
    and only the first two shrink with the density d, so step = 1/3 + 2/3 d and fwd_dgrad = d; only the
    entirely pruned rows are a saving a dense GEMM can realise). For "masked" (execution "auto") the path
    it chose is given after the ratio. On a GPU, for the target cases, the host's time to issue a step
    beside the step's time (a step that takes about as long to issue is bound by the host).
  * `test_masked_layer_cpu_ratio`: the paired ratios (dense and masked timed in the same rounds).
  * `test_cpu_masked_linear_gemm_paths`: the paired ratios of the two CPU GEMM paths.
  * `test_autograd_node_host_time` (bench_masked_weight.py): the masked-weight op's C++ autograd node
    against its Python Function, time per call on a small weight.

and the verdict of each #4 target the file has data for (GPU: keep 1.0 step <= 1.05x dense, 50% of rows
pruned fwd_dgrad <= 0.65x dense; CPU: every paired ratio <= 1.05x). Ratios within one file only: timings
of different runs on a shared machine are not comparable (BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from typing import Dict, Iterable, List, Optional, Tuple

SPARSITIES = ("keep1.0", "keep0.7", "keep0.5", "keep0.3", "rows25", "rows50")
IMPL_ORDER = ("masked", "fused", "mw", "eager")
IMPL_TITLES = {
    "masked": 'masked layer, execution "auto" (the path it chose in brackets; the #4 GPU targets)',
    "fused": 'execution "fused" (Triton)',
    "mw": 'execution "masked_weight" (masked-weight op, then cuBLAS / cuDNN)',
    "eager": "eager reference (masked_weight as PyTorch ops)",
}
PATH_SHORT = {"fused": "fused", "masked_weight": "mw"}

# The #4 targets: (device, phase, sparsity, bound, text)
GPU_TARGETS = (
    ("cuda", "step", "keep1.0", 1.05, "keep ratio 1.0 costs at most 1.05x dense (forward + both gradients)"),
    ("cuda", "fwd_dgrad", "rows50", 0.65, "50% of rows pruned costs at most 0.65x dense (forward + input gradient)"),
)
CPU_TARGET = 1.05


class ReportError(ValueError):
    """A file that is not a pytest-benchmark JSON of these benchmarks."""


def density(sparsity: str) -> float:
    """Share of the weights kept: keepK -> K, rowsP -> 1 - P / 100."""
    if sparsity.startswith("keep"):
        return float(sparsity[4:])
    if sparsity.startswith("rows"):
        return 1.0 - float(sparsity[4:]) / 100.0
    raise ReportError(f"unknown sparsity label {sparsity!r}")


def theoretical(phase: str, sparsity: str) -> float:
    """Time ratio to dense if time followed active FLOPs (DESIGN.md §4)."""
    d = density(sparsity)
    if phase == "step":
        return 1.0 / 3.0 + 2.0 / 3.0 * d
    if phase == "fwd_dgrad":
        return d
    raise ReportError(f"unknown phase {phase!r}")


def load(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: cannot read a JSON file ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ReportError(f"{path}: not a pytest-benchmark JSON file (no 'benchmarks' list)")
    return data


def _test_name(bench: dict) -> str:
    return bench.get("name", "").split("[", 1)[0]


def _ms(seconds: float) -> str:
    if seconds >= 1.0:
        return f"{seconds:.3g} s"
    ms = seconds * 1e3
    if ms < 1.0:  # a small layer's GPU step: tens of microseconds
        return f"{seconds * 1e6:.3g} us"
    return f"{ms:.3g} ms" if ms < 100 else f"{ms:.0f} ms"


def machine_lines(data: dict) -> List[str]:
    m = data.get("machine_info", {})
    c = data.get("commit_info", {})
    cpu = m.get("cpu", {})
    cpu_name = cpu.get("brand_raw") or m.get("processor") or "?"
    out = [f"- date: {data.get('datetime', '?')}",
           f"- commit: {c.get('id', '?')[:12]}{' (dirty tree)' if c.get('dirty') else ''}",
           f"- CPU: {cpu_name} ({cpu.get('count', '?')} logical cores)"]
    rg = m.get("rgkernels")  # added by benchmarks/conftest.py since session 12
    if rg:
        out += [f"- GPU: {rg.get('gpu') or 'none'}",
                f"- torch {rg.get('torch', '?')}, Triton {rg.get('triton', '?')}, CUDA {rg.get('cuda') or '-'}, "
                f"rgkernels extension: {rg.get('extension', '?')}"]
    else:
        out.append("- versions: not recorded in this file (older than benchmarks/conftest.py's machine info)")
    return out


def _check_entry(bench: dict, keys: Tuple[str, ...]) -> dict:
    e = bench.get("extra_info")
    missing = [k for k in keys if not isinstance(e, dict) or e.get(k) is None]
    if missing or not isinstance(bench.get("stats"), dict) or "median" not in bench["stats"]:
        raise ReportError(f"{bench.get('name')}: lacks {', '.join(missing) or 'stats.median'} "
                          "(not a result of these benchmarks, or a damaged file)")
    return e


def layer_tables(benches: Iterable[dict]) -> Tuple[List[str], Dict[tuple, dict]]:
    """Markdown tables of test_masked_layer, and per (device, dtype, phase, impl, sparsity) the ratio of each
    layer that has a dense baseline ({(model, layer): ratio or None where the masked case is absent})."""
    med: Dict[tuple, dict] = {}
    for b in benches:
        e = _check_entry(b, ("device", "dtype", "phase", "impl", "sparsity", "model", "layer"))
        key = tuple(e[k] for k in ("device", "dtype", "phase", "impl", "sparsity", "model", "layer"))
        med[key] = {"median": b["stats"]["median"], "path": e.get("path"), "host": e.get("host_median_s")}
    ratios: Dict[tuple, dict] = defaultdict(dict)
    out: List[str] = []
    for device, dtype, phase in sorted({k[:3] for k in med}):
        layers = sorted({k[5:] for k in med if k[:3] == (device, dtype, phase)})
        impls = [i for i in IMPL_ORDER if any(k[:4] == (device, dtype, phase, i) for k in med)]
        for impl in impls:
            out += ["", f"**{device}, {dtype.replace('torch.', '')}, {phase}: {IMPL_TITLES.get(impl, impl)}** "
                    "(masked / dense, ratio of medians)", "",
                    "| layer | dense | " + " | ".join(SPARSITIES) + " |",
                    "|---|---|" + "---|" * len(SPARSITIES),
                    "| theoretical (active FLOPs) | | "
                    + " | ".join(f"{theoretical(phase, s):.2f}" for s in SPARSITIES) + " |"]
            for model, layer in layers:
                dense = med.get((device, dtype, phase, "dense", "-", model, layer))
                cells = []
                for s in SPARSITIES:
                    m = med.get((device, dtype, phase, impl, s, model, layer))
                    if dense is None:
                        cells.append("-" if m is None else "no dense")
                        continue
                    if m is None:
                        ratios[(device, dtype, phase, impl, s)][(model, layer)] = None  # measured dense, not this
                        cells.append("-")
                        continue
                    r = m["median"] / dense["median"]
                    ratios[(device, dtype, phase, impl, s)][(model, layer)] = r
                    path = PATH_SHORT.get(m["path"], m["path"]) if impl == "masked" and m["path"] else None
                    cells.append(f"{r:.2f}" + (f" ({path})" if path else ""))
                out.append(f"| {model} {layer} | {_ms(dense['median']) if dense else '-'} | " + " | ".join(cells) + " |")
    return out + host_tables(med), ratios


HOST_BOUND = 0.8  # issuing a step takes at least this share of the step: the host, not the GPU, sets its time


def host_tables(med: Dict[tuple, dict]) -> List[str]:
    """For the GPU target cases that recorded it: the host's time to issue a step next to the step's time."""
    out: List[str] = []
    for device, phase, sparsity, _, _ in GPU_TARGETS:
        for dtype in sorted({k[1] for k in med if k[0] == device and k[2] == phase}):
            rows = []
            for model, layer in sorted({k[5:] for k in med if k[:3] == (device, dtype, phase)}):
                dense = med.get((device, dtype, phase, "dense", "-", model, layer))
                auto = med.get((device, dtype, phase, "masked", sparsity, model, layer))
                if not dense or not auto or dense["host"] is None or auto["host"] is None:
                    continue
                bound = [n for n, m in (("dense", dense), ("auto", auto)) if m["host"] >= HOST_BOUND * m["median"]]
                rows.append(f"| {model} {layer} | {_ms(dense['median'])} / {_ms(dense['host'])} | "
                            f"{_ms(auto['median'])} / {_ms(auto['host'])} | {', '.join(bound) or '-'} |")
            if rows:
                out += ["", f"**{device}, {dtype.replace('torch.', '')}, {phase}: the host's time to issue a step** "
                        f"(median step / median issue, before the sync; host-bound: issue >= {HOST_BOUND} of the step)", "",
                        f"| layer | dense | auto, {sparsity} | host-bound |", "|---|---|---|---|"] + rows
    return out


def paired_table(benches: Iterable[dict]) -> Tuple[List[str], List[Tuple[str, float]]]:
    rows: Dict[tuple, dict] = defaultdict(dict)
    for b in benches:
        e = _check_entry(b, ("model", "layer", "sparsity", "ratio", "dense_median_s"))
        rows[(e["model"], e["layer"], e.get("threads"), e.get("clock") or "clock not recorded")][e["sparsity"]] = e
    out = ["", "**CPU, paired rounds** (masked sparse mode / dense nn layer, ratio of medians; "
           "* = entirely pruned rows left out of the GEMMs)", "",
           "| layer | threads, clock | dense | " + " | ".join(SPARSITIES) + " |",
           "|---|---|---|" + "---|" * len(SPARSITIES),
           "| theoretical (active FLOPs) | | | " + " | ".join(f"{theoretical('step', s):.2f}" for s in SPARSITIES) + " |"]
    verdict: List[Tuple[str, float]] = []
    for (model, layer, threads, clock), by_sp in sorted(rows.items(), key=lambda kv: tuple(map(str, kv[0]))):
        dense = [e["dense_median_s"] for e in by_sp.values()]
        cells = []
        for s in SPARSITIES:
            e = by_sp.get(s)
            if e is None:
                cells.append("-")
                continue
            cells.append(f"{e['ratio']:.2f}" + ("*" if e.get("rows_skipped") else ""))
            verdict.append((f"{model} {layer} {s} ({threads} thread{'s' if threads != 1 else ''})", e["ratio"]))
        span = f"{_ms(min(dense))}-{_ms(max(dense))}" if len(dense) > 1 else _ms(dense[0])
        out.append(f"| {model} {layer} | {threads}, {clock} | {span} | " + " | ".join(cells) + " |")
    return out, verdict


def gemm_paths_table(benches: Iterable[dict]) -> List[str]:
    out = ["", "**CPU masked linear, GEMM paths** (paired; masked / dense)", "",
           "| layer | sparsity | dense | oneDNN micro-kernel | ATen |", "|---|---|---|---|---|"]
    for b in sorted(benches, key=lambda b: b.get("name", "")):
        e = _check_entry(b, ("model", "layer", "sparsity", "dense_median_s", "ratio_ukernel", "ratio_aten"))
        out.append(f"| {e['model']} {e['layer']} | {e['sparsity']} | {_ms(e['dense_median_s'])} | "
                   f"{e['ratio_ukernel']:.2f} | {e['ratio_aten']:.2f} |")
    return out


def node_host_table(benches: Iterable[dict]) -> List[str]:
    out = ["", "**masked_weight's autograd node, time per forward + backward call on a 4K weight** (the host's "
           "time: the kernels take microseconds; C++ node and Python Function alternated)", "",
           "| device | C++ node | Python Function | C++ / Python |", "|---|---|---|---|"]
    for b in sorted(benches, key=lambda b: b.get("name", "")):
        e = _check_entry(b, ("device", "cpp_median_s", "python_median_s", "ratio"))
        out.append(f"| {e['device']} | {_ms(e['cpp_median_s'])} | {_ms(e['python_median_s'])} | {e['ratio']:.2f} |")
    return out


def _gpu_verdict(text: str, what: str, bound: float, got: Dict[tuple, Optional[float]]) -> str:
    measured = {k: r for k, r in got.items() if r is not None}
    missing = sorted(f"{m} {l}" for (m, l), r in got.items() if r is None)
    over = sorted(f"{m} {l} {r:.3f}x" for (m, l), r in measured.items() if r > bound)
    status = "missed" if over else "incomplete" if missing or not measured else "met"
    line = f"- {text}, {what}: **{status}** ({len(measured) - len(over)} of {len(got)} layers within {bound}x"
    if measured:
        (wm, wl), worst = max(measured.items(), key=lambda kv: kv[1])
        line += f"; worst {wm} {wl} {worst:.3f}x"
    line += ")"
    if over:
        line += f"; over: {', '.join(over)}"
    if missing:
        line += f"; not measured (dense baseline only): {', '.join(missing)}"
    return line


def verdict_lines(ratios: Dict[tuple, dict], paired: List[Tuple[str, float]]) -> List[str]:
    """The #4 targets. On a GPU the target is the masked layer as users run it (execution "auto", impl
    "masked"); the fused and masked_weight paths' own figures follow, marked as not the target."""
    out: List[str] = []
    for device, phase, sparsity, bound, text in GPU_TARGETS:
        for dtype in sorted({k[1] for k in ratios if k[0] == device and k[2] == phase}):
            head = f"GPU target ({dtype.replace('torch.', '')}), {text}"
            got = ratios.get((device, dtype, phase, "masked", sparsity))
            if got:
                out.append(_gpu_verdict(head, 'execution "auto"', bound, got))
            else:
                out.append(f"- {head}: **not measured** (no execution \"auto\" case in this file)")
            for impl, name in (("fused", '"fused" alone'), ("mw", '"masked_weight" alone')):
                got = ratios.get((device, dtype, phase, impl, sparsity))
                if got:
                    out.append("  " + _gpu_verdict("for information, not the target", name, bound, got))
    if paired:
        over = [f"{name} {r:.3f}x" for name, r in paired if r > CPU_TARGET]
        status = "met" if not over else "missed"
        out.append(f"- CPU target, masked layer in sparse mode at most {CPU_TARGET}x dense (paired rounds): "
                   f"**{status}** ({len(paired) - len(over)} of {len(paired)} cases within it; range "
                   f"{min(r for _, r in paired):.3f}-{max(r for _, r in paired):.3f}x)"
                   + (f"; over: {', '.join(over)}" if over else ""))
    elif any(k[0] == "cpu" for k in ratios):
        out.append("- CPU target: judged from the paired rounds only (test_masked_layer_cpu_ratio: dense and masked "
                   "in the same rounds); this file has unpaired CPU cases only")
    return out


def report(path: str) -> str:
    data = load(path)
    by_test: Dict[str, List[dict]] = defaultdict(list)
    for b in data["benchmarks"]:
        by_test[_test_name(b)].append(b)
    lines = [f"### {path}", ""] + machine_lines(data)
    ratios: Dict[tuple, dict] = {}
    paired: List[Tuple[str, float]] = []
    if by_test.get("test_masked_layer"):
        tables, ratios = layer_tables(by_test["test_masked_layer"])
        lines += tables
    if by_test.get("test_masked_layer_cpu_ratio"):
        table, paired = paired_table(by_test["test_masked_layer_cpu_ratio"])
        lines += table
    if by_test.get("test_cpu_masked_linear_gemm_paths"):
        lines += gemm_paths_table(by_test["test_cpu_masked_linear_gemm_paths"])
    if by_test.get("test_autograd_node_host_time"):
        lines += node_host_table(by_test["test_autograd_node_host_time"])
    others = sorted(t for t in by_test if t not in ("test_masked_layer", "test_masked_layer_cpu_ratio",
                                                    "test_cpu_masked_linear_gemm_paths",
                                                    "test_autograd_node_host_time"))
    if others:
        lines += ["", f"(not tabulated here: {', '.join(others)})"]
    verdicts = verdict_lines(ratios, paired)
    lines += ["", "Targets (#4):"] + (verdicts or ["- no case of a #4 target in this file"])
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("files", nargs="+", help="pytest-benchmark JSON files (--benchmark-json)")
    args = ap.parse_args(argv)
    rc = 0
    for path in args.files:
        try:
            sys.stdout.write(report(path) + "\n")
        except ReportError as exc:
            print(f"report.py: {exc}", file=sys.stderr)
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
