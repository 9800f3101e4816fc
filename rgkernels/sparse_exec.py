"""Sparse execution of the masked layers: an opt-in execution mode per layer (DESIGN.md §4).

    layer.execution = "masked_weight"   (default) masked_weight(W, t) then the ATen GEMM (cuBLAS / cuDNN /
                                        CPU BLAS) on W * M. On the CPU, linear layers (and convs with one
                                        output position) run it as one fused node with the masked-weight
                                        backward inside the blocked weight-gradient GEMM
                                        (rgkernels/ops/cpu_masked_linear.py); other CPU convs
                                        skip the output channels of entirely pruned rows in the
                                        forward and input gradient where that pays
                                        (rgkernels/ops/cpu_compact_conv.py)
    layer.execution = "fused"           the Triton kernels: mask applied in the weight-load prologue of the
                                        forward and input-gradient GEMMs (W * M never written), the §2
                                        threshold / weight gradients and keep counts in the weight-gradient
                                        epilogue, entirely pruned output channels skipped (compacted);
                                        linear, conv2d and conv_transpose2d (triton_masked_conv.py)
    layer.execution = "auto"            per (layer kind, shapes, dtype, device, gradients needed, share of
                                        entirely pruned rows): one timed run of both paths, cached in memory
                                        and optionally on disk, and found again in later calls through a
                                        memo per layer and call signature (auto_choice). On CPU and under the
                                        Triton interpreter "auto" is always "masked_weight" (nothing is
                                        measured there). Under torch.compile it runs what the layer's eager
                                        calls decided, else "masked_weight" (_traced_choice).
    rgkernels.sparse_exec.set_execution(module, mode) sets it on every masked layer; RGKERNELS_EXECUTION sets the
    default of layers that were never given one.

A forced "fused" that cannot run (no Triton / no GPU without TRITON_INTERPRET=1, a dtype other than
float32 / float16 / bfloat16, a grouped or non-zero-padded convolution, autocast, inside
`grouped_masks`) warns once per reason and runs "masked_weight". The collapse guard (§1) runs in every
path: on "fused" inside the mask-statistics launch (rgkernels/ops/triton_mask_stats.py), before any GEMM.

The fused path keeps, per forward, the keep counts (`layer.last_counts`) and the mask bit-packed
(`layer._last_bits`, 1 bit per weight), so `mask()`, statistics, `protect_pruned` and the gradient hook
of reparametrised weights see the exact mask of that forward.

Chains (`compact_chains(module)`): in an nn.Sequential with the stock forward, a masked layer that follows
another one of the same family (Linear -> Linear, Conv2d -> Conv2d, channels matching) with only
elementwise modules in between that map 0 to 0 (checked on the module: ReLU, LeakyReLU, Tanh, ELU, SiLU,
GELU, Hardtanh, Dropout, Identity, ...) skips the input channels that the previous layer's forward made
identically zero (entirely pruned rows without bias or with a zero bias entry): in its forward reduction,
and in its weight gradient (their dL/dW_hat is exactly 0). Its input gradient skips them only when the
chain's derivative at 0 is 0 (ReLU, ReLU6), since otherwise the previous layer's threshold gradient needs
it. Both layers must run "fused" in the same call of the Sequential (checked per call). Not handled:
transposed convs, and anything else (residual blocks, normalisation, flatten between conv and linear, shared modules called
outside the Sequential), which simply runs without input-channel skipping.

Executed FLOPs: the fused kernels add what they multiply into a per-layer int64 device counter (in a
compiled graph the backward's kernels count into the gradient of a per-layer sink instead, see
layers.flops_sink; `executed_flops(module)` folds it in and reads them, one sync per device;
`reset_executed_flops` zeroes them; the sink's float64 gradient is exact up to 2^53 between reads), and
each fused forward records its live channel counts so that `rgkernels.count_flops` reports as `executed`
what the kernels ran (2 * uses * live output channels * reduced input channels; the weight gradient over
every output channel). Layers on the "masked_weight" path execute the dense figure, except where the CPU's
one-node masked linear or compacted convolution ran them (they record the rows they left out of their
GEMMs the same way).
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
import weakref
from types import SimpleNamespace
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import _python_dispatch

from . import _backend
from .ops._autograd import grads_needed
from .ops.masked_weight import GRAD_MODES, guard_value

EXECUTION_MODES = ("auto", "masked_weight", "fused")
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


_env_execution: Tuple[Optional[str], str] = (None, "masked_weight")  # (raw value, parsed): read per forward


def default_execution() -> str:
    raw = _backend.env("RGKERNELS_EXECUTION")
    global _env_execution
    if raw != _env_execution[0]:
        mode = (raw or "").strip() or "masked_weight"
        if mode not in EXECUTION_MODES:
            raise ValueError(f"RGKERNELS_EXECUTION={mode!r}: choose one of {EXECUTION_MODES}")
        _env_execution = (raw, mode)
    return _env_execution[1]


def check_mode(mode: str) -> str:
    if mode not in EXECUTION_MODES:
        raise ValueError(f"execution must be one of {EXECUTION_MODES}, got {mode!r}")
    return mode


def set_execution(module: nn.Module, mode: str) -> nn.Module:
    """Sets the execution mode of every masked layer inside `module`; returns `module`."""
    from .convert import masked_layers

    check_mode(mode)
    for _, m in masked_layers(module):
        m.execution = mode
    return module


# =============================================================================================
# What can run fused
# =============================================================================================

_KINDS: Dict[type, str] = {}  # layer class -> kind ("auto" asks in every call: isinstance chains cost)


def _kind(layer) -> str:
    if torch.compiler.is_compiling():  # a cache filled while tracing would recompile the graph once
        return _kind_of(layer)
    kind = _KINDS.get(type(layer))
    if kind is None:
        kind = _KINDS[type(layer)] = _kind_of(layer)
    return kind


def _kind_of(layer) -> str:
    from .layers import MaskedConv2d, MaskedConvTranspose2d, MaskedLinear

    for cls, name in ((MaskedLinear, "linear"), (MaskedConv2d, "conv"), (MaskedConvTranspose2d, "conv_transpose")):
        if isinstance(layer, cls):
            return name
    return "other"


def _conv_padding(layer) -> Optional[Tuple[int, int]]:
    """Symmetric zero padding of a Conv2d as (ph, pw), or None when it is not expressible."""
    p = layer.padding
    if isinstance(p, str):
        if p == "valid":
            return (0, 0)
        out = []
        for k, d in zip(layer.kernel_size, layer.dilation):
            total = d * (k - 1)
            if total % 2:
                return None  # "same" with an even extent pads asymmetrically
            out.append(total // 2)
        return tuple(out)
    return tuple(p)


def _triton_ok(device: torch.device, kind: str) -> Tuple[bool, str]:
    try:
        from .ops import triton_mask_stats
        from .ops import triton_masked_conv, triton_masked_linear
    except Exception as exc:  # pragma: no cover - broken Triton install
        return False, f"the Triton kernels failed to import ({type(exc).__name__}: {exc})".splitlines()[0]
    mod = triton_masked_linear if kind == "linear" else triton_masked_conv
    for m in (triton_mask_stats, mod):
        ok, why = m.available()
        if not ok:
            return False, why
    interp = triton_mask_stats._KERNELS.interpreting()
    if interp and device.type != "cpu":
        return False, "under TRITON_INTERPRET=1 the kernels take CPU tensors"
    if not interp and device.type != "cuda":
        return False, f"the compiled Triton kernels take CUDA tensors, not {device.type}"
    return True, ""


def fused_support(layer, x: Tensor, w: Tensor) -> Tuple[bool, str]:
    """(can this call, with effective weight `w`, run the fused kernels; why not)."""
    kind = _kind(layer)
    if kind == "other":
        return False, f"no fused kernels for {type(layer).__name__}"
    if w.dtype not in _SUPPORTED_DTYPES:
        return False, f"weight dtype {w.dtype} (fused kernels take float32, float16, bfloat16)"
    if x.dtype != w.dtype:
        return False, f"input dtype {x.dtype} differs from the weight dtype {w.dtype}"
    if layer.threshold.dtype != torch.float32:
        return False, f"threshold dtype {layer.threshold.dtype} is not float32"
    if x.device != w.device:
        return False, "input and weight on different devices"
    if torch.is_autocast_enabled(x.device.type):
        return False, "autocast is on (the fused kernels do not autocast)"
    if kind != "linear":
        if layer.groups != 1:
            return False, "grouped convolution"
        if layer.padding_mode != "zeros":
            return False, f"padding_mode={layer.padding_mode!r}"
        if _conv_padding(layer) is None:
            return False, "asymmetric 'same' padding"
        if x.dim() not in (3, 4):
            return False, f"conv input with {x.dim()} dims"
    positions = _positions_bound(layer, kind, x)
    if positions >= _INDEX_LIMIT:
        return False, (f"up to {positions} GEMM rows (batch x positions): the fused kernels index them in "
                       f"32 bits")
    return _triton_ok(x.device, kind)


_INDEX_LIMIT = 2 ** 31 - 2 ** 20  # GEMM rows the fused kernels index in int32 (less a tile's overshoot)


def _positions_bound(layer, kind: str, x: Tensor) -> int:
    """An upper bound of the GEMM rows of any of the layer's three kernels: input rows of a linear layer;
    batch x (input or output) positions of a conv, the output size bounded from the geometry."""
    if kind == "linear":
        return x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    n = x.shape[0] if x.dim() == 4 else 1
    h, w = x.shape[-2:]
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    ph, pw = _conv_padding(layer)
    return n * (h * sh + dh * kh + 2 * ph + sh) * (w * sw + dw * kw + 2 * pw + sw)


# =============================================================================================
# Execution-mode decision ("auto") and its cache
# =============================================================================================

_LOCK = threading.Lock()
_DECISIONS: Dict[str, str] = {}
_GENERATION = 0  # see decisions_generation
_CACHE_PATH: Optional[str] = None
_CACHE_LOADED: Optional[str] = None
RECHECK_EVERY = 64  # forwards between two (asynchronous) looks at the share of entirely pruned rows
HYSTERESIS = 0.97  # a path must beat the default ("masked_weight", ...) by 3% to be chosen


def set_decision_cache(path: Optional[str]) -> None:
    """JSON file that keeps "auto" decisions across processes (None: memory only). Default: the
    RGKERNELS_EXEC_CACHE environment variable, if set."""
    global _CACHE_PATH, _CACHE_LOADED
    with _LOCK:
        _CACHE_PATH = path
        _CACHE_LOADED = None


def _cache_path() -> Optional[str]:
    return _CACHE_PATH if _CACHE_PATH is not None else (os.environ.get("RGKERNELS_EXEC_CACHE") or None)


# The values each kind of decision key may have (by the key's first field): CPU GEMM paths
# (cpu_masked_linear), CPU conv compaction (cpu_compact_conv), else layer execution paths.
_VALUES = {"cpu_gemm": ("aten", "ukernel"), "cpu_compact_conv": ("compact", "plain"), "": ("masked_weight", "fused")}


def _load_disk() -> None:
    global _CACHE_LOADED
    path = _cache_path()
    if path is None or _CACHE_LOADED == path:
        return
    _CACHE_LOADED = path
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return
    except (OSError, ValueError) as exc:
        _backend.warn_once(f"exec-cache:{path}", f"rgkernels: cannot read the execution-decision cache {path} "
                                                 f"({type(exc).__name__}); measuring again")
        return
    for k, v in data.get("decisions", {}).items():
        if v in _VALUES.get(k.split("|", 1)[0], _VALUES[""]):  # a value another kind of key cannot take
            _DECISIONS.setdefault(k, v)


def _save_disk() -> None:
    path = _cache_path()
    if path is None:
        return
    try:
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        old = {}
        if os.path.exists(path):
            try:
                with open(path) as f:
                    old = json.load(f).get("decisions", {})
            except (OSError, ValueError):
                old = {}
        old.update(_DECISIONS)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".rgkernels-exec-")
        with os.fdopen(fd, "w") as f:
            json.dump({"version": 1, "decisions": old}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as exc:
        _backend.warn_once(f"exec-cache-write:{path}", f"rgkernels: cannot write the execution-decision cache "
                                                       f"{path} ({type(exc).__name__}: {exc})")


def decisions() -> Dict[str, str]:
    """A copy of the in-memory decisions (key -> mode)."""
    with _LOCK:
        _load_disk()
        return dict(_DECISIONS)


def cached_decision(key: str) -> Optional[str]:
    """The decision for `key` if one is cached (in memory, or in the disk cache once read), else None."""
    hit = _DECISIONS.get(key)
    if hit is None and _CACHE_LOADED != _cache_path():
        with _LOCK:
            _load_disk()
            hit = _DECISIONS.get(key)
    return hit


def clear_decisions() -> None:
    """Forgets the in-memory decisions (the disk cache, if any, is read again at the next lookup)."""
    global _CACHE_LOADED, _GENERATION
    with _LOCK:
        _DECISIONS.clear()
        _CACHE_LOADED = None
        _GENERATION += 1


def decisions_generation() -> int:
    """Changes whenever the decisions are forgotten: memos of decisions made before are stale then."""
    return _GENERATION


_MEMO_GENERATION = object()  # the key under which current_memo keeps the generation a memo was filled in


def current_memo(memo: dict) -> dict:
    """`memo` (a module's dict of decisions per call signature: a lookup in the hot path that costs less
    than building a decision key), emptied first if the decisions were forgotten since it was filled."""
    if memo.get(_MEMO_GENERATION) != _GENERATION:
        memo.clear()
        memo[_MEMO_GENERATION] = _GENERATION
    return memo


def decide(key: str, candidates: Dict[str, Callable[[], None]], timer: Optional[Callable] = None,
           timer_all: Optional[Callable] = None, incumbent: str = "masked_weight",
           hysteresis: float = HYSTERESIS) -> str:
    """The cached decision for `key`, or the fastest of `candidates` (name -> a closure running one
    forward + backward), timed once with `timer(fn) -> seconds` per candidate, or with
    `timer_all(candidates) -> {name: seconds}` (all of them in one go, e.g. interleaved), and cached.
    Another candidate must take at most `hysteresis` times the `incumbent`'s time (when the incumbent is one
    of them: "masked_weight" against "fused"), so that a timing within the noise keeps the default."""
    with _LOCK:
        _load_disk()
        hit = _DECISIONS.get(key)
    if hit is not None:
        return hit
    if timer_all is not None:
        times = timer_all(candidates)
    else:
        timer = timer or _cuda_time
        times = {name: timer(fn) for name, fn in candidates.items()}
    best = min(times, key=times.get)
    if best != incumbent and incumbent in times and times[best] > hysteresis * times[incumbent]:
        best = incumbent
    with _LOCK:
        _DECISIONS[key] = best
        _save_disk()
    return best


def _cpu_times(candidates, warmup: int = 1, rounds: int = 7) -> dict:
    """Median wall time of each candidate over `rounds` rounds that run every candidate once, in an
    order rotated from round to round: a machine whose speed drifts (shared CPUs, frequency changes)
    slows all candidates alike instead of whichever was timed last."""
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    times = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            candidates[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: sorted(v)[len(v) // 2] for name, v in times.items()}


def _cuda_time(fn: Callable[[], None], warmup: int = 2, reps: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2] * 1e-3


def _dead_bucket(layer, weight: Tensor) -> int:
    """Share of entirely pruned rows in eighths, from the last forward's counts. A synchronous read at
    a layer's first "auto" call, then every RECHECK_EVERY calls an asynchronous one (pinned copy +
    event), picked up by a later call once it has landed: no sync in the steady state."""
    d = layer.__dict__  # plain reads: this runs in every "auto" call
    st = d.get("_exec_state")
    t = layer._parameters["threshold"]
    c = t.shape[0]  # one per mask row
    if st is None:
        counts = layer.last_counts
        if counts is None or counts.shape[0] != c:
            with torch.no_grad():
                w_rows = layer._to_rows(weight.detach()).reshape(c, -1)
                counts = ((w_rows.float().abs() - t.float()[:, None]) > 0).sum(1)
        dead = int((counts == 0).sum())
        st = d["_exec_state"] = {"calls": 0, "bucket": round(8 * dead / max(c, 1)), "pending": None}
        return st["bucket"]
    st["calls"] += 1
    pend = st["pending"]
    if pend is not None and pend[0].query():
        st["bucket"] = round(8 * int(pend[1]) / max(c, 1))
        st["pending"] = pend = None
    if pend is None and st["calls"] % RECHECK_EVERY == 0 and layer.last_counts is not None:
        counts = layer.last_counts
        with torch.cuda.device(counts.device):  # the event on the counts' stream, not the current device's
            host = torch.empty((), dtype=torch.int64, pin_memory=True)
            host.copy_((counts == 0).sum(), non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
        st["pending"] = (ev, host)
    return st["bucket"]


_DEVICE_LABELS: Dict[torch.device, str] = {}  # device -> its name in decision keys (filled by eager calls)


def _device_label(device: torch.device) -> str:
    label = _DEVICE_LABELS.get(device)
    if label is None:
        label = _DEVICE_LABELS[device] = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return label


def _decision_key(layer, x: Tensor, w: Tensor, kind: str, bucket: int, output_size=None) -> str:
    geom = ""
    if kind != "linear":
        geom = f"|s{tuple(layer.stride)}p{_conv_padding(layer)}d{tuple(layer.dilation)}"
    if kind == "conv_transpose":
        geom += f"op{tuple(_conv_args(layer, x, output_size)[4])}"
    grads = (torch.is_grad_enabled() and x.requires_grad, torch.is_grad_enabled()
             and (w.requires_grad or layer.threshold.requires_grad))
    dev = _device_label(x.device)
    return (f"{kind}|w{tuple(w.shape)}|x{tuple(x.shape)}{geom}|{str(w.dtype).replace('torch.', '')}|{dev}"
            f"|bias{int(layer.bias is not None)}|grad{int(grads[0])}{int(grads[1])}|dead{bucket}/8")


def _measure_candidates(layer, x: Tensor, weight: Tensor, kind: str,
                        output_size=None) -> Dict[str, Callable[[], None]]:
    """Closures running one forward + backward of each path on copies of the layer's tensors (the
    layer, its parameters and their gradients are untouched)."""
    from .ops.masked_weight import masked_weight

    with torch.no_grad():
        w = weight.detach().clone()
        t = layer.threshold.detach().clone()
        b = None if layer.bias is None else layer.bias.detach().clone()
        xx = x.detach().clone()
    gx = torch.is_grad_enabled() and x.requires_grad
    gw = torch.is_grad_enabled() and (weight.requires_grad or layer.threshold.requires_grad)
    w.requires_grad_(gw)
    t.requires_grad_(gw)
    xx.requires_grad_(gx)
    gm = layer.grad_mode
    guard = layer.guard_ratio
    conv = None if kind == "linear" else _conv_args(layer, x, output_size)

    def aten():
        w_hat = _rows(kind, masked_weight(_rows(kind, w), t, gm, guard_ratio=guard))
        y = _layer_fn(kind, conv)(xx, w_hat, b)
        if gx or gw:
            y.backward(torch.ones_like(y))

    def fused():
        y = _apply_fused(kind, xx, _rows(kind, w), t, b, gm, guard, conv, None, None, None, None)[0]
        if gx or gw:
            y.backward(torch.ones_like(y))

    return {"masked_weight": aten, "fused": fused}


def resolve(layer, x: Tensor, weight: Tensor, output_size=None) -> str:
    """The path this call of `layer` (effective weight `weight`) runs: "masked_weight" or "fused"."""
    mode = layer.execution
    if mode == "masked_weight":
        return mode
    if mode == "fused":
        ok, why = fused_support(layer, x, weight)
        if not ok:
            _backend.warn_once(f"exec-fused:{type(layer).__name__}:{why}",
                               f"rgkernels: execution='fused' unavailable for {type(layer).__name__} ({why}); "
                               f"running masked_weight + the ATen GEMM")
            return "masked_weight"
        return "fused"
    # auto: measured on CUDA only
    if x.device.type != "cuda":
        return "masked_weight"
    return auto_choice(layer, x, weight, output_size)


AUTO_MEMO_SIZE = 16  # call signatures remembered per layer (a layer usually sees one or two)
_UNSUPPORTED = "unsupported"  # a memo entry: the fused kernels cannot run this call, whatever the mask


def auto_choice(layer, x: Tensor, weight: Tensor, output_size=None) -> str:
    """The path "auto" runs for this call. The cached decision is found through a memo on the layer,
    keyed by what `fused_support` and the decision key depend on: on a small layer a GPU step is bound
    by the host's time per call, and those checks plus the key's string cost several times the tuple
    built here. The device check is the caller's (`resolve`: CUDA only); tests run this on the CPU,
    under the Triton interpreter."""
    kind = _kind(layer)
    if torch.compiler.is_compiling():
        return _traced_choice(layer, x, weight, kind, output_size)
    grad = torch.is_grad_enabled()
    params = layer._parameters  # plain reads, not nn.Module.__getattr__ (about a microsecond each)
    t = params["threshold"]
    bias = params["bias"] if "bias" in params else layer.bias  # (a parametrised bias is not in _parameters)
    geometry = None
    if kind != "linear":
        geometry = (layer.stride, layer.padding, layer.dilation, layer.groups, layer.padding_mode,
                    layer.kernel_size, None if output_size is None else tuple(output_size))
    sig = (x.shape, x.dtype, x.device, weight.shape, weight.dtype, weight.device, t.dtype, t.device,
           grad and x.requires_grad, grad and (weight.requires_grad or t.requires_grad),
           torch.is_autocast_enabled(x.device.type), bias is None, geometry)
    d = layer.__dict__
    memo = d.get("_exec_memo")
    if memo is None:
        memo = d["_exec_memo"] = {}
    memo = current_memo(memo)  # emptied when the decisions were forgotten
    entry = memo.get(sig)
    if entry is _UNSUPPORTED:
        return "masked_weight"
    bucket = None  # counted once the fused kernels are known to apply
    if entry is not None:
        bucket = _dead_bucket(layer, weight)
        hit = entry.get(bucket)
        if hit is not None:
            return hit
    choice, status, bucket = _auto_decision(layer, x, weight, kind, output_size, bucket)
    if status == "provisional":
        return choice
    if len(memo) > AUTO_MEMO_SIZE:
        memo.clear()
        current_memo(memo)
    if status == _UNSUPPORTED:
        memo[sig] = _UNSUPPORTED
    else:
        memo.setdefault(sig, {})[bucket] = choice
    return choice


def _traced_choice(layer, x: Tensor, weight: Tensor, kind: str, output_size=None) -> str:
    """"auto" under torch.compile: the decision already made for this call (by the layer's eager calls, which
    also counted its dead rows), read without timing, host syncs or events, none of which a graph can
    hold; "masked_weight" where none was made. (Dynamo guards on what it read: a decision made later
    recompiles the graph that used the stand-in.)"""
    st = layer.__dict__.get("_exec_state")  # (an eager call also named the device: _device_label, no query)
    if st is None or x.device not in _DEVICE_LABELS or not fused_support(layer, x, weight)[0]:
        return "masked_weight"
    return _DECISIONS.get(_decision_key(layer, x, weight, kind, st["bucket"], output_size), "masked_weight")


def _auto_decision(layer, x: Tensor, weight: Tensor, kind: str, output_size=None,
                   bucket: Optional[int] = None) -> Tuple[str, str, Optional[int]]:
    """(path, status, dead-row bucket): status "unsupported" (the fused kernels cannot run this call;
    no bucket), "decided" (the cached or newly measured decision) or "provisional" (a stand-in inside a
    graph capture or a trace, which never times anything; a later call measures)."""
    ok, _ = fused_support(layer, x, weight)
    if not ok:
        return "masked_weight", _UNSUPPORTED, None
    if bucket is None:
        bucket = _dead_bucket(layer, weight)
    key = _decision_key(layer, x, weight, kind, bucket, output_size)
    hit = _DECISIONS.get(key)
    if hit is not None:
        return hit, "decided", bucket
    if (x.is_cuda and torch.cuda.is_current_stream_capturing()) or torch.compiler.is_compiling():
        return "masked_weight", "provisional", bucket  # never time inside a graph capture / trace
    # Timed on the layer's device: _cuda_time's synchronize and events act on the current one.
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        choice = decide(key, _measure_candidates(layer, x, weight, kind, output_size))
    return choice, "decided", bucket


# =============================================================================================
# Row compaction helpers (PyTorch; the kernels compute the same on the device)
# =============================================================================================

def compaction(counts: Tensor, bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(perm, zperm, nlive) as rgkernels::triton_mask_stats returns them, from keep counts: live rows
    first; channels whose output is not identically zero first; nlive = [#live, #non-zero]."""
    live = counts > 0
    nz = live if bias is None else live | (bias != 0)
    perm = torch.argsort((~live).to(torch.int8), stable=True).to(torch.int32)
    zperm = torch.argsort((~nz).to(torch.int8), stable=True).to(torch.int32)
    return perm, zperm, torch.stack([live.sum(), nz.sum()]).to(torch.int32)


