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
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

NETS = ("G", "D")
DATA_KINDS = ("lfw100", "folder", "zip", "cifar10")
FID_REFS = ("auto", "train", "test")
METRICS = ("fid", "proxy")
EXECUTIONS = ("masked_weight", "fused", "auto")  # rgkernels.sparse_exec.EXECUTION_MODES (no torch import here)
NET_SWITCHES = ("G", "D", "GD", "DG", "NONE", "")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
SEED_RANGE = (-2 ** 63, 2 ** 64 - 1)  # what torch.manual_seed accepts (subset_seed is used as it is)
# The run's seed is also used as seed * 1_000_003 + epoch (the data stream's epochs) and seed + 2: it
# must leave those within 64 bits, with room for 2**20 epochs.
SEED_MAX = (2 ** 63 - 1 - 2 ** 20) // 1_000_003
# Fields the configuration resolves itself, never set by hand (--set would be overwritten silently).
DERIVED_FIELDS = ("data_kind", "presets")


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
    ema_warmup: bool = True         # beta_t = min(ema_beta, (1 + t) / (ema_warmup_steps + t)) at G step
    ema_warmup_steps: float = 10.0  # t, so that G_ema follows G early on (0.999 alone averages ~1000
                                    # steps); with 10, beta_t passes 0.5 at t = 8 and 0.9 at t = 81
    diffaug: str = ""               # DiffAugment policy, e.g. "color,translation,cutout"
    diffaug_translation: float = 0.125  # translation: shift by up to this fraction of the size
    diffaug_cutout: float = 0.5     # cutout: a square of this fraction of the size (DiffAugment's values)

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
        """Check every field (types first, then enums, ranges and finiteness); raises ValueError listing
        all problems. Called before a run directory is created, and on every config.json read back."""
        errors = self._type_errors()
        if not errors:
            errors = self._value_errors()
        if errors:
            raise ValueError("invalid configuration:\n  " + "\n  ".join(errors))
        return self

    def _type_errors(self) -> List[str]:
        errors = []
        for f in dataclasses.fields(self):
            want, v = _field_type(f), getattr(self, f.name)
            if not _has_type(v, want):
                errors.append(f"{f.name} must be {_TYPE_NAMES[want]}, got {v!r}")
        return errors

    def _value_errors(self) -> List[str]:
        from . import presets

        e: List[str] = []

        def need(cond: bool, msg: str) -> None:
            if not cond:
                e.append(msg)

        def one_of(name: str, choices, value=None) -> None:
            value = getattr(self, name) if value is None else value
            need(value in choices,
                 f"{name} must be one of {', '.join(c for c in choices if c)}, got {getattr(self, name)!r}")

        def number(name: str, lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False) -> None:
            v = getattr(self, name)
            inside = math.isfinite(v) and (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)
            if hi == math.inf:
                where = f"> {lo:g}" if lo_open else f">= {lo:g}"
            else:
                where = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
            need(inside, f"{name} must be {'an integer' if isinstance(v, int) else 'a finite number'} {where}, "
                         f"got {v!r}")

        # what to train, data
        one_of("arch", tuple(presets.ARCH_PRESETS))
        need(bool(self.data), "data must not be empty")
        one_of("data_kind", DATA_KINDS)
        need(self.res >= 16 and not self.res & (self.res - 1), f"res must be a power of two >= 16, got {self.res}")
        number("data_ratio", 0, 1, lo_open=True)
        # schedule
        for name in ("batch", "n_critic", "log_every", "flops_every"):
            number(name, 1)
        number("kimg", 0, lo_open=True)
        number("eval_kimg", 0, lo_open=True)
        number("ckpt_kimg", 0)
        # metric
        one_of("metric", METRICS)
        one_of("fid_ref", FID_REFS)
        need(self.fid_samples >= 2, f"fid_samples must be at least 2 (a covariance needs two samples), "
                                    f"got {self.fid_samples}")
        need(self.final_fid_samples == 0 or self.final_fid_samples >= 2,
             f"final_fid_samples must be 0 (same as fid_samples) or at least 2, got {self.final_fid_samples}")
        for name in ("fid_batch", "kid_subsets"):
            number(name, 1)
        number("kid_subset_size", 2)
        # networks and optimisation
        for name in ("z_dim", "g_ch", "d_ch"):
            number(name, 1)
        from .training.loss import LOSSES

        one_of("loss", tuple(LOSSES))
        for name in ("lr_g", "lr_d"):
            number(name, 0, lo_open=True)
        for name in ("beta1", "beta2"):
            number(name, 0, 1, hi_open=True)
        number("ema_beta", 0, 1)
        number("ema_warmup_steps", 1)
        self._diffaug_errors(e)
        number("diffaug_translation", 0, 1)
        number("diffaug_cutout", 0, 1)
        # RG-GAN
        number("lam", 0)
        for name in ("prune", "regen", "aug_regen"):
            one_of(name, NET_SWITCHES, getattr(self, name).upper())
        from rgkernels.ops.reference import GRAD_MODES

        one_of("grad_mode", tuple(GRAD_MODES))
        one_of("execution", EXECUTIONS)
        need(len(self.ar_weights) >= 1 and all(math.isfinite(w) for w in self.ar_weights),
             f"ar_weights must be one or more finite numbers, got {list(self.ar_weights)}")
        # runtime
        need(-SEED_MAX <= self.seed <= SEED_MAX,
             f"seed must be an integer in [-{SEED_MAX}, {SEED_MAX}] (the data stream seeds epoch e with "
             f"seed * 1000003 + e, in 64 bits), got {self.seed}")
        need(SEED_RANGE[0] <= self.subset_seed <= SEED_RANGE[1], "subset_seed must fit in 64 bits")
        need(bool(self.outdir), "outdir must not be empty")
        need(bool(DEVICE_PATTERN.match(self.device)), f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        number("threads", 0)
        number("grid", 1)
        return e

    def _diffaug_errors(self, errors: List[str]) -> None:
        from .training.augment import parse_policy

        try:
            parse_policy(self.diffaug)
        except ValueError as exc:
            errors.append(f"diffaug: {exc}")

    # --- (de)serialisation ------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ar_weights"] = list(self.ar_weights)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        """Fields from a dict (config.json, presets, options). Unknown keys are an error; an int where a
        float is expected becomes a float; other type errors are reported by validate()."""
        if not isinstance(d, dict):
            raise ValueError(f"expected an object of configuration fields, got {type(d).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"unknown configuration keys: {', '.join(unknown)}")
        d = dict(d)
        for k, v in d.items():
            if _field_type(known[k]) is float and _has_type(v, int):
                d[k] = float(v)
        if isinstance(d.get("ar_weights"), (list, tuple)):
            d["ar_weights"] = tuple(float(w) if _has_type(w, int) else w for w in d["ar_weights"])
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
        """Read and check a config.json; every problem is a ValueError that names the file."""
        try:
            with open(path) as f:
                d = json.load(f)
        except OSError as e:
            raise ValueError(f"{path}: cannot read the configuration ({e.strerror or e})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e}); the file is damaged") from None
        try:
            return cls.from_dict(d).validate()
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               list: "a list of strings", tuple: "a list of numbers"}


def _field_type(f: dataclasses.Field) -> type:
    """The type of a field's default value (the annotations are strings under `from __future__`)."""
    return type(f.default_factory() if f.default is dataclasses.MISSING else f.default)


def _has_type(v: Any, want: type) -> bool:
    """isinstance with JSON's view of numbers: bools are not numbers, ints are floats."""
    if want is bool:
        return isinstance(v, bool)
    if want is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if want is float:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if want is list:
        return isinstance(v, list) and all(isinstance(x, str) for x in v)
    if want is tuple:
        return isinstance(v, tuple) and all(_has_type(x, float) for x in v)
    return isinstance(v, want)


def parse_value(cfg: TrainConfig, key: str, text: str) -> Any:
    """Convert a `--set key=value` string to the type of the field `key`."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    if key not in fields:
        raise ValueError(f"--set: unknown configuration key {key!r}")
    if key in DERIVED_FIELDS:
        raise ValueError(f"--set {key}: resolved by the configuration itself (data_kind from --data, presets "
                         "from the architecture, data set and --preset), not set by hand")
    want = _field_type(fields[key])
    try:
        if want is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if want in (int, float):
            return want(text)
        if want is tuple:
            return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--set {key}: expected {_TYPE_NAMES[want]}, got {text!r}") from None
    if want is list:
        return [v for v in text.split(",") if v]
    return text


def absolute_data_path(data: str) -> str:
    """The built-in set's name as it is; a path made absolute, so that a run can be resumed from any
    working directory (config.json keeps this form)."""
    return data if data == "lfw100" else os.path.abspath(os.path.expanduser(data))


def resolve_config(arch: str, data: Optional[str], preset: Optional[str],
                   overrides: Dict[str, Any]) -> TrainConfig:
    """Base preset -> data preset -> named preset -> overrides (see the module docstring)."""
    from . import presets
    from .data import DataError, detect_kind, not_a_data_set

    if arch not in presets.ARCH_PRESETS:
        raise KeyError(arch)
    cfg = TrainConfig(arch=arch)
    applied = [arch]
    cfg = cfg.updated(**presets.ARCH_PRESETS[arch])
    named = presets.NAMED_PRESETS.get(preset, {}) if preset else {}
    if preset and preset not in presets.NAMED_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(sorted(presets.NAMED_PRESETS))}")
    data = absolute_data_path(data or overrides.get("data") or named.get("data") or cfg.data)
    why = not_a_data_set(data)
    if why:  # before a run directory exists
        raise DataError(why)
    kind = detect_kind(data)
    key = (arch, presets.data_family(kind))
    if key in presets.DATA_PRESETS:
        cfg = cfg.updated(**presets.DATA_PRESETS[key])
        applied.append(f"{arch}-{key[1]}")
    if named:
        cfg = cfg.updated(**named)
        applied.append(preset)
    cfg = cfg.updated(**{k: v for k, v in overrides.items() if v is not None and k != "data"})
    cfg = cfg.updated(data=data, data_kind=kind, presets=applied)
    return cfg.validate()
