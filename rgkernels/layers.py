"""Masked nn layers: Linear / Conv2d / ConvTranspose2d that compute with W * S(|W| - t) (DESIGN.md §1-2).

Each layer is a subclass of its nn layer plus `MaskedLayer`, which holds the pruning state:
    .threshold    nn.Parameter, float32 [out_channels], zeros at creation; `.half()` / `.bfloat16()`
                  keep it float32, `.double()` makes it float64 (exact float64 semantics, on the
                  reference backend with a warning: the fast kernels take float32 thresholds)
    .sparse       True = sparse mode (W_hat = W * M); False = dense mode, exactly the nn layer
    .grad_mode    "dst" (default) or "masked", see rgkernels.masked_weight
    .guard_ratio  collapse-guard keep ratio (None disables the guard)
    .last_counts  int32 [out_channels] keep counts of the last sparse forward (a device tensor,
                  never synced here)
    .execution    how sparse mode runs: "masked_weight" (default; RGKERNELS_EXECUTION changes it),
                  "fused" or "auto" (rgkernels/sparse_exec.py)

The mask is computed on whatever `self.weight` is at forward time, so reparametrisations
(spectral norm in either form, equalised learning rate) are masked on the effective weight. The
gradient reaching the stored parameter of such a reparametrisation is multiplied by the same mask
through a gradient hook on that parameter (§2: pruned entries of the stored weight are frozen).

Masks are not computed separately: what the forward leaves determines them exactly (see `_mask_rows`),
so statistics and `protect_pruned` add no kernel launch to the forward. That is the bit-packed mask
(1 bit per weight) where the forward ran the fused GPU kernels or the C++ CPU node (linear layers and
convs lowered to one), else the masked weight with the keep counts (the op's output, kept until the
next forward: one weight-sized tensor per layer).
"""
from __future__ import annotations

import copy
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import _backend
from .ops import cpu_compact_conv, cpu_masked_linear
from .ops.masked_weight import DEFAULT_GUARD_RATIO, _grad_mode_id, guard_value, masked_weight
from .sparse_exec import default_execution

# Per-forward caches: dropped on device/dtype moves and on pickling/deepcopy, rebuilt by the next forward.
_PER_FORWARD = ("last_counts", "_last_masked", "_mask_cache", "_pre_masked", "_last_bits", "_last_rows_shape",
                "_exec_record", "_chain_out")
# Also dropped on pickling/deepcopy: the copy's parameters are new objects without our gradient hook,
# and the regeneration snapshot of rgkernels.layer_stats belongs to the original.
# Chain links (weak references) and "auto" bookkeeping (CUDA events) are process-local as well.
_TRANSIENT = _PER_FORWARD + ("_grad_hooked", "_stats_mask", "_chain_src", "_chain_seq", "_exec_state",
                              "_exec_memo")


def unsupported_reparametrisation(module: nn.Module) -> Optional[str]:
    """Why the weight's reparametrisation cannot be masked, or None. The mask is computed on the
    effective weight and the stored parameter's gradient is multiplied by the same M (DESIGN.md section 2),
    which needs one stored tensor shaped like the weight: weight norm stores a direction and a per-channel
    magnitude (weight_v / weight_g, or original0 / original1), whose entries are not the weight's."""
    if "weight_g" in module._parameters or "weight_v" in module._parameters:
        return "torch.nn.utils.weight_norm (weight_g, weight_v)"
    p = module._modules.get("parametrizations")
    if p is not None and "weight" in p and not hasattr(p["weight"], "original"):
        names = [n for n, _ in p["weight"].named_parameters(recurse=False)]
        return f"a parametrisation with several stored tensors ({', '.join(names)}; e.g. parametrizations.weight_norm)"
    return None


def stored_weight(module: nn.Module) -> Tensor:
    """The weight parameter the optimiser updates: weight_orig (hook-form spectral norm), the
    original of a parametrisation (parametrizations.spectral_norm), or the weight itself. Reading it
    never runs a parametrisation (no power iteration)."""
    if "weight_orig" in module._parameters:
        return module._parameters["weight_orig"]
    why = unsupported_reparametrisation(module)
    if why is not None:
        raise NotImplementedError(f"{type(module).__name__}: masked layers cannot prune a weight under {why}: "
                                  "use spectral norm, or remove it")
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations["weight"].original
    return module.weight