def live_rows(layer) -> Optional[Tensor]:
    """Indices of the output channels that the layer's last sparse forward kept any weight of."""
    c = layer.last_counts
    return None if c is None else torch.nonzero(c > 0).flatten()


# =============================================================================================
# The fused autograd functions
# =============================================================================================

DIRECT_CALLS = True  # False: always through the registered ops (tests compare the two)
_DIRECT = None


def _ops():
    """The fused path's four ops (mask statistics, forward, input gradient, weight gradient): in eager
    mode their Python implementations, called directly; the registered torch.library ops under
    torch.compile, under a dispatch mode (FlopCounterMode, fake tensors, ...: they must see the ops) and
    under a torch-function mode. A custom op's dispatch costs 12-26 us of Python per call on this
    project's CPU machine (more with more arguments), four per training step of a layer, and a small
    layer's GPU step is bound by the host's time. (The registered mask-statistics op also bumps the
    threshold's version in every call, for its declared mutation; the direct call leaves it, as the
    compiled masked-weight ops do.)"""
    global _DIRECT
    if (not DIRECT_CALLS or torch.compiler.is_compiling() or _python_dispatch._get_current_dispatch_mode() is not None
            or torch._C._is_torch_function_mode_enabled()):
        from .ops import triton_mask_stats, triton_masked_conv, triton_masked_linear  # noqa: F401 (registers)

        return torch.ops.rgkernels
    if _DIRECT is None:
        from .ops import triton_mask_stats, triton_masked_conv, triton_masked_linear

        _DIRECT = SimpleNamespace(
            triton_mask_stats=triton_mask_stats._impl,
            triton_masked_linear_fwd=triton_masked_linear._fwd_impl,
            triton_masked_linear_dgrad=triton_masked_linear._dgrad_impl,
            triton_masked_linear_wgrad=triton_masked_linear._wgrad_impl,
            triton_masked_conv_fwd=triton_masked_conv._fwd_impl,
            triton_masked_conv_dgrad=triton_masked_conv._dgrad_impl,
            triton_masked_conv_wgrad=triton_masked_conv._wgrad_impl)
    return _DIRECT


