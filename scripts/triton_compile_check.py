"""Compiles every Triton kernel of rgkernels for a GPU architecture (default sm_90, the H100) without
a GPU: what the interpreter-based tests cannot show.

The tests run the Triton kernels under TRITON_INTERPRET=1, which accepts programs the compiler
refuses (tl.dot on tiles under 16, dtypes a target lacks, ...) and takes other tile sizes and dot
dtypes (bf16 dots are float32 there). This script runs the ops' Python wrappers in compiled mode on
CPU tensors with the launch replaced: each launch's specialisation (argument types, constexprs,
num_warps / num_stages, as the wrapper chose them for a GPU) is compiled to a cubin with
`triton.compile(..., target=GPUTarget("cuda", ARCH, 32))`, and its shared memory is checked against
what a block may use on that architecture; nothing runs, so the outputs are garbage and only the
compilation is checked.

    python scripts/triton_compile_check.py [--arch 90] [--quick] [--dtypes float32,bfloat16]

Exit status 0 when every specialisation compiled, 1 otherwise (each failure printed with its kernel,
signature and the compiler's message).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

os.environ.pop("TRITON_INTERPRET", None)  # compiled mode: must be unset before triton is imported

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from rgkernels.ops import _triton_util as U  # noqa: E402
from rgkernels.ops import triton_mask_stats, triton_masked_conv, triton_masked_linear  # noqa: E402,F401
from rgkernels.ops import triton_masked_weight as TMW  # noqa: E402

ops = torch.ops.rgkernels
DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
          torch.int32: "i32", torch.int64: "i64", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
          torch.bool: "i1"}


# Shared memory a block may use (the opt-in maximum per block), by compute capability: the compiler
# does not check it (the driver refuses the launch), so the check does.
SHARED_LIMIT = {70: 98304, 75: 65536, 80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448,
                100: 232448, 120: 101376}


class Compiler:
    """Stands in for JITFunction.run: compiles each distinct specialisation once, records failures."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)
        self.done, self.failures = {}, []
        self.max_shared = 0

    def signature(self, fn: JITFunction, args, kwargs):
        bound = dict(zip(fn.arg_names, args))
        bound.update(kwargs)
        sig, consts = {}, {}
        for p in fn.params:
            v = bound[p.name] if p.name in bound else p.default
            if p.is_constexpr or v is None:
                sig[p.name], consts[p.name] = "constexpr", v
            elif isinstance(v, torch.Tensor):
                sig[p.name] = "*" + DTYPES[v.dtype]
            elif isinstance(v, bool):
                sig[p.name] = "i1"
            elif isinstance(v, int):
                sig[p.name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
            elif isinstance(v, float):
                sig[p.name] = "fp32"
            else:
                raise TypeError(f"{fn.__name__}: cannot type argument {p.name}={v!r}")
        return sig, consts

    def run(self, fn: JITFunction, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "num_ctas") if k in kwargs}
        sig, consts = self.signature(fn, args, kwargs)
        key = (fn.__name__, tuple(sig.items()), tuple((k, repr(v)) for k, v in consts.items()),
               tuple(sorted(options.items())))
        if key in self.done:
            return None
        t0 = time.time()
        try:
            src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts)
            kernel = triton.compile(src, target=self.target, options=options)
            self.max_shared = max(self.max_shared, kernel.metadata.shared)
            limit = SHARED_LIMIT.get(self.target.arch)
            if limit is not None and kernel.metadata.shared > limit:
                raise RuntimeError(f"needs {kernel.metadata.shared} bytes of shared memory per block; "
                                   f"sm_{self.target.arch} allows {limit}")
            self.done[key] = time.time() - t0
        except Exception as e:  # any compiler error: reported, the other kernels still compiled
            self.done[key] = None
            what = {k: v for k, v in consts.items() if v is not None}
            self.failures.append(f"{fn.__name__} {options} constexprs {what}\n  signature {sig}\n  "
                                 f"{type(e).__name__}: {str(e).strip()[:2000]}")
        return None


def _compiled_mode():
    """The ops' device checks, answered as on a GPU: kernels built by triton.jit, not interpreted."""
    def require(kernels, device, op):
        kernels.build()
        return False

    def require_weight(device, grouped):
        TMW._build_kernels()
        return False

    U.require = require
    TMW._require = require_weight


def _layer(c, k, dtype, dead=(1,)):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(c, k, generator=g).to(dtype)
    t = torch.rand(c, generator=g) * 0.8
    for i in dead:
        if i < c:
            t[i] = 100.0
    return w, t


def masked_weight_cases(quick, dtypes):
    shapes = [(1, 1), (37, 45), (8, 4096)] + ([] if quick else [(300, 1000), (4096, 128)])
    for dtype in dtypes:
        for c, k in shapes:
            w, t = _layer(c, k, dtype)
            for guard in (0.01, -1.0):
                ops.triton_masked_weight_fwd(w, t.clone(), guard)
                ops.triton_masked_weight_fwd(w.t().contiguous().t() if c > 1 and k > 1 else w, t.clone(), guard)
            for mode in (0, 1):
                ops.triton_masked_weight_bwd(torch.randn(c, k).to(dtype), w, t, mode)
        ws = [_layer(c, k, dtype)[0] for c, k in shapes]
        ts = [_layer(c, k, dtype)[1] for c, k in shapes]
        ops.triton_masked_weight_grouped_fwd(ws, ts, 0.01)
        for mode in (0, 1):
            ops.triton_masked_weight_grouped_bwd([torch.randn_like(w) for w in ws], ws, ts, mode)


