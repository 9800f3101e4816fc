"""The one place where a TrainConfig becomes objects: data, networks, optimisers, loss, RG
controller and evaluator. The training loop only calls these functions."""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from .config import TrainConfig
from .data import BatchStream, TrainingData, load_training_data
from .networks import sngan
from .training.augment import DiffAugment
from .training.controller import NoRegrowth, RGController
from .training.loss import GANLoss


def resolve_device(name: str) -> torch.device:
    """auto | cpu | cuda | cuda:N -> a device that exists here; ValueError naming --device otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA device is available here (torch.cuda.is_available() "
                             "is False); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: unsupported device type; use auto, cpu, cuda or cuda:N")
    return device


def build_data(cfg: TrainConfig, progress: Callable = lambda it, **kw: it) -> TrainingData:
    return load_training_data(cfg.data, cfg.data_kind, cfg.res, cfg.data_ratio, cfg.subset_seed,
                              cfg.fid_ref, progress)


def build_stream(cfg: TrainConfig, data: TrainingData, device: torch.device) -> BatchStream:
    return BatchStream(data.train.images, cfg.batch, cfg.seed, device, xflip=cfg.xflip)


def build_networks(cfg: TrainConfig, device: torch.device):
    """G, D (masked where pruned, in sparse mode) and G_ema (a frozen copy of G)."""
    if cfg.arch != "sngan":
        raise NotImplementedError(f"{cfg.arch} is not implemented yet")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        G = sngan.Generator(z_dim=cfg.z_dim, ch=cfg.g_ch, res=cfg.res)
        D = sngan.Discriminator(ch=cfg.d_ch, res=cfg.res)
    pruned = cfg.nets("prune")
    for name, net in (("G", G), ("D", D)):
        if name in pruned:
            import rgkernels

            rgkernels.sparsify(net)
            for _, layer in rgkernels.masked_layers(net):
                layer.grad_mode = cfg.grad_mode
                layer.execution = cfg.execution
            rgkernels.set_sparse(net, True)  # RG-GAN starts sparse
    G, D = G.to(device).train(), D.to(device).train()
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    return G, D, G_ema


def build_optimizers(cfg: TrainConfig, G, D) -> Dict[str, torch.optim.Optimizer]:
    """Adam for all parameters of each net (weights, biases and thresholds); the RG hooks come from
    install_rg_hooks."""
    return {"G": adam(G.parameters(), lr=cfg.lr_g, betas=(cfg.beta1, cfg.beta2)),
            "D": adam(D.parameters(), lr=cfg.lr_d, betas=(cfg.beta1, cfg.beta2))}


def adam(params, lr: float, betas) -> torch.optim.Adam:
    """torch.optim.Adam with PyTorch's fused kernel (CPU and CUDA): one pass per parameter instead of
    a dozen elementwise ops. On the CPU the default (per-tensor) Adam is also slow exactly where RG-GAN
    puts zeros: torch.sqrt of zeros ran ~10x slower than of other values on the Intel Xeon of session
    6, and a pruned weight's gradient, hence its second moment, is zero; an Adam step on a 4096x128
    weight with half its gradients zero took 4.2 ms (2.65 ms with none), the fused one 0.62 ms in both
    cases. Falls back to the default implementation, with a warning, where the fused one is refused."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError, ValueError) as exc:
        warnings.warn(f"rggan_fast: fused Adam unavailable ({str(exc).splitlines()[0]}); using torch's default Adam")
        return torch.optim.Adam(params, lr=lr, betas=betas)


def install_rg_hooks(cfg: TrainConfig, nets: Dict[str, torch.nn.Module], opts) -> List:
    handles = []
    pruned, regen = cfg.nets("prune"), cfg.nets("regen")
    for name in pruned:
        import rgkernels

        handles.append(rgkernels.protect_pruned(nets[name], opts[name]))
        if name not in regen:
            handles.append(NoRegrowth(nets[name], opts[name]))
    return handles


def build_loss(cfg: TrainConfig, G, D) -> GANLoss:
    pruned = cfg.nets("prune")
    augment = DiffAugment(cfg.diffaug, translation_ratio=cfg.diffaug_translation, cutout_ratio=cfg.diffaug_cutout)
    return GANLoss(G, D, augment, kind=cfg.loss, lam=cfg.lam,
                   regularise_G="G" in pruned, regularise_D="D" in pruned)


def build_controller(cfg: TrainConfig) -> RGController:
    # AR switches only nets that are pruned and under AR: with none, the mode it would log (and count
    # as switches) is one that no network trains in.
    return RGController(weights=cfg.ar_weights, enabled=bool(set(cfg.nets("aug_regen")) & set(cfg.nets("prune"))))


def build_evaluator(cfg: TrainConfig, data: TrainingData, device: torch.device, log=print,
                    progress: Callable = lambda it, **kw: it):
    from .metrics import Evaluator

    return Evaluator(cfg.metric, data.reference.images, data.reference.key, device, cache_dir=cfg.cache_dir,
                     batch=cfg.fid_batch, kid_on=cfg.kid, kid_subsets=cfg.kid_subsets,
                     kid_subset_size=cfg.kid_subset_size, allow_download=cfg.inception_download,
                     log=log, progress=progress)