def _conv_args(layer, x: Tensor, output_size=None) -> tuple:
    """(stride, padding, dilation, transposed, output_padding) of a conv layer, as the conv ops take them."""
    transposed = _kind(layer) == "conv_transpose"
    if transposed:  # nn.ConvTranspose2d's own rule (output_size may pick it per call)
        out_pad = layer._output_padding(x, output_size, layer.stride, layer.padding, layer.kernel_size, 2,
                                        layer.dilation)
    else:
        out_pad = (0, 0)
    return (list(layer.stride), list(_conv_padding(layer)), list(layer.dilation), transposed, list(out_pad))


def _rows(kind: str, weight: Tensor) -> Tensor:
    """The weight in the mask's row layout, one row per output channel: a transposed conv's
    [Ci, Co, KH, KW] weight (groups = 1) as the [Co, Ci, KH, KW] view the conv kernels take."""
    return weight.transpose(0, 1) if kind == "conv_transpose" else weight


def _layer_fn(kind: str, conv):
    """f(x, W_hat in the layer's own weight layout, bias) of the layer, in ATen."""
    if kind == "linear":
        return F.linear
    stride, padding, dilation, transposed, out_pad = conv
    if transposed:
        return lambda x, w, b: F.conv_transpose2d(x, w, b, stride, padding, out_pad, 1, dilation)
    return lambda x, w, b: F.conv2d(x, w, b, stride, padding, dilation)


