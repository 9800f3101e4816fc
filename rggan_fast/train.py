"""Train a GAN with RG-GAN's dynamic regenerative pruning.

    python -m rggan_fast.train sngan                          # RG-SNGAN on lfw100 (the default data)
    python -m rggan_fast.train sngan --data ~/cifar-10-batches-py --data-ratio 0.1
    python -m rggan_fast.train sngan --no-rg                  # the dense baseline, all else identical
    python -m rggan_fast.train sngan --prune D --aug-regen none   # ablation (paper Fig. 5)
    python -m rggan_fast.train sngan --preset demo            # the built-in ~10 minute CPU demo
    python -m rggan_fast.train sngan --resume runs/00003-sngan-lfw100-rg

Defaults come from rggan_fast/presets.py (per architecture and data set); options given here
override them; the resolved configuration is saved as config.json in the run directory.
Exit codes: 0 done, 1 error (data, metric, configuration), 2 usage / not implemented,
130 interrupted (checkpoint written; continue with --resume).
"""
from __future__ import annotations

import os

# Before torch is imported: OpenMP threads that spin while waiting slow CPU training several-fold
# as soon as anything else runs on the machine (measured: 1.2 s vs 2.8-4.6 s per iteration on a
# busy 2-core box); passive waiting costs little on an idle one. An explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from typing import Dict, List, Optional  # noqa: E402

from . import presets  # noqa: E402
from .config import TrainConfig, parse_value, resolve_config  # noqa: E402

# Options that may change when a run is resumed (they do not change what is being trained).
RESUME_OVERRIDABLE = {"kimg", "progress", "device", "threads", "tensorboard", "cache_dir", "final_fid_samples"}