def linear_cases(quick, dtypes):
    shapes = [(5, 9, 12), (64, 4096, 128)] + ([] if quick else [(32, 512, 512), (8, 128, 8192), (300, 70, 33)])
    for dtype in (d for d in dtypes if d != torch.float64):  # the GEMM kernels take no float64
        for m, c, k in shapes:
            w, t = _layer(c, k, dtype)
            x = torch.randn(m, k).to(dtype)
            b = torch.randn(c).to(dtype)
            counts, bits, perm, zperm, nlive = ops.triton_mask_stats(w, t.clone(), b, 0.01)
            ops.triton_mask_stats(w, t.clone(), None, -1.0)
            flops = torch.zeros(3, dtype=torch.int64)
            in_perm, in_nlive = torch.arange(k, dtype=torch.int32), torch.tensor([k - 1], dtype=torch.int32)
            dy = torch.randn(m, c).to(dtype)
            for ip, inl in ((None, None), (in_perm, in_nlive)):
                ops.triton_masked_linear_fwd(x, w, t, b, perm, nlive, ip, inl, flops)
                ops.triton_masked_linear_fwd(x, w, t, None, perm, nlive, ip, inl, flops)
                ops.triton_masked_linear_dgrad(dy, w, t, perm, nlive, ip, inl, flops)
                for mode in (0, 1):
                    ops.triton_masked_linear_wgrad(dy, x, w, t, ip, inl, mode, flops)


def conv_cases(quick, dtypes):
    # (co, ci, kh, kw, stride, padding, dilation, H, W, transposed, output_padding)
    cases = [(6, 4, 3, 3, [1, 1], [1, 1], [1, 1], 7, 6, False, [0, 0]),
             (64, 128, 4, 4, [2, 2], [1, 1], [1, 1], 16, 16, False, [0, 0]),
             (5, 3, 4, 4, [2, 2], [1, 1], [1, 1], 4, 5, True, [0, 0]),
             (256, 512, 4, 4, [1, 1], [0, 0], [1, 1], 1, 1, True, [0, 0])]
    if not quick:
        cases += [(5, 3, 3, 2, [2, 1], [2, 0], [1, 2], 9, 8, False, [0, 0]),
                  (4, 5, 3, 2, [2, 3], [1, 0], [1, 2], 5, 4, True, [1, 2])]
    for dtype in (d for d in dtypes if d != torch.float64):
        for co, ci, kh, kw, stride, padding, dilation, h, wd, transposed, out_pad in cases:
            w, t = _layer(co, ci * kh * kw, dtype)
            w = w.view(co, ci, kh, kw)
            if transposed:  # the [Co, Ci, KH, KW] row view of a [Ci, Co, KH, KW] parameter
                w = w.transpose(0, 1).contiguous().transpose(0, 1)
            rows = w.flatten(2) if transposed else w.reshape(co, -1)
            b = torch.randn(co).to(dtype)
            x = torch.randn(2, ci, h, wd).to(dtype)
            counts, bits, perm, zperm, nlive = ops.triton_mask_stats(rows, t.clone(), b, 0.01)
            geo = [stride, padding, dilation, transposed]
            flops = torch.zeros(3, dtype=torch.int64)
            in_perm, in_nlive = torch.arange(ci, dtype=torch.int32), torch.tensor([ci - 1], dtype=torch.int32)
            for layout in ("contiguous", "channels_last"):
                xl = x if layout == "contiguous" else x.contiguous(memory_format=torch.channels_last)
                for ip, inl in ((None, None), (in_perm, in_nlive)):
                    y = ops.triton_masked_conv_fwd(xl, w, t, b, perm, nlive, ip, inl, flops, *geo, out_pad)
                    dy = torch.randn(y.shape).to(dtype)
                    ops.triton_masked_conv_dgrad(dy, w, t, perm, nlive, None, None, flops, [h, wd], *geo)
                    for mode in (0, 1):
                        ops.triton_masked_conv_wgrad(dy, xl, w, t, ip, inl, mode, flops, *geo)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80, 86, 90 (default 90)")
    p.add_argument("--quick", action="store_true", help="fewer shapes (each kernel and dtype still covered)")
    p.add_argument("--dtypes", default="float32,float16,bfloat16,float64",
                   help="weight dtypes, comma-separated (default: all four; float64: masked-weight kernels only)")
    args = p.parse_args(argv)
    dtypes = [getattr(torch, d.strip()) for d in args.dtypes.split(",")]

    compiler = Compiler(args.arch)
    JITFunction.run = lambda fn, *a, **kw: compiler.run(fn, *a, **kw)
    _compiled_mode()
    t0 = time.time()
    for cases in (masked_weight_cases, linear_cases, conv_cases):
        try:
            cases(args.quick, dtypes)
        except Exception:  # a wrapper that fails before its launch: a defect too
            compiler.failures.append(f"{cases.__name__}: the wrapper failed\n{traceback.format_exc()}")
    ok = sum(v is not None for v in compiler.done.values())
    kernels = sorted({k[0] for k in compiler.done})
    print(f"triton {triton.__version__}, sm_{args.arch}: {ok} of {len(compiler.done)} specialisations of "
          f"{len(kernels)} kernels ({', '.join(kernels)}) compiled in {time.time() - t0:.0f} s; the most shared "
          f"memory a block uses: {compiler.max_shared} bytes (sm_{args.arch} allows {SHARED_LIMIT.get(args.arch)})")
    for f in compiler.failures:
        print("FAILED", f, sep=": ", file=sys.stderr)
    return 0 if not compiler.failures and ok else 1


if __name__ == "__main__":
    sys.exit(main())