class _FusedFn(torch.autograd.Function):
    """y = op(x, W * S(|W| - t)) + b with the §2 gradients; op = linear ([M, K] input), conv2d or
    conv_transpose2d. `weight` is in the mask's row layout (see _rows)."""

    @staticmethod
    def forward(ctx, x, weight, threshold, bias, kind, grad_mode_id, guard_ratio, conv, in_fwd, in_dgrad,
                flops, out_info, sink=None):
        ops = _ops()
        # [C, K] rows; a transposed conv's rows view has no 2-D form: [C, Ci, KH * KW] (read in place)
        w_rows = weight.flatten(2) if kind == "conv_transpose" else weight.reshape(weight.shape[0], -1)
        counts, bits, perm, zperm, nlive = ops.triton_mask_stats(w_rows, threshold, bias, guard_ratio)
        in_perm, in_nlive = in_fwd if in_fwd is not None else (None, None)
        if kind == "linear":
            y = ops.triton_masked_linear_fwd(x, weight, threshold, bias, perm, nlive, in_perm, in_nlive, flops)
        else:
            y = ops.triton_masked_conv_fwd(x, weight, threshold, bias, perm, nlive, in_perm, in_nlive, flops,
                                           *conv)
        ctx.save_for_backward(x, weight)
        ctx.threshold = threshold  # not saved_tensors: see rgkernels/ops/masked_weight.py
        ctx.kind, ctx.grad_mode_id, ctx.conv = kind, grad_mode_id, conv
        ctx.perm, ctx.nlive, ctx.in_fwd, ctx.in_dgrad, ctx.flops = perm, nlive, in_fwd, in_dgrad, flops
        ctx.has_bias = bias is not None
        ctx.sink = sink is not None  # then the backward's counts go to the sink's gradient, not to `flops`
        out_info.update(counts=counts, bits=bits, perm=perm, zperm=zperm, nlive=nlive)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        t = ctx.threshold
        need = grads_needed(ctx, (True, True, True, ctx.has_bias))  # x, weight, threshold, bias
        if torch.is_grad_enabled():  # create_graph=True (R1 & co.): a differentiable composition
            return _differentiable_backward(ctx, x, weight, t, dy, need)
        ops = _ops()
        dx = gw = gt = db = gsink = None
        flops = ctx.flops
        if ctx.sink:
            flops = torch.zeros(3, dtype=torch.int64, device=dy.device)
        if need[0]:
            ip, inl = ctx.in_dgrad if ctx.in_dgrad is not None else (None, None)
            if ctx.kind == "linear":
                dx = ops.triton_masked_linear_dgrad(dy, weight, t, ctx.perm, ctx.nlive, ip, inl, flops)
            else:
                dx = ops.triton_masked_conv_dgrad(dy, weight, t, ctx.perm, ctx.nlive, ip, inl, flops,
                                                  list(x.shape[2:]), *ctx.conv[:4])
        if need[1] or need[2]:
            ip, inl = ctx.in_fwd if ctx.in_fwd is not None else (None, None)
            if ctx.kind == "linear":
                gw, gt, _ = ops.triton_masked_linear_wgrad(dy, x, weight, t, ip, inl, ctx.grad_mode_id, flops)
            else:
                gw, gt, _ = ops.triton_masked_conv_wgrad(dy, x, weight, t, ip, inl, ctx.grad_mode_id, flops,
                                                         *ctx.conv[:4])
            gw = gw if need[1] else None
            gt = gt if need[2] else None
        if ctx.has_bias and need[3]:
            db = dy.sum(0) if ctx.kind == "linear" else dy.sum((0, 2, 3))
        if ctx.sink and ctx.needs_input_grad[12]:
            gsink = flops[1:].to(torch.float64)
        return dx, gw, gt, db, None, None, None, None, None, None, None, None, gsink