def check_mode_flag(flag) -> bool:
    """`flag` as a bool, if it is one. Only real booleans: bool("False") is True, and a config string
    or None would otherwise switch the mode without a word."""
    numpy_bool = type(flag).__module__ == "numpy" and type(flag).__name__ in ("bool", "bool_")
    if not (isinstance(flag, bool) or numpy_bool):
        raise TypeError(f"sparse must be True (sparse mode) or False (dense mode), got {flag!r}")
    return bool(flag)


def _rehook_after_load(module, incompatible_keys) -> None:  # module-level: a layer with it still pickles
    if torch.__future__.get_swap_module_params_on_conversion():  # load_state_dict swapped the tensors
        module._rehook_after_swap()


def flops_sink(device) -> Tensor:
    """The leaf whose gradient receives a compiled backward's FLOP counts (sparse_exec._FusedFn): in a
    graph, kernels of the backward cannot add to a counter that a second forward before it also writes
    (autograd's in-place check on what the backward saved), while gradients simply accumulate."""
    return torch.zeros(2, dtype=torch.float64, device=device, requires_grad=True)


def _moved(t: Tensor, fn) -> Tensor:
    """`t` on the device nn.Module._apply's `fn` moves tensors to, with its own dtype and values (zeros
    from the meta device, which has none: `to_empty()` of a model built there)."""
    device = fn(t.new_empty(0)).device
    if t.is_meta and device.type != "meta":
        return torch.zeros(t.shape, dtype=t.dtype, device=device)
    return t.to(device)


