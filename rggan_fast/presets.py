"""Presets: the hyperparameters of each architecture and data set, in one table.

`config.resolve_config` applies them in order: ARCH_PRESETS[arch], then
DATA_PRESETS[(arch, family)], then NAMED_PRESETS[--preset], then command-line options.
The resolved values are saved with every run (config.json).
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

# Architecture defaults: the paper's settings for each base model.
ARCH_PRESETS: Dict[str, Dict[str, Any]] = {
    # SNGAN (Miyato et al. 2018) as in RG-GAN Table 5: ResNet G/D at 32x32, spectral norm in D,
    # hinge loss, n_critic 5, Adam(2e-4, (0, 0.9)), batch 64, G EMA 0.999 with the warm-up
    # min(0.999, (1 + t) / (10 + t)) at G step t, so that G_ema follows G in short runs.
    "sngan": dict(res=32, z_dim=128, g_ch=256, d_ch=128, loss="hinge", n_critic=5, batch=64,
                  lr_g=2e-4, lr_d=2e-4, beta1=0.0, beta2=0.9, ema_beta=0.999, ema_warmup=True,
                  ema_warmup_steps=10.0, lam=5e-12),
}

# Which architectures the CLI knows, and which of them are built.
KNOWN_ARCHS = ("sngan", "progan", "stylegan2", "fastgan")
IMPLEMENTED_ARCHS = tuple(ARCH_PRESETS)


def data_family(kind: str) -> str:
    """cifar10 -> 'cifar10'; lfw100 / folder / zip -> 'fewshot' (small image sets)."""
    return "cifar10" if kind == "cifar10" else "fewshot"


# Data-set defaults per architecture.
DATA_PRESETS: Dict[Tuple[str, str], Dict[str, Any]] = {
    # Table 5: 40M real images for the baseline; FID vs the test set (paper: 50k samples,
    # here 10k during training and 50k for the final evaluation). No DiffAugment.
    ("sngan", "cifar10"): dict(kimg=40000, eval_kimg=250, fid_samples=10000, final_fid_samples=50000,
                               fid_ref="test", diffaug=""),
    # Few-shot sets (100 images): FID with 5k samples vs the training set, DiffAugment on with the
    # DiffAugment paper's strengths (translation by up to 1/8 of the size, cutout of half the size).
    ("sngan", "fewshot"): dict(kimg=500, eval_kimg=25, fid_samples=5000, fid_ref="train",
                               diffaug="color,translation,cutout", diffaug_translation=0.125,
                               diffaug_cutout=0.5),
}

# Named presets (--preset NAME).
NAMED_PRESETS: Dict[str, Dict[str, Any]] = {
    # The built-in demo (python -m rggan_fast.demo): RG-SNGAN on lfw100 at 32x32, about 6 minutes
    # on a quiet 2-core CPU (measured). Narrower nets (width 32), batch 32 and lr 1e-4 (2e-4 made the FID of these
    # ~400 G steps on 100 images climb back after 20 kimg, dense or RG alike) so that it fits and
    # the FID falls. FID with 128 samples vs the 100 images: labelled with its sample counts, and
    # far above a 5k-sample FID.
    "demo": dict(data="lfw100", res=32, g_ch=32, d_ch=32, batch=32, lr_g=1e-4, lr_d=1e-4, kimg=60, eval_kimg=10,
                 fid_samples=128, final_fid_samples=128, fid_batch=64, kid_subset_size=100,
                 log_every=10, flops_every=20, grid=64, diffaug="color,translation,cutout"),
    # Tiny settings for the test suite: seconds per run.
    "test": dict(data="lfw100", res=32, g_ch=16, d_ch=16, z_dim=16, batch=8, n_critic=2,
                 kimg=0.064, eval_kimg=0.032, fid_samples=8, final_fid_samples=8, fid_batch=8,
                 kid_subsets=4, kid_subset_size=8, log_every=1, flops_every=1, grid=4,
                 progress=False, diffaug="color,translation,cutout"),
}