def _differentiable_backward(ctx, x, weight, t, dy, need):
    """The gradients of _FusedFn as a graph (create_graph=True): see masked_weight.differentiable_grads."""
    from .ops.masked_weight import differentiable_grads

    fn = _layer_fn(ctx.kind, ctx.conv)

    def layer_fn(x, w_hat_rows):  # _rows is its own inverse: row layout -> the layer's weight layout
        return fn(x, _rows(ctx.kind, w_hat_rows), None)

    out = differentiable_grads(layer_fn, x, weight, t, dy, ctx.grad_mode_id, need[:3])
    db = None
    if ctx.has_bias and need[3]:
        db = dy.sum(0) if ctx.kind == "linear" else dy.sum((0, 2, 3))
    return (*out, db, None, None, None, None, None, None, None, None, None)


def _apply_fused(kind, x, weight, threshold, bias, grad_mode, guard_ratio, conv, in_fwd, in_dgrad,
                 flops, out_info, sink=None):
    """Runs the fused path on raw tensors (`weight` in the row layout, see _rows); returns (y, info dict).
    `sink`: see layers.flops_sink (under torch.compile)."""
    if flops is None:
        flops = torch.zeros(3, dtype=torch.int64, device=x.device)
    info = {} if out_info is None else out_info
    g = guard_value(guard_ratio)
    gm = GRAD_MODES[grad_mode]
    if kind == "linear":
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        y = _FusedFn.apply(x2, weight, threshold, bias, kind, gm, g, None, in_fwd, in_dgrad, flops, info, sink)
        y = y.reshape(*lead, weight.shape[0])
    else:
        unbatched = x.dim() == 3
        x4 = x.unsqueeze(0) if unbatched else x
        y = _FusedFn.apply(x4, weight, threshold, bias, kind, gm, g, conv, in_fwd, in_dgrad, flops, info, sink)
        if unbatched:
            y = y.squeeze(0)
    return y, info