class MaskedLayer:
    """Mixin with the pruning state and logic shared by the masked layers (not an nn.Module itself)."""

    # Sparse-execution state (rgkernels/sparse_exec.py); class-level defaults so that layers pickled
    # before these existed still load.
    _last_bits = None  # uint8 [C_out, ceil(K/8)]: bit-packed mask of the last fused forward
    _last_rows_shape = None  # the [C_out, ...] shape that mask belongs to
    _exec_record = None  # live channel counts of the last forward that skipped GEMM work (count_flops)
    _exec_flops = None  # int64 [3] device counter of the FLOPs the fused kernels ran
    _exec_flops_sink = None  # float64 [2] leaf: compiled backwards' counts arrive as its gradient
    _exec_state = None  # "auto" bookkeeping
    _exec_memo = None  # "auto" decisions per call signature (sparse_exec.auto_choice)
    _chain_src = None  # weakref to the producer layer of a chain (sparse_exec.compact_chains)
    _chain_dgrad = False
    _chain_seq = None
    _chain_out = None

    @property
    def execution(self) -> str:
        mode = self.__dict__.get("_execution")
        if mode is None:
            return default_execution()
        return mode

    @execution.setter
    def execution(self, mode: str) -> None:
        from .sparse_exec import check_mode

        self.__dict__["_execution"] = check_mode(mode)

    def _init_masked_state(self) -> None:
        """Adds the pruning state; also used by `sparsify` on a module whose class was swapped in place."""
        w = self._stored_weight()
        self.threshold = nn.Parameter(torch.zeros(self.mask_rows, dtype=torch.float32, device=w.device))
        self.grad_mode = "dst"
        self.guard_ratio: Optional[float] = DEFAULT_GUARD_RATIO
        self._sparse = True
        for name in _TRANSIENT:
            object.__setattr__(self, name, None)
        # Made here, not by the first fused forward: under torch.compile a counter created inside the
        # graph could not be written by the backward's kernels (see sparse_exec._EAGER_NEW_FLOPS_COUNTER).
        self._place_exec_flops(w.device)
        self.register_load_state_dict_post_hook(_rehook_after_load)
        # A weight already under spectral norm gets its gradient hook now rather than in the first forward,
        # which under torch.compile would recompile the graph at the second call (hook registered, or not).
        self._hook_stored_weight()

    def reset_parameters(self) -> None:
        """The nn layer's initialisation, and the threshold back to 0 (as created): after `to_empty()`
        (a model built on the meta device) the threshold would otherwise hold whatever memory it got.
        nn's __init__ calls this before the threshold exists."""
        super().reset_parameters()
        t = self.__dict__.get("_parameters", {}).get("threshold")
        if t is not None:
            with torch.no_grad():
                t.zero_()

    # ---- layout: one row per output channel -----------------------------------------------------

    @property
    def mask_rows(self) -> int:
        """Number of output channels (rows of the mask)."""
        return self._stored_weight().shape[0]

    def _to_rows(self, w: Tensor) -> Tensor:
        """Weight layout -> [C_out, ...] layout (identity except for transposed convs)."""
        return w

    def _from_rows(self, r: Tensor) -> Tensor:
        return r

    # ---- mode --------------------------------------------------------------------------------------

    @property
    def sparse(self) -> bool:
        return self._sparse

    @sparse.setter
    def sparse(self, flag: bool) -> None:
        self._sparse = check_mode_flag(flag)
        # A mask from before a mode switch no longer describes the layer.
        self._last_masked = self.last_counts = self._mask_cache = self._last_bits = self._exec_record = None

    # ---- the stored (optimised) weight parameter --------------------------------------------------

    def _stored_weight(self) -> Tensor:
        return stored_weight(self)

    def _is_reparametrised(self) -> bool:
        # parametrize.is_parametrized(self, "weight") without its getattr (an AttributeError raised
        # and caught inside nn.Module.__getattr__ on every unparametrised layer, every forward).
        # Hook forms: spectral norm (weight_orig) and weight norm (weight_g, which _stored_weight refuses).
        if "weight_orig" in self._parameters or "weight_g" in self._parameters:
            return True
        p = self._modules.get("parametrizations")
        return p is not None and "weight" in p

    def _hook_stored_weight(self) -> None:
        """Registers (once per stored parameter) the hook that masks the stored parameter's gradient."""
        if not self._is_reparametrised():
            return  # the op already multiplies the weight gradient by M
        p = self._stored_weight()
        if self._grad_hooked is p or not p.requires_grad:  # (a frozen weight gets no gradient, nor a hook)
            return
        # No weak reference to `p`: torch.utils.swap_tensors (`.to()` / load_state_dict with
        # torch.__future__.set_swap_module_params_on_conversion(True)) refuses tensors that have one.
        # The cycle p -> its hook -> p is garbage-collected like any other.
        layer_ref = weakref.ref(self)

        def mask_grad(g: Tensor) -> Tensor:
            layer = layer_ref()
            # Inert on a parameter that is no longer this layer's stored weight (e.g. a deep copy).
            if layer is None or not layer.sparse or layer._stored_weight() is not p:
                return g
            m = layer.mask()
            return g if m is None else g.masked_fill(~m, 0)

        p.register_hook(mask_grad)
        # In __dict__, not through nn.Module.__setattr__ (which would register it as a parameter).
        object.__setattr__(self, "_grad_hooked", p)

    def _rehook_after_swap(self) -> None:
        """torch.utils.swap_tensors (`.to()` / load_state_dict under torch's swap-on-conversion switch) leaves
        a tensor's gradient hooks dead, and keeps the Python dict of them, which stops register_hook from
        binding a new one: the dict goes (every hook in it is dead) and the stored weight is hooked anew."""
        p = self._grad_hooked
        if p is None:
            return
        p._backward_hooks = None
        object.__setattr__(self, "_grad_hooked", None)
        self._hook_stored_weight()

    # ---- the masked weight -------------------------------------------------------------------------

    def _masked_weight(self, weight: Optional[Tensor] = None) -> Tensor:
        """W * M in the weight's layout (W = `weight`, the effective weight, when already computed);
        records counts and the masked weight for statistics."""
        pre = self._pre_masked  # set by rgkernels.grouped_masks (one launch for all layers)
        if pre is not None:
            return pre
        self._hook_stored_weight()
        if weight is None:
            weight = self.weight
        rows, thresholds = self._mask_operands(weight)
        w_hat, counts = masked_weight(rows, thresholds, self.grad_mode, guard_ratio=self.guard_ratio,
                                      return_counts=True)
        return self._mask_result(w_hat, counts, thresholds)

    def _mask_operands(self, weight: Tensor):
        """(rows, thresholds): what masked_weight (or the grouped launch) runs on for this layer, one
        threshold per row. Here the [C_out, ...] mask rows and the layer's threshold."""
        return self._to_rows(weight), self._parameters["threshold"]

    def _mask_result(self, w_hat: Tensor, counts: Tensor, thresholds: Tensor) -> Tensor:
        """masked_weight's result on `_mask_operands`' rows -> W * M in the weight's layout; records the
        per-channel keep counts and the masked weight for statistics."""
        self._record(w_hat, counts)
        return self._from_rows(w_hat)

    def _record(self, w_hat_rows: Tensor, counts: Tensor) -> None:
        # Straight into __dict__: nn.Module.__setattr__ costs microseconds per attribute, and this
        # runs in every forward (none of these names is a parameter, buffer or submodule).
        d = self.__dict__
        d["_last_masked"] = w_hat_rows.detach()
        d["last_counts"] = counts
        d["_mask_cache"] = d["_last_bits"] = None

    def _record_fused(self, counts: Tensor, bits: Tensor, rows_shape) -> None:
        """What a fused forward leaves instead of the masked weight: counts and the bit-packed mask."""
        d = self.__dict__
        d["last_counts"] = counts
        d["_last_bits"] = bits
        d["_last_rows_shape"] = tuple(rows_shape)
        d["_last_masked"] = d["_mask_cache"] = None

    def _sparse_forward(self, input: Tensor, **kw) -> Tensor:
        # Plain __dict__ reads: this runs in every forward of every layer (see _record).
        d = self.__dict__
        if d.get("_pre_masked") is None and (d.get("_execution") or default_execution()) != "masked_weight":
            from . import sparse_exec

            return sparse_exec.forward(self, input, **kw)
        if torch.compiler.is_compiling():  # no guard on the record an eager call may leave: a recompile
            self._exec_record = None
        elif d.get("_exec_record") is not None:
            d["_exec_record"] = None
        return self._masked_weight_forward(input, **kw)

    def _masked_weight_forward(self, input: Tensor, weight: Optional[Tensor] = None, **kw) -> Tensor:
        """The "masked_weight" path: the layer's function on W * M. Where the layer is a GEMM on the
        CPU (a linear layer, or a conv that `_linear_input` lowers to one) and the compiled kernels
        are there, it runs as one fused node (rgkernels/ops/cpu_masked_linear.py): same forward, the
        masked-weight backward fused into the weight-gradient GEMM."""
        pre_masked = self.__dict__.get("_pre_masked") is not None  # (then the weight is not read at all:
        if weight is None and not pre_masked:                     # a spectral-norm parametrisation would
            weight = self.weight                                  # run one more power iteration)
        if input.is_cpu and not pre_masked:
            y = self._cpu_linear_forward(input, weight, **kw)
            if y is not None:
                return y
        w_hat = self._masked_weight(weight)
        if input.is_cpu:
            y = self._cpu_compact_forward(input, w_hat, **kw)
            if y is not None:
                return y
        return self._functional(input, w_hat, **kw)

    def _cpu_linear_forward(self, input: Tensor, weight: Tensor, **kw) -> Optional[Tensor]:
        """The layer's output from the CPU masked-linear node where the layer is a linear layer on its
        [C_out, K] weight rows (`_linear_input` says when), else None."""
        x2 = self._linear_input(input)
        if x2 is None:
            return None
        params = self._parameters
        flat = weight.dim() != 2  # a conv's [C_out, C_in, kh, kw] weight as [C_out, K] rows
        out = self._cpu_linear(x2, weight.reshape(weight.shape[0], -1) if flat else weight, params["threshold"],
                               self._bias())
        if out is None:
            return None
        y, stats, counts, n_live = out
        if stats.dtype == torch.uint8:  # the C++ node: the mask bit-packed, rows [C_out, K]
            self._record_fused(counts, stats, weight.shape)
        else:  # the Python node (torch.compile): W_hat
            self._record(stats.view(weight.shape) if flat else stats, counts)
        if n_live is not None:
            self._record_live(n_live, weight.shape[0], weight.shape[1], weight[0, 0].numel() if flat else 1)
        return self._linear_output(y)

    def _cpu_linear(self, x2: Tensor, w2: Tensor, threshold: Tensor, bias: Optional[Tensor]):
        """cpu_masked_linear.masked_linear_cpu(x2, w2, ...) with this layer's gradient mode and guard:
        (y, W_hat, keep counts, live rows), or None where that node does not apply."""
        if not cpu_masked_linear.applies(x2, w2, threshold, bias):
            return None
        self._hook_stored_weight()
        gm, guard = _grad_mode_id(self.grad_mode), guard_value(self.guard_ratio)
        return cpu_masked_linear.masked_linear_cpu(x2, w2, threshold, bias, gm, guard,
                                                   gemm=cpu_masked_linear.gemm_choice(x2, w2, threshold, bias, gm,
                                                                                      guard))

    def _bias(self) -> Optional[Tensor]:
        """The bias the layer computes with: the parameter, or what a parametrisation of it gives
        (equalised learning rate, ...; then it is not in _parameters). The plain read first: this runs
        in every forward, and nn.Module.__getattr__ costs about a microsecond."""
        params = self._parameters
        return params["bias"] if "bias" in params else self.bias

    def _cpu_compact_forward(self, input: Tensor, w_hat: Tensor, **kw) -> Optional[Tensor]:
        """A convolution's output with its entirely pruned output channels skipped where that pays
        (rgkernels/ops/cpu_compact_conv.py), else None. Not under the forced reference backend, which
        stays the plain composition that the fast paths are compared with."""
        if not isinstance(self, nn.modules.conv._ConvNd) or _backend.reference_forced():
            return None
        counts = self.__dict__.get("last_counts")  # this forward's, from _masked_weight
        conv = cpu_compact_conv.conv_args(self, input, kw.get("output_size"))
        if counts is None or conv is None:
            return None
        out = cpu_compact_conv.compact_conv(input, w_hat, self._bias(), counts, conv)
        if out is None:
            return None
        y, n_live = out
        self._record_live(n_live, self.out_channels, self.in_channels, w_hat.shape[2] * w_hat.shape[3])
        return y

    def _record_live(self, n_live: Tensor, cout: int, cin: int, khkw: int) -> None:
        """Entirely pruned GEMM rows were skipped: what count_flops reports as executed."""
        from .sparse_exec import exec_record

        self.__dict__["_exec_record"] = exec_record(n_live, cout, cin, khkw)

    def _linear_input(self, input: Tensor) -> Optional[Tensor]:
        """`input` as the [..., K] input of an equivalent linear layer on the [C_out, K] weight rows,
        or None when the layer is not one."""
        return None

    def _linear_output(self, y: Tensor) -> Tensor:
        return y

    def _mask_rows(self) -> Optional[Tensor]:
        """Bool [C_out, K] mask of the last sparse forward, or None (dense mode / no forward yet).

        Exact without storing M: M = 1 and W_hat = 0 only where W = 0 and |0| - t > 0, i.e. t < 0,
        and then every entry of the row is kept (counts == K)."""
        if not self.sparse:
            return None
        if self._last_bits is not None:
            from .ops.triton_mask_stats import unpack_bits

            shape = self._last_rows_shape
            k = 1
            for s in shape[1:]:
                k *= s
            return unpack_bits(self._last_bits, k)
        if self._last_masked is None:
            return None
        w = self._last_masked.reshape(self._last_masked.shape[0], -1)
        return (w != 0) | (self.last_counts == w.shape[1])[:, None]

    def mask(self) -> Optional[Tensor]:
        """Bool mask of the last sparse forward in the stored weight's layout (cached until the next
        forward); None in dense mode (M = 1) or before the first sparse forward."""
        if self._mask_cache is None:
            m = self._mask_rows()
            if m is None:
                return None
            shape = self._last_masked.shape if self._last_masked is not None else self._last_rows_shape
            self._mask_cache = self._from_rows(m.view(shape))
        return self._mask_cache

    # ---- nn.Module plumbing ------------------------------------------------------------------------

    def _apply(self, fn, recurse=True):
        t_before = self.threshold.data  # aliases of the float32 storages (super() swaps in converted ones)
        g_before = None if self.threshold.grad is None else self.threshold.grad.data
        out = super()._apply(fn, recurse)
        # The fast kernels take float32 thresholds; `.half()` on a model must not demote them, nor round
        # their values through 16 bits (1e5 is inf in float16): the float32 values, moved where fn put them.
        if self.threshold.dtype in (torch.float16, torch.bfloat16):
            self.threshold.data = t_before.to(self.threshold.device)
            if g_before is not None:
                self.threshold.grad = g_before.to(self.threshold.device)
        for name in _PER_FORWARD:
            object.__setattr__(self, name, None)
        # Bookkeeping tensors follow the module to fn's device but keep their dtype and values: fn may
        # convert dtypes too (`.type(torch.float64)` converts every tensor), and these are a bool mask
        # and an int64 counter.
        if self._stats_mask is not None:  # keeps regeneration counting across `.to(device)`
            self._stats_mask = _moved(self._stats_mask, fn)
        if self._exec_flops is not None:
            self._place_exec_flops(fn(self._exec_flops.new_empty(0)).device)
        if torch.__future__.get_swap_module_params_on_conversion():
            self._rehook_after_swap()
        return out

    def _place_exec_flops(self, device) -> Tensor:
        """The executed-FLOP counter on `device`, with its counts (the sink's included; none from the meta
        device, which holds no values), and a fresh sink (flops_sink) beside it. Returns the counter."""
        old = self._exec_flops
        counter = torch.zeros(3, dtype=torch.int64, device=device)
        if old is not None and not old.is_meta:
            self._fold_flops_sink()
            counter += old.to(device)
        self._exec_flops = counter
        self._exec_flops_sink = flops_sink(device)
        return counter

    def _fold_flops_sink(self) -> None:
        """Adds the input- and weight-gradient FLOPs that compiled backwards left in the sink's gradient
        (sparse_exec._FusedFn) to the executed-FLOP counter, and empties it."""
        sink = self._exec_flops_sink
        counter = self._exec_flops
        if sink is not None and sink.grad is not None and counter is not None and not counter.is_meta:
            with torch.no_grad():
                counter[1:] += sink.grad.round().to(device=counter.device, dtype=torch.int64)
            sink.grad = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """A dense checkpoint (the nn layer's state: its weight, no threshold) loads strictly too: the
        threshold then starts at 0, as `sparsify` leaves it. Anything else missing is still reported."""
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        key = prefix + "threshold"
        weight_keys = ("weight", "weight_orig", "parametrizations.weight.original")
        if key in missing_keys and any(prefix + k in state_dict for k in weight_keys):
            missing_keys.remove(key)
            with torch.no_grad():
                self.threshold.zero_()

    def __getstate__(self):
        self._fold_flops_sink()  # pickling drops a tensor's .grad: the counts waiting there go to the counter
        state = super().__getstate__()
        for name in _TRANSIENT:
            state[name] = None
        return state

    def __deepcopy__(self, memo):
        """A copy without the per-process state, as pickling makes. Defined here because a parametrised
        layer's injected class (torch.nn.utils.parametrize) would otherwise copy __dict__ as it is: its
        copy would take the original's hooked-weight record (and CUDA events, weak references) along."""
        replica = self.__new__(type(self))
        memo[id(self)] = replica
        # MaskedLayer's __getstate__ by name: a parametrised class's own refuses (pickling is not supported)
        replica.__dict__ = copy.deepcopy(MaskedLayer.__getstate__(self), memo)
        replica._hook_stored_weight()  # its own hook, on its own stored weight, as sparsify gives
        return replica

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sparse={self.sparse}"