def _ratio(text: str) -> float:
    v = float(text.rstrip("%"))
    return v / 100 if text.endswith("%") or v > 1 else v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rggan_fast.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any other configuration field: --set key=value (see rggan_fast/config.py).")
    p.add_argument("arch", help=f"architecture: {', '.join(presets.KNOWN_ARCHS)} "
                                f"(implemented: {', '.join(presets.IMPLEMENTED_ARCHS)})")
    a = p.add_argument
    a("--preset", help=f"named preset: {', '.join(presets.NAMED_PRESETS)}")
    a("--data", help="lfw100 (default), a folder or .zip of images, or a CIFAR-10 python-pickle directory")
    a("--res", type=int, help="image resolution (power of two)")
    a("--batch", type=int, help="batch size (D and G steps)")
    a("--kimg", type=float, help="budget: thousands of real images shown to D")
    a("--eval-kimg", type=float, help="evaluate FID / run the AR rule every this many kimg")
    a("--ckpt-kimg", type=float, help="extra checkpoints every this many kimg (default: at evaluations)")
    a("--fid-samples", type=int, help="generated images per FID evaluation")
    a("--final-fid-samples", type=int, help="generated images for the last evaluation")
    a("--metric", choices=["fid", "proxy"], help="fid (Inception) or proxy (no Inception needed; NOT a FID)")
    a("--seed", type=int, help="random seed")
    a("--outdir", help="parent directory of run directories")
    a("--name", help="run directory name (default: <index>-<arch>-<data>-<rg|dense>)")
    a("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR exactly where it stopped")
    a("--diffaug", metavar="POLICY", help="DiffAugment policy, e.g. color,translation,cutout (none: off)")
    a("--data-ratio", type=_ratio, help="deterministic subset of the training set: 0.1, 10%%, ...")
    a("--lambda", dest="lam", type=float, help="sparsity regulariser lambda")
    a("--no-rg", dest="rg", action="store_false", default=None, help="dense baseline (no pruning at all)")
    a("--prune", choices=["G", "D", "GD", "none"], help="nets with dynamic pruning (default GD)")
    a("--regen", choices=["G", "D", "GD", "none"], help="nets with recurrent regeneration (default GD)")
    a("--aug-regen", choices=["G", "D", "GD", "none"], help="nets with augmented regeneration (default GD)")
    a("--execution", choices=["masked_weight", "fused", "auto"],
      help="how pruned layers run: masked_weight (default), fused (Triton, GPU) or auto (timed per layer)")
    a("--device", help="auto, cpu, cuda, cuda:N")
    a("--threads", type=int, help="CPU threads for torch")
    a("--cache-dir", help="where FID reference statistics are cached")
    a("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    a("--set", action="append", default=[], metavar="KEY=VALUE", help="any configuration field")
    a("--dry-run", action="store_true", help="print the resolved configuration and exit")
    return p


OPTION_FIELDS = ["data", "res", "batch", "kimg", "eval_kimg", "ckpt_kimg", "fid_samples", "final_fid_samples",
                 "metric", "seed", "outdir", "diffaug", "data_ratio", "lam", "rg", "prune", "regen", "aug_regen",
                 "execution", "device", "threads", "cache_dir", "progress"]


def overrides_from_args(args: argparse.Namespace) -> Dict:
    out = {k: getattr(args, k) for k in OPTION_FIELDS if getattr(args, k, None) is not None}
    if out.get("diffaug", "").lower() == "none":
        out["diffaug"] = ""
    base = TrainConfig()
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = parse_value(base, k.strip(), v.strip())
    return out


def next_run_dir(cfg: TrainConfig, name: Optional[str]) -> str:
    os.makedirs(cfg.outdir, exist_ok=True)
    if name:
        return os.path.join(cfg.outdir, name)
    ids = [int(m.group(1)) for d in os.listdir(cfg.outdir) if (m := re.match(r"^(\d+)-", d))]
    data = "lfw100" if cfg.data_kind == "lfw100" else os.path.splitext(os.path.basename(os.path.normpath(cfg.data)))[0]
    data = re.sub(r"[^A-Za-z0-9_.-]+", "_", data) or "data"
    tag = "rg" if cfg.rg else "dense"
    ratio = f"-r{cfg.data_ratio:g}" if cfg.data_ratio < 1 else ""
    preset = f"-{cfg.presets[-1]}" if len(cfg.presets) > 2 or (cfg.presets and cfg.presets[-1] in presets.NAMED_PRESETS) else ""
    return os.path.join(cfg.outdir, f"{max(ids, default=-1) + 1:05d}-{cfg.arch}-{data}{ratio}-{tag}{preset}")


def _install_signals(flag):
    """SIGINT / SIGTERM: finish the iteration, write the checkpoint, exit 130. Returns the old handlers."""
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        if flag.requested:  # second signal: stop now
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        flag.requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after this iteration and writing the checkpoint "
              "(press Ctrl-C again to abort at once)", file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return old


def format_summary(s: Dict) -> str:
    name = s["score_name"]
    label = name.upper().replace("_", " ") if not name.startswith("proxy") else f"{name} (proxy, NOT a FID)"

    def f(v):
        return "n/a" if v is None else f"{v:.2f}"

    lines = [
        "",
        "=" * 72,
        f"done: {s['steps']} iterations, {s['real_images']} real images shown to D, "
        f"{s['time_s']:.0f} s ({s['train_time_s']:.0f} s training, {s['eval_time_s']:.0f} s evaluation)",
        f"{label}: {f(s['first'])} at the start -> {f(s['last'])} at the end (best {f(s['best'])}); "
        f"{s['fid_samples']} generated vs {s['fid_ref_images']} reference images",
        f"  network: {s['metric']}",
        f"keep ratio: G {s['keep_ratio_G']:.3f}, D {s['keep_ratio_D']:.3f}; mode at the end: {s['mode']} "
        f"({s['mode_switches']} AR mode switches)",
        f"training FLOPs (G+D): dense {s['flops_dense']:.3e}, active {s['flops_active']:.3e} "
        f"({s['flops_active'] / max(s['flops_dense'], 1):.1%} of dense), executed {s['flops_executed']:.3e}",
        f"outputs: {s['run_dir']}/ (metrics.jsonl, stats.jsonl, samples-*.png, checkpoint.pt, config.json, "
        f"summary.json, TensorBoard events{', metrics.png' if s.get('plot') else ''})",
        "=" * 72,
    ]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    arch = args.arch.lower()
    if arch not in presets.KNOWN_ARCHS:
        print(f"error: unknown architecture {args.arch!r}; choose one of {', '.join(presets.KNOWN_ARCHS)}",
              file=sys.stderr)
        return 2
    if arch not in presets.IMPLEMENTED_ARCHS:
        print(f"error: {arch} is not implemented yet (implemented: {', '.join(presets.IMPLEMENTED_ARCHS)}). "
              f"Try: python -m rggan_fast.train sngan", file=sys.stderr)
        return 2

    from .data import DataError
    from .metrics import InceptionUnavailable
    from .training.loop import StopFlag, TrainingInterrupted, TrainingRun

    old_handlers = {}
    try:
        overrides = overrides_from_args(args)
        if args.resume:
            run_dir = args.resume
            cfg_path = os.path.join(run_dir, "config.json")
            if not os.path.isfile(cfg_path):
                print(f"error: {run_dir} is not a run directory (no config.json)", file=sys.stderr)
                return 2
            cfg = TrainConfig.load(cfg_path)
            if cfg.arch != arch:
                print(f"error: {run_dir} is a {cfg.arch} run, not {arch}", file=sys.stderr)
                return 2
            changed = {k: v for k, v in overrides.items() if getattr(cfg, k) != v}
            bad = sorted(set(changed) - RESUME_OVERRIDABLE)
            if bad or args.preset:
                print(f"error: cannot change {', '.join(bad) or '--preset'} when resuming "
                      f"(allowed: {', '.join(sorted(RESUME_OVERRIDABLE))})", file=sys.stderr)
                return 2
            cfg = cfg.updated(**changed).validate()
            if changed:
                cfg.save(cfg_path)
        else:
            cfg = resolve_config(arch, overrides.get("data"), args.preset, overrides)
            run_dir = next_run_dir(cfg, args.name)
        if args.dry_run:
            print(json.dumps(cfg.to_dict(), indent=2))
            return 0
        if not args.resume and os.path.exists(os.path.join(run_dir, "config.json")):
            print(f"error: {run_dir} already holds a run; use --resume {run_dir} or another --name", file=sys.stderr)
            return 2

        flag = StopFlag()
        old_handlers = _install_signals(flag)
        print(f"{'resuming' if args.resume else 'training'} {arch} ({'RG: prune ' + ''.join(cfg.nets('prune')) if cfg.rg else 'dense baseline'}) "
              f"on {cfg.data} at {cfg.res}x{cfg.res}, {cfg.kimg:g} kimg -> {run_dir}", flush=True)
        run = TrainingRun(cfg, run_dir, resume=bool(args.resume), stop_flag=flag)
        print(f"data: {len(run.data.train)} training images; FID reference: {len(run.data.reference)} "
              f"{run.data.ref_split} images; metric network: {run.evaluator.label}; device: {run.device}", flush=True)
        summary = run.train()
        print(format_summary(summary), flush=True)
        return 0
    except TrainingInterrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
    except (DataError, InceptionUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\naborted (the last checkpoint in the run directory is intact)", file=sys.stderr)
        return 130
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)


if __name__ == "__main__":
    sys.exit(main())