def _flops_counter(layer, device: torch.device) -> Tensor:
    c = layer._exec_flops
    if c is None or c.device != device or (layer._exec_flops_sink is None and torch.compiler.is_compiling()):
        if torch.compiler.is_compiling():
            return _eager_new_flops_counter()(layer, device)
        return layer._place_exec_flops(device)
    return c


# Every masked layer gets its counter and sink when it is made (layers.py); this makes them for a layer
# pickled before that, or one whose counter is on another device (a meta-built model whose weights were
# assigned: the meta counter holds no counts). Under torch.compile they must be made outside the graph:
# a counter created inside would be an intermediate that the kernels write, and a leaf cannot be made in
# a graph; made eagerly (one graph break, in the first compiled call), they are graph inputs.
_EAGER_NEW_FLOPS_COUNTER = None


def _eager_new_flops_counter():
    global _EAGER_NEW_FLOPS_COUNTER
    if _EAGER_NEW_FLOPS_COUNTER is None:  # built on first use: importing torch._dynamo takes ~2 s
        from .layers import MaskedLayer

        _EAGER_NEW_FLOPS_COUNTER = torch.compiler.disable(MaskedLayer._place_exec_flops, recursive=True)
    return _EAGER_NEW_FLOPS_COUNTER


def _backward_sink(layer, x: Tensor, weight: Tensor) -> Optional[Tensor]:
    """Under torch.compile, where the fused node's backward has gradients to compute: the layer's FLOP
    sink (layers.flops_sink), which the backward's counts reach as its gradient. Eager backwards add to
    the counter directly (cheaper: no extra input, no gradient to accumulate)."""
    if not torch.compiler.is_compiling() or not torch.is_grad_enabled():
        return None
    bias = layer.bias
    if not (x.requires_grad or weight.requires_grad or layer.threshold.requires_grad
            or (bias is not None and bias.requires_grad)):
        return None
    return layer._exec_flops_sink