class MaskedLinear(MaskedLayer, nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_masked_state()

    def forward(self, input: Tensor) -> Tensor:
        if not self.sparse:
            return super().forward(input)
        return self._sparse_forward(input)

    def _functional(self, input: Tensor, weight: Tensor) -> Tensor:
        return F.linear(input, weight, self.bias)

    def _linear_input(self, input: Tensor) -> Optional[Tensor]:
        return input


class MaskedConv2d(MaskedLayer, nn.Conv2d):
    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device=device, dtype=dtype)
        self._init_masked_state()

    def forward(self, input: Tensor) -> Tensor:
        if not self.sparse:
            return super().forward(input)
        return self._sparse_forward(input)

    def _functional(self, input: Tensor, weight: Tensor) -> Tensor:
        return self._conv_forward(input, weight, self.bias)

    def _linear_input(self, input: Tensor) -> Optional[Tensor]:
        """A conv whose kernel covers its whole unpadded input (one output position, e.g. FastGAN's
        4x4 conv on a 4x4 map) is a linear layer on the flattened input."""
        if self.groups != 1 or input.dim() != 4 or tuple(self.dilation) != (1, 1):
            return None
        if self.padding not in ("valid", (0, 0)) or tuple(input.shape[2:]) != tuple(self.kernel_size):
            return None
        return input.flatten(1)  # (reshape(n, -1) cannot infer -1 for an empty batch)

    def _linear_output(self, y: Tensor) -> Tensor:
        return y.view(y.shape[0], y.shape[1], 1, 1)


