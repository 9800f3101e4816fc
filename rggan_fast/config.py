"""The training configuration: every hyperparameter of a run lives here, nowhere else.

A run's configuration is resolved in this order (later wins):

    1. the architecture's base preset            presets.ARCH_PRESETS[arch]
    2. the data set's preset for that arch       presets.DATA_PRESETS[(arch, data kind)]
    3. a named preset given with --preset        presets.NAMED_PRESETS[name]   (demo, test, ...)
    4. options given on the command line         --batch 32, --set lr_g=1e-4, ...

The result is written to `config.json` in the run directory, and `--resume` reads it back, so a
run can always be reproduced from its directory alone.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

NETS = ("G", "D")


@dataclass
class TrainConfig:
    # --- what to train ----------------------------------------------------------------------
    arch: str = "sngan"
    presets: List[str] = field(default_factory=list)  # presets applied, in order (for the record)

    # --- data -------------------------------------------------------------------------------
    data: str = "lfw100"            # lfw100 | image folder | .zip of images | CIFAR-10 pickle dir
    data_kind: str = ""             # resolved from `data`: lfw100 | folder | zip | cifar10
    res: int = 32                   # images are resized / centre-cropped to res x res
    data_ratio: float = 1.0         # deterministic subset of the training set (0.1 = 10%)
    subset_seed: int = 0            # seed of the subset (fixed, so 10% is always the same 10%)
    xflip: bool = False             # random horizontal flips of real images

    # --- schedule ---------------------------------------------------------------------------
    batch: int = 64                 # images per D step and per G step
    kimg: float = 500.0             # budget: thousands of real images shown to D
    eval_kimg: float = 25.0         # evaluate (FID, AR decision, samples) every this many kimg
    ckpt_kimg: float = 0.0          # extra checkpoints every this many kimg (0: at evaluations only)
    eval_at_start: bool = True      # evaluate the untrained generator first (step 0)
    log_every: int = 10             # write losses to stats.jsonl every N iterations
    flops_every: int = 20           # re-count active/executed FLOPs every N iterations

    # --- metric -----------------------------------------------------------------------------
    metric: str = "fid"             # fid (Inception, clean-fid) | proxy (NOT a FID, labelled so)
    fid_samples: int = 5000         # generated images per evaluation
    final_fid_samples: int = 0      # generated images for the last evaluation (0: fid_samples)
    fid_ref: str = "auto"           # reference split: auto (test if the set has one) | train | test
    fid_batch: int = 50             # generator / Inception batch while evaluating
    kid: bool = True                # also compute KID from the same features
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    inception_download: bool = True  # may try (briefly) to fetch clean-fid's own Inception copy

    # --- networks ---------------------------------------------------------------------------
    z_dim: int = 128
    g_ch: int = 256                 # SNGAN generator width
    d_ch: int = 128                 # SNGAN discriminator width

    # --- optimisation -----------------------------------------------------------------------
    loss: str = "hinge"
    n_critic: int = 5               # D steps per G step
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.0
    beta2: float = 0.9
    ema_beta: float = 0.999         # G_ema <- beta * G_ema + (1 - beta) * G after every G step
    ema_warmup: bool = True         # beta_t = min(ema_beta, (1 + t) / (10 + t)) at G step t, so that
                                    # G_ema follows G early on (0.999 alone averages ~1000 steps)
    diffaug: str = ""               # DiffAugment policy, e.g. "color,translation,cutout"

    # --- RG-GAN (DESIGN.md §1) ---------------------------------------------------------------
    rg: bool = True                 # False: the dense baseline, everything else identical
    lam: float = 5e-12              # sparsity regulariser lambda (paper: 5e-12)
    prune: str = "GD"               # which nets are pruned (dynamic pruning): G, D, GD or none
    regen: str = "GD"               # recurrent regeneration (long-tailed STE) for these nets
    aug_regen: str = "GD"           # augmented regeneration (FID-driven dense phases) for these
    grad_mode: str = "dst"          # weight gradient of the masked op (DESIGN.md §2)
    execution: str = "masked_weight"  # how pruned layers run (rgkernels.sparse_exec): masked_weight (all
                                    # masks of a net in one grouped launch, then cuBLAS / cuDNN / CPU BLAS),
                                    # fused (Triton GEMMs with the mask inside, GPU) or auto (timed per layer)
    ar_weights: Tuple[float, ...] = (0.1, 0.1, 0.2, 0.2, 0.4)  # oldest .. newest FID

    # --- runtime ----------------------------------------------------------------------------
    seed: int = 0
    outdir: str = "runs"
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    threads: int = 0                # CPU threads for torch (0: torch's default)
    cache_dir: str = ""             # FID reference statistics ("" : $RGGAN_CACHE or ~/.cache/rggan_fast)
    grid: int = 64                  # images in each sample grid
    progress: bool = True           # progress bar
    tensorboard: bool = True

    # ----------------------------------------------------------------------------------------
    def nets(self, which: str) -> Tuple[str, ...]:
        """'GD' -> ('G', 'D') for the prune / regen / aug_regen switches (respects rg=False)."""
        if not self.rg:
            return ()
        val = getattr(self, which)
        return tuple(n for n in NETS if n in (val or "").upper())

    def validate(self) -> "TrainConfig":
        errors = []
        for name in ("prune", "regen", "aug_regen"):
            v = (getattr(self, name) or "").upper()
            if v not in ("", "NONE") and not set(v) <= set("GD"):
                errors.append(f"{name} must be G, D, GD or none, got {getattr(self, name)!r}")
        if not 0.0 < self.data_ratio <= 1.0:
            errors.append(f"data_ratio must be in (0, 1], got {self.data_ratio}")
        if self.res < 16 or self.res & (self.res - 1):
            errors.append(f"res must be a power of two >= 16, got {self.res}")
        if self.batch < 1 or self.n_critic < 1:
            errors.append("batch and n_critic must be positive")
        if self.kimg <= 0 or self.eval_kimg <= 0:
            errors.append("kimg and eval_kimg must be positive")
        if self.execution not in ("masked_weight", "fused", "auto"):
            errors.append(f"execution must be masked_weight, fused or auto, got {self.execution!r}")
        if self.metric not in ("fid", "proxy"):
            errors.append(f"metric must be fid or proxy, got {self.metric!r}")
        if len(self.ar_weights) < 1:
            errors.append("ar_weights must not be empty")
        if self.fid_samples < 2:
            errors.append("fid_samples must be at least 2")
        if errors:
            raise ValueError("invalid configuration:\n  " + "\n  ".join(errors))
        return self

    # --- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ar_weights"] = list(self.ar_weights)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown configuration keys: {', '.join(unknown)}")
        d = dict(d)
        if "ar_weights" in d:
            d["ar_weights"] = tuple(float(w) for w in d["ar_weights"])
        return cls(**d)

    def updated(self, **changes: Any) -> "TrainConfig":
        return self.from_dict({**self.to_dict(), **changes})

    def save(self, path: str) -> None:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "TrainConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))


def parse_value(cfg: TrainConfig, key: str, text: str) -> Any:
    """Convert a `--set key=value` string to the type of the field `key`."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    if key not in fields:
        raise ValueError(f"--set: unknown configuration key {key!r}")
    current = getattr(cfg, key)
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--set {key}: expected a boolean, got {text!r}")
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, tuple):
        return tuple(float(v) for v in text.split(","))
    if isinstance(current, list):
        return [v for v in text.split(",") if v]
    return text


def resolve_config(arch: str, data: Optional[str], preset: Optional[str],
                   overrides: Dict[str, Any]) -> TrainConfig:
    """Base preset -> data preset -> named preset -> overrides (see the module docstring)."""
    from . import presets
    from .data import detect_kind

    if arch not in presets.ARCH_PRESETS:
        raise KeyError(arch)
    cfg = TrainConfig(arch=arch)
    applied = [arch]
    cfg = cfg.updated(**presets.ARCH_PRESETS[arch])
    named = presets.NAMED_PRESETS.get(preset, {}) if preset else {}
    if preset and preset not in presets.NAMED_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(sorted(presets.NAMED_PRESETS))}")
    data = data or overrides.get("data") or named.get("data") or cfg.data
    kind = detect_kind(data)
    key = (arch, presets.data_family(kind))
    if key in presets.DATA_PRESETS:
        cfg = cfg.updated(**presets.DATA_PRESETS[key])
        applied.append(f"{arch}-{key[1]}")
    if named:
        cfg = cfg.updated(**named)
        applied.append(preset)
    cfg = cfg.updated(**{k: v for k, v in overrides.items() if v is not None})
    cfg = cfg.updated(data=data, data_kind=kind, presets=applied)
    return cfg.validate()