def forward(layer, x: Tensor, **kw) -> Tensor:
    """A masked layer's sparse-mode output when its execution mode is not "masked_weight": resolves
    the path (the effective weight is computed once: a spectral-norm parametrisation runs one power
    iteration either way) and runs it. `kw`: a transposed conv's `output_size`."""
    if torch.compiler.is_compiling() or layer._exec_record is not None:  # (no guard on it in a graph)
        layer._exec_record = None
    weight = layer.weight
    if layer._pre_masked is not None or resolve(layer, x, weight, kw.get("output_size")) != "fused":
        return layer._masked_weight_forward(x, weight, **kw)
    kind = _kind(layer)
    weight = _rows(kind, weight)
    layer._hook_stored_weight()
    in_fwd = in_dgrad = None
    link = _chain_input(layer, x)
    if link is not None:
        in_fwd = link[0]
        in_dgrad = link[0] if link[1] else None
    conv = None if kind == "linear" else _conv_args(layer, x, kw.get("output_size"))
    flops = _flops_counter(layer, x.device)
    y, info = _apply_fused(kind, x, weight, layer.threshold, layer.bias, layer.grad_mode, layer.guard_ratio, conv,
                           in_fwd, in_dgrad, flops, None, _backward_sink(layer, x, weight))
    layer._record_fused(info["counts"], info["bits"], weight.shape)
    cin = weight.shape[1]
    khkw = 1 if kind == "linear" else weight.shape[2] * weight.shape[3]
    layer._exec_record = exec_record(info["nlive"], weight.shape[0], cin, khkw,
                                     in_nlive=None if in_fwd is None else in_fwd[1], dgrad_skip=in_dgrad is not None)
    seq = layer._chain_seq() if layer._chain_seq is not None else None
    if seq is not None and getattr(seq, "_rg_token", None) is not None:
        layer._chain_out = (seq._rg_token, info["zperm"], info["nlive"][1:])
    return y


# =============================================================================================
# Chains of masked layers
# =============================================================================================

def _zero_preserving(mod: nn.Module) -> Tuple[bool, bool]:
    """(maps 0 to 0 elementwise, derivative 0 at 0) for a module allowed between chained layers."""
    elementwise = (nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Tanh, nn.ELU, nn.CELU, nn.SELU, nn.SiLU,
                   nn.GELU, nn.Mish, nn.Hardtanh, nn.Hardswish, nn.Softsign, nn.Tanhshrink, nn.Dropout,
                   nn.Dropout2d, nn.PReLU)
    if type(mod) not in elementwise:
        return False, False
    if isinstance(mod, nn.PReLU):
        return True, False
    with torch.enable_grad():
        z0 = torch.zeros(4, requires_grad=True)
        z = z0 * 1.0
        if isinstance(mod, nn.Dropout2d):
            out = mod(z.view(1, 4, 1, 1)).reshape(-1)
        else:
            out = mod(z)
        if not torch.equal(out.detach(), torch.zeros(4)):
            return False, False
        out.backward(torch.ones(4))
    return True, bool(torch.equal(z0.grad, torch.zeros(4)))


class ChainHandle:
    def __init__(self, handles, links, objs):
        self._handles = handles
        self.links = links  # [(producer name, consumer name, input gradient skipped)]
        self._objs = objs

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for producer, consumer, _, _ in self._objs:
            consumer._chain_src = None
            producer._chain_seq = producer._chain_out = None
        self._objs = []


