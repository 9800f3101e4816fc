"""rgkernels: fused masked-weight kernels and masked layers for dynamic pruning (RG-GAN).

Knows nothing of GANs. Public names (DESIGN.md §3):
    masked_weight, masked_weight_grouped          the fused op (rgkernels/ops/masked_weight.py)
    MaskedLinear, MaskedConv2d, sparsify, set_sparse, keep_ratio, count_flops   (layers)
    use_backend                                   force a backend inside a `with` block
Run `python -m rgkernels.info` to see which backends are built and which one each device uses.
"""
from . import _backend
from ._backend import RGKernelsWarning, use_backend
from .ops import reference as _reference  # noqa: F401  (registers the reference ops)

if _backend.extension() is not None:
    from .ops import compiled as _compiled  # noqa: F401  (fake impls of the compiled ops)

from .ops.masked_weight import masked_weight, masked_weight_grouped


def empty_cpu_cache() -> None:
    """Returns the memory that the compiled CPU kernels keep for reuse (weight-sized outputs: masked
    weights, weight gradients; csrc/cpu/buffer_pool.cpp, capped by RGKERNELS_CPU_POOL_MB) to the system,
    like torch.cuda.empty_cache(). Tensors in use are not affected."""
    ext = _backend.extension()
    if ext is not None:
        ext.cpu_pool_release()


__version__ = "0.1.0"

__all__ = [
    "masked_weight",
    "masked_weight_grouped",
    "use_backend",
    "RGKernelsWarning",
    "empty_cpu_cache",
]

# ---- masked layers, conversion, FLOP accounting (below this line) ----------------------------
from .layers import MaskedConv2d, MaskedConvTranspose2d, MaskedLayer, MaskedLinear
from .convert import (keep_ratio, layer_stats, load_stats_state, masked_layers, set_sparse, sparsify, stats_state,
                      threshold_regularizer)
from .grouped import grouped_masks
from .optim import protect_pruned
from .flops import FlopCounts, FlopReport, LayerFlops, count_flops

__all__ += [
    "MaskedLayer", "MaskedLinear", "MaskedConv2d", "MaskedConvTranspose2d",
    "sparsify", "set_sparse", "keep_ratio", "masked_layers", "layer_stats", "stats_state", "load_stats_state",
    "threshold_regularizer",
    "grouped_masks", "protect_pruned",
    "count_flops", "FlopReport", "FlopCounts", "LayerFlops",
]
