"""Train a GAN with RG-GAN's dynamic regenerative pruning.

    python -m rggan_fast.train sngan                          # RG-SNGAN on lfw100 (the default data)
    python -m rggan_fast.train sngan --data ~/cifar-10-batches-py --data-ratio 0.1
    python -m rggan_fast.train sngan --no-rg                  # the dense baseline, all else identical
    python -m rggan_fast.train sngan --prune D --aug-regen none   # ablation (paper Fig. 5)
    python -m rggan_fast.train sngan --preset demo            # the built-in CPU demo (about 6 minutes)
    python -m rggan_fast.train sngan --resume runs/00003-sngan-lfw100-rg

Defaults come from rggan_fast/presets.py (per architecture and data set); options given here
override them; the resolved configuration is saved as config.json in the run directory.
Exit codes: 0 done, 1 error (data, metric, configuration, checkpoint, run directory busy), 2 usage /
not implemented, 130 interrupted (continue with --resume; stopped before the first checkpoint, the
resume starts the run from the beginning with its saved configuration).
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
from typing import Dict, List, Optional, Tuple  # noqa: E402

from . import presets  # noqa: E402
from .config import EXECUTIONS, METRICS, TrainConfig, absolute_data_path, parse_value, resolve_config  # noqa: E402
from .training import rundir  # noqa: E402  (no torch import)

# Options that may change when a run is resumed (they do not change what is being trained).
RESUME_OVERRIDABLE = {"kimg", "progress", "device", "threads", "tensorboard", "cache_dir", "final_fid_samples"}


def _ratio(text: str) -> float:
    """--data-ratio: a fraction in (0, 1] (0.1) or a percentage with a % sign (10%). A bare number
    above 1 is refused rather than guessed to be a percentage."""
    t = text.strip()
    pct = t.endswith("%")
    try:
        v = float(t[:-1] if pct else t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.1 or a percentage such as 10%, "
                                         f"got {text!r}") from None
    if pct:
        if not 0 < v <= 100:
            raise argparse.ArgumentTypeError(f"a percentage must be in (0%, 100%], got {text!r}")
        return v / 100
    if not 0 < v <= 1:
        hint = f" (for {v:g} percent write {v:g}%)" if 1 < v <= 100 else ""
        raise argparse.ArgumentTypeError(f"a fraction must be in (0, 1], got {text!r}{hint}")
    return v


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
    a("--metric", choices=METRICS, help="fid (Inception) or proxy (no Inception needed; NOT a FID)")
    a("--seed", type=int, help="random seed")
    a("--outdir", help="parent directory of run directories")
    a("--name", help="run directory name inside --outdir, no path separators "
                     "(default: <index>-<arch>-<data>-<rg|dense>)")
    a("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR exactly where it stopped")
    a("--diffaug", metavar="POLICY", help="DiffAugment policy, e.g. color,translation,cutout (none: off)")
    a("--data-ratio", type=_ratio, help="deterministic subset of the training set: a fraction in (0, 1] "
                                        "or a percentage with %%: 0.1 and 10%% are the same (2 is an error)")
    a("--lambda", dest="lam", type=float, help="sparsity regulariser lambda")
    a("--no-rg", dest="rg", action="store_false", default=None, help="dense baseline (no pruning at all)")
    a("--prune", choices=["G", "D", "GD", "none"], help="nets with dynamic pruning (default GD)")
    a("--regen", choices=["G", "D", "GD", "none"], help="nets with recurrent regeneration (default GD)")
    a("--aug-regen", choices=["G", "D", "GD", "none"], help="nets with augmented regeneration (default GD)")
    a("--execution", choices=EXECUTIONS,
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


class UsageError(Exception):
    """Options that contradict each other or the run directory (exit code 2)."""


def run_dir_suffix(cfg: TrainConfig) -> str:
    """<arch>-<data>[-r<ratio>]-<rg|dense>[-<preset>]: the name of a new run after its index."""
    data = "lfw100" if cfg.data_kind == "lfw100" else os.path.splitext(os.path.basename(os.path.normpath(cfg.data)))[0]
    data = re.sub(r"[^A-Za-z0-9_.-]+", "_", data) or "data"
    tag = "rg" if cfg.rg else "dense"
    ratio = f"-r{cfg.data_ratio:g}" if cfg.data_ratio < 1 else ""
    preset = f"-{cfg.presets[-1]}" if len(cfg.presets) > 2 or (cfg.presets and cfg.presets[-1] in presets.NAMED_PRESETS) else ""
    return f"{cfg.arch}-{data}{ratio}-{tag}{preset}"


def check_name(name: Optional[str], resume: Optional[str]) -> None:
    if name is None:
        return
    if resume:
        raise UsageError("--name names a new run; --resume continues the run in its directory (give one of them)")
    seps = {"/", os.sep, os.altsep} - {None}
    if not name or any(c in name for c in seps) or name in (".", ".."):
        raise UsageError(f"--name {name!r}: a directory name inside --outdir, without path separators "
                         "(put the parent directory in --outdir)")


def resume_config(args: argparse.Namespace, arch: str, overrides: Dict) -> TrainConfig:
    """The saved configuration of --resume RUN_DIR with the options that may change (checked, not saved:
    the run saves it once its checkpoint has loaded)."""
    run_dir = args.resume
    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise UsageError(f"{run_dir} is not a run directory (no config.json)")
    cfg = TrainConfig.load(cfg_path)
    if cfg.arch != arch:
        raise UsageError(f"{run_dir} is a {cfg.arch} run, not {arch}")
    overrides = dict(overrides)
    if "data" in overrides and absolute_data_path(overrides["data"]) == absolute_data_path(cfg.data):
        del overrides["data"]  # the same data set, named by another (relative / absolute) path
    changed = {k: v for k, v in overrides.items() if getattr(cfg, k) != v}
    bad = sorted(set(changed) - RESUME_OVERRIDABLE)
    if bad or args.preset:
        raise UsageError(f"cannot change {', '.join(bad) or '--preset'} when resuming "
                         f"(allowed: {', '.join(sorted(RESUME_OVERRIDABLE))})")
    return cfg.updated(**changed).validate()


def claim_new_run(cfg: TrainConfig, name: Optional[str]) -> Tuple[str, bool, rundir.RunLock]:
    """Create (claim) and lock the directory of a new run and write its config.json, before any data
    is loaded: from here on no other process can take it. Returns (run_dir, created, lock)."""
    if name:
        run_dir, created = rundir.claim_named(cfg.outdir, name)
    else:
        run_dir, created = rundir.claim_indexed(cfg.outdir, run_dir_suffix(cfg)), True
    lock = rundir.RunLock(run_dir).acquire()
    if os.path.exists(os.path.join(run_dir, "config.json")):
        lock.release()
        raise UsageError(f"{run_dir} already holds a run; use --resume {run_dir} or another --name")
    try:
        cfg.save(os.path.join(run_dir, "config.json"))
    except OSError as e:
        lock.release()
        rundir.discard_unstarted(run_dir, created)
        raise rundir.RunDirError(f"{run_dir}: cannot write config.json ({e.strerror})") from None
    return run_dir, created, lock


def _install_signals(flag):
    """SIGINT / SIGTERM: finish the iteration, write the checkpoint, exit 130. Returns the old handlers."""
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        if flag.requested:  # second signal: stop now
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        flag.requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after this iteration (or once the run is set up) and "
              "writing the checkpoint (press Ctrl-C again to abort at once)", file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return old


def format_summary(s: Dict) -> str:
    name = s["score_name"]
    label = name.upper().replace("_", " ") if not name.startswith("proxy") else f"{name} (proxy, NOT a FID)"

    def f(v):
        return "n/a" if v is None else f"{v:.2f}"

    def scored(key):  # each value with the number of generated images it was measured with
        return f"{f(s[key])} ({s[key + '_samples']} samples)" if s[key] is not None else "n/a"

    lines = [
        "",
        "=" * 72,
        f"done: {s['steps']} iterations, {s['real_images']} real images shown to D, "
        f"{s['time_s']:.0f} s ({s['train_time_s']:.0f} s training, {s['eval_time_s']:.0f} s evaluation)",
        f"{label}: {scored('first')} at the start -> {scored('last')} at the end; best during training "
        f"{scored('best')}; vs {s['fid_ref_images']} reference images",
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

    from .build import resolve_device
    from .data import DataError
    from .metrics import InceptionUnavailable
    from .training.loop import StopFlag, TrainingInterrupted, TrainingRun, stopped_message

    old_handlers, lock, run_dir = {}, None, None
    try:
        check_name(args.name, args.resume)
        overrides = overrides_from_args(args)
        if args.resume:
            cfg = resume_config(args, arch, overrides)
        else:
            cfg = resolve_config(arch, overrides.get("data"), args.preset, overrides)
        if args.dry_run:
            print(json.dumps(cfg.to_dict(), indent=2))
            return 0
        resolve_device(cfg.device)  # a missing GPU is reported before a run directory exists
        flag = StopFlag()
        old_handlers = _install_signals(flag)
        created = False
        if args.resume:
            run_dir = args.resume
            lock = rundir.RunLock(run_dir).acquire()
        else:
            run_dir, created, lock = claim_new_run(cfg, args.name)
        print(f"{'resuming' if args.resume else 'training'} {arch} ({'RG: prune ' + ''.join(cfg.nets('prune')) if cfg.rg else 'dense baseline'}) "
              f"on {cfg.data} at {cfg.res}x{cfg.res}, {cfg.kimg:g} kimg -> {run_dir}", flush=True)
        try:
            run = TrainingRun(cfg, run_dir, resume=bool(args.resume), stop_flag=flag)
        except Exception as e:
            # a new run that cannot start (data, metric, ...) leaves nothing behind; a stop does (it
            # can be resumed)
            if not args.resume and not isinstance(e, TrainingInterrupted):
                lock.release()
                rundir.discard_unstarted(run_dir, created)
            raise
        print(f"data: {len(run.data.train)} training images; FID reference: {len(run.data.reference)} "
              f"{run.data.ref_split} images; metric network: {run.evaluator.label}; device: {run.device}", flush=True)
        summary = run.train()
        print(format_summary(summary), flush=True)
        return 0
    except TrainingInterrupted as e:
        print(f"\n{e}", file=sys.stderr)
        return 130
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (DataError, InceptionUnavailable, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a file of the run or the data that cannot be read or written: name it
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\naborted; {stopped_message(run_dir)}" if run_dir else "\naborted", file=sys.stderr)
        return 130
    finally:
        if lock is not None:
            lock.release()
        for s, h in old_handlers.items():
            signal.signal(s, h)


if __name__ == "__main__":
    sys.exit(main())