class _ChainCall:
    """Identifies one call of a chained Sequential (an instance of a class of ours, not `object()`:
    torch.compile 2.11 cannot trace the latter)."""


def _chain_call_begins(seq, args):  # module-level: a model with these hooks still pickles
    seq._rg_token = _ChainCall()


def _chain_call_ends(seq, args, out):
    # The producers' outputs' channel orders expire with the call; the token does not outlive it either,
    # which also keeps it out of what torch.compile would have to rebuild after a compiled call.
    seq._rg_token = None
    for child in seq:
        if getattr(child, "_chain_out", None) is not None:
            child._chain_out = None


def compact_chains(module: nn.Module) -> ChainHandle:
    """Links the chained masked layers of every stock nn.Sequential inside `module` (see the module
    docstring); returns a handle with `.links` and `.remove()`. The links are weak references, not
    kept by pickling / deepcopy: call it again on a loaded or copied model."""
    from .layers import MaskedConv2d, MaskedLayer, MaskedLinear

    names = {id(m): n for n, m in module.named_modules()}
    handles, links, objs = [], [], []
    for seq in module.modules():
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue
        prev, fwd_ok, dgrad_zero = None, True, False
        linked = False
        for child in seq:
            if isinstance(child, MaskedLayer):
                same = (isinstance(prev, MaskedLinear) and isinstance(child, MaskedLinear)
                        and prev.out_features == child.in_features) or \
                       (isinstance(prev, MaskedConv2d) and isinstance(child, MaskedConv2d)  # spectral norm included
                        and prev.out_channels == child.in_channels and child.groups == 1)
                if prev is not None and fwd_ok and same:
                    child._chain_src = weakref.ref(prev)
                    child._chain_dgrad = dgrad_zero
                    prev._chain_seq = weakref.ref(seq)
                    links.append((names.get(id(prev), "?"), names.get(id(child), "?"), dgrad_zero))
                    objs.append((prev, child, dgrad_zero, seq))
                    linked = True
                prev, fwd_ok, dgrad_zero = child, True, False
            else:
                ok, dz = _zero_preserving(child)
                fwd_ok = fwd_ok and ok
                dgrad_zero = dgrad_zero or dz
        if linked:
            handles += [seq.register_forward_pre_hook(_chain_call_begins),
                        seq.register_forward_hook(_chain_call_ends)]
    return ChainHandle(handles, links, objs)


def _chain_input(layer, x: Tensor):
    """((in_perm, in_nlive), input gradient may skip) when this call follows its chain producer's fused
    forward in the same Sequential call; else None."""
    src = layer._chain_src() if layer._chain_src is not None else None
    if src is None:
        return None
    seq = src._chain_seq() if src._chain_seq is not None else None
    token = getattr(seq, "_rg_token", None) if seq is not None else None
    out = src._chain_out
    if token is None or out is None or out[0] is not token or not src.sparse:
        return None
    cin = x.shape[-1] if _kind(layer) == "linear" else x.shape[-3]
    if out[1].shape[0] != cin or out[1].device != x.device:
        return None
    return (out[1], out[2]), layer._chain_dgrad


# =============================================================================================
# Executed FLOPs
# =============================================================================================

def executed_flops(module: nn.Module) -> Dict[str, Dict[str, int]]:
    """name -> {forward, input_grad, weight_grad}: FLOPs the fused kernels of each masked layer ran since
    the last reset (one host sync per device for the whole model)."""
    from .convert import _to_host, masked_layers

    layers = [(n, m) for n, m in masked_layers(module) if m._exec_flops is not None and not m._exec_flops.is_meta]
    for _, m in layers:
        m._fold_flops_sink()
    vals = _to_host([m._exec_flops[i] for _, m in layers for i in range(3)])
    return {n: dict(zip(("forward", "input_grad", "weight_grad"), vals[3 * j: 3 * j + 3]))
            for j, (n, _) in enumerate(layers)}


def reset_executed_flops(module: nn.Module) -> None:
    from .convert import masked_layers

    for _, m in masked_layers(module):
        if m._exec_flops is not None:
            m._exec_flops.zero_()
        if m._exec_flops_sink is not None:
            m._exec_flops_sink.grad = None


def exec_record(nlive: Tensor, cout: int, cin: int, khkw: int, in_nlive: Optional[Tensor] = None,
                dgrad_skip: bool = False) -> dict:
    """What a forward that skipped GEMM work leaves in `layer._exec_record` for `record_executed`:
    nlive[0] live output channels (of cout), in_nlive[0] live input channels (None: all cin),
    dgrad_skip: the input gradient skipped them too; khkw: kernel positions (1 for linear)."""
    return {"nlive": nlive, "in_nlive": in_nlive, "dgrad_skip": dgrad_skip, "cout": cout, "cin": cin, "khkw": khkw}


def record_executed(layer, uses: int):
    """(forward, input_grad, weight_grad) executed FLOPs of the layer's last forward, as ints or 0-dim
    device tensors, or None when it ran the masked-weight path (executed = dense)."""
    r = layer._exec_record
    if r is None:
        return None
    nl = r["nlive"][0].to(torch.int64)
    cin = r["cin"] if r["in_nlive"] is None else r["in_nlive"][0].to(torch.int64)
    cin_dgrad = cin if r["dgrad_skip"] else r["cin"]
    k = r["khkw"]
    return 2 * uses * nl * cin * k, 2 * uses * nl * cin_dgrad * k, 2 * uses * r["cout"] * cin * k


__all__ = ["EXECUTION_MODES", "set_execution", "default_execution", "resolve", "fused_support", "decide",
           "cached_decision", "decisions", "clear_decisions", "set_decision_cache", "compaction", "live_rows", "compact_chains",
           "executed_flops", "reset_executed_flops", "exec_record", "record_executed"]