class MaskedConvTranspose2d(MaskedLayer, nn.ConvTranspose2d):
    """Weight [C_in, C_out/groups, kh, kw]: output channel g*(C_out/groups) + j is column j of group
    g's rows, so the mask rows are built by regrouping the weight to [C_out, C_in/groups, kh, kw]."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 output_padding=0, groups: int = 1, bias: bool = True, dilation=1,
                 padding_mode: str = "zeros", device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, output_padding, groups,
                         bias, dilation, padding_mode, device=device, dtype=dtype)
        self._init_masked_state()

    @property
    def mask_rows(self) -> int:
        w = self._stored_weight()
        return w.shape[1] * self.groups

    def _to_rows(self, w: Tensor) -> Tensor:
        g, cin, coutg = self.groups, w.shape[0], w.shape[1]
        return w.reshape(g, cin // g, coutg, *w.shape[2:]).transpose(1, 2).reshape(g * coutg, cin // g,
                                                                                  *w.shape[2:])

    def _from_rows(self, r: Tensor) -> Tensor:
        g, cout, cing = self.groups, r.shape[0], r.shape[1]
        return r.reshape(g, cout // g, cing, *r.shape[2:]).transpose(1, 2).reshape(g * cing, cout // g,
                                                                                  *r.shape[2:])

    def forward(self, input: Tensor, output_size=None) -> Tensor:
        if not self.sparse:
            return super().forward(input, output_size)
        if self.padding_mode != "zeros":
            raise ValueError("Only `zeros` padding mode is supported for ConvTranspose2d")
        return self._sparse_forward(input, output_size=output_size)

    # On the CPU the mask is computed in the weight's own layout. The mask rows [C_out, C_in/g, kh, kw] are
    # a regrouped view whose rows are C_in/g pieces of kh * kw contiguous entries, C_out/g * kh * kw apart:
    # the row kernels would stride across the whole weight for every row (a TLB miss per piece; FastGAN's
    # first layer, 33 MB, took 1.5x a dense step on an AMD EPYC), or copy it into rows first and copy
    # the gradient back. The stored layout is itself a stack of rows: [C_in * C_out/g, kh * kw], row
    # (ci, j) belonging to output channel (ci's group) * C_out/g + j. masked_weight runs on those rows with
    # the threshold repeated per input channel (autograd sums its gradient back: §2's sum over the row,
    # in another order); the keep counts are summed per output channel, and the collapse guard, which
    # looks at the whole layer's keep ratio either way, resets the repeated thresholds and is written
    # back. (On a GPU the kernels keep the mask rows: their blocks take a row or more each.)

    def _stacked(self, weight: Tensor) -> bool:
        # (not under the forced reference backend: that stays the plain composition the fast paths are
        # compared with)
        return weight.device.type == "cpu" and weight.numel() > 0 and not _backend.reference_forced()

    def _mask_operands(self, weight: Tensor):
        if not self._stacked(weight):
            return super()._mask_operands(weight)
        cin, coutg, g = weight.shape[0], weight.shape[1], self.groups
        threshold = self._parameters["threshold"]
        repeated = threshold.view(g, 1, coutg).expand(g, cin // g, coutg).reshape(-1)
        return weight.reshape(cin * coutg, -1), repeated

    def _mask_result(self, w_hat: Tensor, counts: Tensor, thresholds: Tensor) -> Tensor:
        threshold = self._parameters["threshold"]
        if thresholds is threshold:  # the mask rows (not stacked)
            return super()._mask_result(w_hat, counts, thresholds)
        g, coutg = self.groups, threshold.shape[0] // self.groups
        shape = (self.in_channels, coutg, *self.kernel_size)
        if self.guard_ratio is not None:
            reset = thresholds.view(g, -1, coutg)[:, 0].reshape(-1)  # all of it reset, or nothing
            # Written back only when the guard fired, as on the other paths: a write bumps the threshold's
            # version (autograd's in-place check). In a graph (no data-dependent branch there) always: the
            # functionalised copy bumps nothing that the graph's backward checks.
            if torch.compiler.is_compiling() or not torch.equal(reset, threshold):
                with torch.no_grad():
                    threshold.copy_(reset)
        w_hat = w_hat.view(shape)
        self._record(self._to_rows(w_hat), counts.view(g, -1, coutg).sum(1, dtype=torch.int32).view(-1))
        return w_hat

    def _cpu_compact_forward(self, input: Tensor, w_hat: Tensor, output_size=None) -> Optional[Tensor]:
        """A transposed conv of a 1x1 map (stride 1, no padding, dilation 1, groups 1: FastGAN's first
        layer, noise -> 4x4) is one GEMM, y[n, (co, i, j)] = sum_ci x[n, ci] W_hat[ci, (co, i, j)], on W_hat
        as it lies: ATen's transposed convolution takes several times longer for it on the CPU (FastGAN's
        first layer, one thread, an AMD EPYC: 30 ms forward against 8 ms for the GEMM). Every output
        channel is computed: a pruned one's columns of W_hat are zero, and skipping them would cost a
        gather of the live columns, a pass over W_hat, where the GEMM (a batch of noise vectors) costs
        less than that pass. Other transposed convs: the base class."""
        if _backend.reference_forced():
            return None
        if (self.groups != 1 or input.dim() != 4 or input.shape[2] != 1 or input.shape[3] != 1
                or tuple(self.stride) != (1, 1) or tuple(self.padding) != (0, 0) or tuple(self.dilation) != (1, 1)
                or (output_size is None and tuple(self.output_padding) != (0, 0))
                or input.shape[1] != w_hat.shape[0] or input.dtype != w_hat.dtype or w_hat.numel() == 0):
            # (a wrong input, an invalid output_padding or an empty weight gets F.conv_transpose2d's own
            # error from the generic path)
            return super()._cpu_compact_forward(input, w_hat, output_size=output_size)
        if output_size is not None:  # validates it as nn.ConvTranspose2d does (here it can only mean 0)
            self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation)
        cin, cout, kh, kw = w_hat.shape
        x2, w2, bias = input.reshape(input.shape[0], cin), w_hat.reshape(cin, cout * kh * kw), self._bias()
        if bias is None:
            y = torch.mm(x2, w2)
        else:  # the bias of channel co at each of its kh * kw positions
            y = torch.addmm(bias[:, None].expand(cout, kh * kw).reshape(-1), x2, w2)
        return y.view(input.shape[0], cout, kh, kw)

    def _functional(self, input: Tensor, weight: Tensor, output_size=None) -> Tensor:
        output_padding = self._output_padding(input, output_size, self.stride, self.padding, self.kernel_size,
                                              2, self.dilation)
        return F.conv_transpose2d(input, weight, self.bias, self.stride, self.padding,
                                  output_padding, self.groups, self.dilation)


# nn class -> masked class, used by `sparsify` (exact types only: a subclass may override forward).
MASKED_CLASSES = {nn.Linear: MaskedLinear, nn.Conv2d: MaskedConv2d, nn.ConvTranspose2d: MaskedConvTranspose2d}
