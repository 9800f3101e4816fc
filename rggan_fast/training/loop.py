"""The RG-GAN training loop (SNGAN-style: n_critic D steps, then one G step).

    run = TrainingRun(cfg, run_dir)          # builds everything from the config (rggan_fast/build.py)
    summary = run.train()                    # trains until cfg.kimg thousand real images were shown

Per iteration: n_critic D steps on (augmented) reals and fakes, one G step, an EMA update of G_ema.
Every cfg.eval_kimg: the EMA generator is scored (FID, KID), the RG controller decides the mode
for the next interval (augmented regeneration), a row goes to metrics.jsonl (and TensorBoard),
a sample grid is written and the checkpoint is replaced atomically.

Run directory:
    config.json        resolved configuration (what --resume reads back)
    train.lock         present while a process trains in the directory (rggan_fast/training/rundir.py)
    metrics.jsonl      one row per evaluation (see `_evaluate` for the fields)
    stats.jsonl        losses every cfg.log_every iterations
    checkpoint.pt      everything needed to continue exactly (rggan_fast/training/checkpoint.py); it
                       records how many rows each .jsonl log had, and a resume cuts the logs back to
                       that, so rows written after the last checkpoint (a hard kill) are not doubled
    reals.png, samples-<step>.png    image grids (real images, G_ema samples at each evaluation)
    summary.json       written when the budget is reached
    G_ema.safetensors  final EMA generator weights and thresholds
    metrics.png        FID, keep ratios and FLOPs against kimg (rggan_fast/plot.py)
    events.out.tfevents.*            TensorBoard scalars (a resume purges the steps after the checkpoint)
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from .. import build
from ..config import TrainConfig
from . import checkpoint
from .accounting import FlopAccountant
from .controller import SPARSE
from .rundir import append_jsonl, count_rows, read_jsonl, truncate_jsonl

LOGS = ("metrics.jsonl", "stats.jsonl")


def stopped_message(run_dir: str) -> str:
    """What a stop leaves behind, from what is on disk: a checkpoint to continue from, or only the
    saved configuration (stopped before the first checkpoint)."""
    if checkpoint.exists(run_dir):
        return f"the checkpoint in {run_dir} is intact; continue with --resume {run_dir}"
    return (f"stopped before the first checkpoint, nothing was trained; --resume {run_dir} starts the run "
            "from the beginning with its saved configuration")


class TrainingInterrupted(Exception):
    """Raised after a requested stop (Ctrl-C, SIGTERM): with the checkpoint written when training had
    started, else before anything was trained."""

    def __init__(self, run_dir: str, step: Optional[int], checkpoint_written: bool = True):
        what = (f"interrupted at step {step}; checkpoint written" if checkpoint_written
                else "interrupted while the run was being set up")
        super().__init__(f"{what}; {stopped_message(run_dir)}")
        self.run_dir, self.step = run_dir, step


KERNEL_DECISIONS = "kernel_decisions.json"  # rgkernels.sparse_exec's decision cache, one per run


class StopFlag:
    """Set by a signal handler (see train.py); checked while the run is built and between iterations."""

    def __init__(self):
        self.requested = False


def save_grid(images: torch.Tensor, path: str) -> None:
    """images: float [N, 3, H, W] in [-1, 1] -> one PNG, as square a grid as possible."""
    from PIL import Image

    x = (images.detach().float().cpu() * 127.5 + 128).clamp(0, 255).to(torch.uint8)
    n, c, h, w = x.shape
    cols = max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / cols))
    grid = torch.zeros(c, rows * h, cols * w, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[:, r * h:(r + 1) * h, k * w:(k + 1) * w] = x[i]
    tmp = path + ".tmp.png"
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(tmp)
    os.replace(tmp, path)


def lost_checkpoint(run_dir: str) -> str:
    """Why a run directory without a usable checkpoint.pt must not start again from the beginning, or ''.
    The first checkpoint is written before the first training step, so a run that stopped before it has
    at most the initial evaluation's row: anything more means the checkpoint was there and is gone (a
    copy that skipped *.pt, a deletion), and a restart would drop the run's logs."""
    path = os.path.join(run_dir, checkpoint.CHECKPOINT)
    if os.path.lexists(path):
        return f"{path} is not a file; move it away to resume from the beginning, or put the checkpoint back"
    found = []
    n = count_rows(os.path.join(run_dir, "stats.jsonl"))
    if n:
        found.append(f"stats.jsonl has {n} row(s) of training")
    trained = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if r.get("step", 0) > 0]
    if trained:
        found.append(f"metrics.jsonl has evaluations up to step {trained[-1]['step']}")
    found += [f"{name} exists" for name in ("summary.json", "G_ema.safetensors")
              if os.path.exists(os.path.join(run_dir, name))]
    if not found:
        return ""
    return (f"{path} is missing, but the run had trained ({'; '.join(found)}): its state went with it. Put "
            f"checkpoint.pt back to resume; nothing in {run_dir} was changed")


class TrainingRun:
    def __init__(self, cfg: TrainConfig, run_dir: str, resume: bool = False, log: Callable[[str], None] = print,
                 stop_flag: Optional[StopFlag] = None):
        import rgkernels  # noqa: F401  (fail early if the kernels package is missing)

        self.cfg, self.run_dir, self.log = cfg, run_dir, log
        self.stop_flag = stop_flag or StopFlag()
        self.device = build.resolve_device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        progress = self._progress_fn()
        if not resume and checkpoint.exists(run_dir):  # never train over another run's state
            raise ValueError(f"{run_dir} already holds a run ({checkpoint.CHECKPOINT}); resume it or use "
                             "another directory")
        if resume and not checkpoint.exists(run_dir):
            lost = lost_checkpoint(run_dir)
            if lost:  # refused before anything is written: a fresh start would empty the run's logs
                raise checkpoint.CheckpointError(lost)
        # resume=True on a directory without a checkpoint (stopped before its first one): a fresh start
        self.resumed = resume and checkpoint.exists(run_dir)
        checkpoint.remove_stale_temporaries(run_dir)
        self._restarted = False  # a fresh start that found log rows of an earlier attempt
        if resume and not self.resumed:
            log(f"{run_dir} has no checkpoint (it stopped before the first one): starting the run from the "
                "beginning with its saved configuration")

        # Data and metric first: a broken data set or a missing Inception stops the run before
        # anything is trained. Both can take long (reference features): a stop asked for meanwhile
        # is honoured before going on.
        self.data = build.build_data(cfg, progress)
        self._stop_if_requested()
        self.evaluator = build.build_evaluator(cfg, self.data, self.device, log, progress)
        self._stop_if_requested()

        self.G, self.D, self.G_ema = build.build_networks(cfg, self.device)
        self.nets = {"G": self.G, "D": self.D}
        self.opts = build.build_optimizers(cfg, self.G, self.D)
        self.hooks = build.install_rg_hooks(cfg, self.nets, self.opts)
        self.loss = build.build_loss(cfg, self.G, self.D)
        self.controller = build.build_controller(cfg)
        self.stream = build.build_stream(cfg, self.data, self.device)
        self.flops = FlopAccountant()
        self.pruned = cfg.nets("prune")
        self.ar_nets = cfg.nets("aug_regen")
        self.counters = {"step": 0, "real_images": 0, "time_s": 0.0, "train_time_s": 0.0, "eval_time_s": 0.0,
                         "evaluations": 0}
        self.last_scores: Dict[str, float] = {}
        # The loop's schedule (next evaluation / checkpoint, whether the start was evaluated): from the
        # checkpoint when resuming, else set up by train().
        self._next: Optional[Dict] = None
        self._t_start = time.time()
        g = torch.Generator().manual_seed(cfg.seed + 1)
        self.grid_z = torch.randn(cfg.grid, cfg.z_dim, generator=g).to(self.device)

        if self.resumed:
            self._load()
        else:
            self._start_fresh(restart=resume)
        # Written only now: a resume whose checkpoint fails to load leaves config.json as it was.
        cfg.save(os.path.join(run_dir, "config.json"))
        # Kernel-path decisions (the CPU GEMM per layer shape, "auto" execution on a GPU) are measured
        # once and kept with the run, so that a resumed run computes on the paths the original chose.
        if not os.environ.get("RGKERNELS_EXEC_CACHE"):
            from rgkernels import sparse_exec

            sparse_exec.set_decision_cache(os.path.join(run_dir, KERNEL_DECISIONS))
        self.writer = self._tensorboard()

    # ---- helpers -------------------------------------------------------------------------------

    def _progress_fn(self):
        if not self.cfg.progress:
            return lambda it, **kw: it
        from tqdm.auto import tqdm

        return lambda it, **kw: tqdm(it, leave=False, **kw)

    def _tensorboard(self):
        if not self.cfg.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception as e:  # tensorboard not installed: metrics.jsonl still has everything
            self.log(f"TensorBoard disabled ({type(e).__name__}: {e})")
            return None
        # A resume purges what the previous process logged after its checkpoint (a hard kill), so that
        # TensorBoard shows no steps twice (its global step is real_images).
        purge = None
        if self.resumed:
            purge = self.counters["real_images"] + (1 if self._next and self._next["started"] else 0)
        elif self._restarted:
            purge = 0
        return SummaryWriter(self.run_dir, purge_step=purge)

    def _stop_if_requested(self) -> None:
        """A stop while the run is built: nothing new was trained, any checkpoint stays as it was."""
        if self.stop_flag.requested:
            raise TrainingInterrupted(self.run_dir, None, checkpoint_written=False)

    def _start_fresh(self, restart: bool) -> None:
        """Seeds and the grid of real images; restart: a run that stopped before its first checkpoint
        starts again, without the log rows of its earlier attempt."""
        c, run_dir = self.cfg, self.run_dir
        os.makedirs(run_dir, exist_ok=True)
        if restart:
            self._restarted = sum(truncate_jsonl(os.path.join(run_dir, name), 0) for name in LOGS) > 0
        torch.manual_seed(c.seed)
        np.random.seed(c.seed % (2 ** 32))
        random.seed(c.seed)
        save_grid(self.data.train.images[:c.grid].float() / 127.5 - 1, os.path.join(run_dir, "reals.png"))

    def _masks(self, net: torch.nn.Module):
        """One grouped masked-weight launch for a whole pruned net (rgkernels.grouped_masks), on the
        default execution path; "fused" / "auto" layers compute their masks inside their own kernels."""
        if self.cfg.execution != "masked_weight":
            return contextlib.nullcontext()
        if net is self.G and "G" in self.pruned or net is self.D and "D" in self.pruned:
            import rgkernels

            return rgkernels.grouped_masks(net)
        return contextlib.nullcontext()

    def _trainable(self, net):
        return [p for p in net.parameters() if p.requires_grad]

    def _keep_ratios(self) -> Dict[str, float]:
        import rgkernels

        out = {}
        for name, net in (("G", self.G), ("D", self.D), ("G_ema", self.G_ema)):
            out[name] = rgkernels.keep_ratio(net) if name[0] in self.pruned else 1.0
        return out

    def _refresh_flops(self) -> None:
        c = self.cfg
        self.flops.refresh(self.G, self.D, c.z_dim, c.res, c.batch, c.n_critic, self.device)

    # ---- one iteration -------------------------------------------------------------------------

    def train_iteration(self) -> Dict[str, torch.Tensor]:
        c, G, D = self.cfg, self.G, self.D
        stats: Dict[str, torch.Tensor] = {}
        # n_critic D steps
        for _ in range(c.n_critic):
            real = self.stream.next()
            z = torch.randn(c.batch, c.z_dim, device=self.device)
            with torch.no_grad(), self._masks(G):
                fake = G(z)
            with self._masks(D):
                loss_d, st = self.loss.d_loss(real, fake)
            self.opts["D"].zero_grad(set_to_none=True)
            loss_d.backward(inputs=self._trainable(D))
            self.opts["D"].step()
            self.counters["real_images"] += c.batch
            stats.update(st)
        # one G step (D's weights get no gradient: backward only into G's parameters)
        z = torch.randn(c.batch, c.z_dim, device=self.device)
        with self._masks(G), self._masks(D):
            loss_g, st = self.loss.g_loss(z)
        self.opts["G"].zero_grad(set_to_none=True)
        loss_g.backward(inputs=self._trainable(G))
        self.opts["G"].step()
        stats.update(st)
        self._update_ema()
        self.counters["step"] += 1
        return stats

    @torch.no_grad()
    def _update_ema(self) -> None:
        beta, t = self.cfg.ema_beta, self.counters["step"]
        if self.cfg.ema_warmup:
            beta = min(beta, (1.0 + t) / (self.cfg.ema_warmup_steps + t))
        w = 1.0 - beta
        for pe, p in zip(self.G_ema.parameters(), self.G.parameters()):
            pe.lerp_(p, w)
        for be, b in zip(self.G_ema.buffers(), self.G.buffers()):
            be.copy_(b)

    # ---- evaluation ----------------------------------------------------------------------------

    def _evaluate(self, final: bool = False, decide: bool = True) -> Dict:
        """One evaluation row; decide=False: its score never enters the AR controller (a finished run's
        final evaluation measured again)."""
        import rgkernels

        c = self.cfg
        t0 = time.time()
        num = c.final_fid_samples if (final and c.final_fid_samples) else c.fid_samples
        scores = self.evaluator(self.G_ema, num, seed=c.seed + 2)
        keep = self._keep_ratios()
        layers = {f"layers_{n}": rgkernels.layer_stats(self.nets[n]) for n in self.pruned}
        mode = self.controller.mode
        # A score from another sample count is not comparable with the AR history (FID is biased by
        # the sample count): a final evaluation with its own count decides nothing, and if the run is
        # extended later the history goes on without it.
        ar_input = decide and num == c.fid_samples
        next_mode = self.controller.update(scores[self.evaluator.primary]) if ar_input else mode
        if next_mode != mode:
            self.controller.apply({"G": [self.G, self.G_ema], "D": self.D}, self.pruned, self.ar_nets)
        eval_s = time.time() - t0
        self.counters["eval_time_s"] += eval_s
        self.counters["evaluations"] += 1
        self._refresh_flops()
        ctr = self.counters
        row = {
            "step": ctr["step"], "real_images": ctr["real_images"], "kimg": ctr["real_images"] / 1000,
            "time_s": round(self._elapsed(), 3), "train_time_s": round(ctr["train_time_s"], 3),
            "eval_time_s": round(ctr["eval_time_s"], 3),
            "fid": scores.get("fid"), "kid": scores.get("kid"),
            **{k: v for k, v in scores.items() if k not in ("fid", "kid")},
            "metric": self.evaluator.label, "fid_samples": num, "fid_ref_images": int(self.evaluator.ref_feats.shape[0]),
            "fid_ref_split": self.data.ref_split,
            "mode": mode if self.pruned else "dense", "next_mode": next_mode if self.pruned else "dense",
            "ar_input": ar_input, "ar_avg": self.controller.log[-1]["avg"] if ar_input else None,
            "keep_ratio_G": keep["G"], "keep_ratio_D": keep["D"], "keep_ratio_G_ema": keep["G_ema"],
            "flops_dense": self.flops.total["dense"], "flops_active": self.flops.total["active"],
            "flops_executed": self.flops.total["executed"],
            "flops_per_iter_dense": self.flops.rate["dense"], "flops_per_iter_active": self.flops.rate["active"],
            "flops_per_iter_executed": self.flops.rate["executed"],
            "final": final, **layers,
        }
        append_jsonl(os.path.join(self.run_dir, "metrics.jsonl"), row)
        if self.writer is not None:
            s = ctr["real_images"]
            for k in ("fid", "kid", "proxy_fid", "proxy_kid", "keep_ratio_G", "keep_ratio_D", "flops_dense",
                      "flops_active", "flops_executed"):
                if row.get(k) is not None:
                    self.writer.add_scalar(f"eval/{k}", row[k], s)
            self.writer.add_scalar("eval/sparse_mode", 1.0 if next_mode == SPARSE else 0.0, s)
            self.writer.flush()
        with torch.no_grad():
            self.G_ema.eval()
            save_grid(self.G_ema(self.grid_z), os.path.join(self.run_dir, f"samples-{ctr['step']:07d}.png"))
        self.last_scores = scores
        return row

    # ---- checkpoints ---------------------------------------------------------------------------

    def _elapsed(self) -> float:
        return self.counters["time_s"] + (time.time() - self._t_start)

    def save_checkpoint(self) -> str:
        import rgkernels

        counters = dict(self.counters, time_s=self._elapsed())
        state = {
            "G": self.G.state_dict(), "D": self.D.state_dict(), "G_ema": self.G_ema.state_dict(),
            "opt_G": self.opts["G"].state_dict(), "opt_D": self.opts["D"].state_dict(),
            "controller": self.controller.state_dict(), "stream": self.stream.state_dict(),
            "flops": self.flops.state_dict(), "counters": counters,
            # None: saved before train() set up its schedule (iterations run by hand); train() sets it up
            "next": None if self._next is None else dict(self._next),
            "last_scores": self.last_scores, "rng": checkpoint.rng_state(), "config": self.cfg.to_dict(),
            # rows the logs have now: a resume from this checkpoint drops any written after it
            "log_rows": {name: count_rows(os.path.join(self.run_dir, name)) for name in LOGS},
            # layer_stats' previous masks: regeneration counts continue across a resume
            "stats_masks": {n: rgkernels.stats_state(net) for n, net in self.nets.items()},
        }
        return checkpoint.save(self.run_dir, state)

    def _load(self) -> None:
        s = checkpoint.load(self.run_dir, map_location="cpu")  # load_state_dict moves tensors
        try:
            self._restore(s)
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            path = os.path.join(self.run_dir, checkpoint.CHECKPOINT)
            what = f"missing entry {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
            raise checkpoint.CheckpointError(f"{path}: does not fit this run's configuration or is incomplete "
                                             f"({type(e).__name__}: {what})") from None
        self._trim_logs(s)

    def _restore(self, s: Dict) -> None:
        import rgkernels

        self.G.load_state_dict(s["G"])
        self.D.load_state_dict(s["D"])
        self.G_ema.load_state_dict(s["G_ema"])
        self.opts["G"].load_state_dict(s["opt_G"])
        self.opts["D"].load_state_dict(s["opt_D"])
        self.controller.load_state_dict(s["controller"])
        self.controller.apply({"G": [self.G, self.G_ema], "D": self.D}, self.pruned, self.ar_nets)
        self.stream.load_state_dict(s["stream"])
        self.flops.load_state_dict(s["flops"])
        for n, masks in s.get("stats_masks", {}).items():
            rgkernels.load_stats_state(self.nets[n], masks)
        self.counters.update(s["counters"])
        self._next = None if s["next"] is None else dict(s["next"])
        self.last_scores = s.get("last_scores", {})
        checkpoint.set_rng_state(s["rng"])

    def _trim_logs(self, s: Dict) -> None:
        """Drop log rows written after the checkpoint (the process was killed before the next one), so
        that the resumed run writes each step once. Checkpoints without row counts: by step."""
        counts = s.get("log_rows")
        for name in LOGS:
            path = os.path.join(self.run_dir, name)
            keep = counts[name] if counts else sum(r["step"] <= self.counters["step"] for r in read_jsonl(path))
            dropped = truncate_jsonl(path, keep)
            if dropped:
                self.log(f"{name}: dropped {dropped} row(s) written after the checkpoint")

    # ---- the loop ------------------------------------------------------------------------------

    def train(self) -> Dict:
        c, ctr = self.cfg, self.counters
        self._t_start = time.time()
        total = int(round(c.kimg * 1000))
        eval_every = max(1, int(round(c.eval_kimg * 1000)))
        ckpt_every = int(round(c.ckpt_kimg * 1000)) or None
        if self._next is None:  # a new run (a resume has the checkpoint's)
            self._next = {"eval": eval_every, "ckpt": ckpt_every or 0, "started": False}
        bar = self._bar(total)
        try:
            if not self._next["started"]:
                self._start(bar)
            if ctr["real_images"] >= total and self._final_outdated():
                # a finished run resumed with another --final-fid-samples: its final evaluation again
                self._show(bar, self._evaluate(final=True, decide=False))
                self.save_checkpoint()
            while ctr["real_images"] < total:
                if self.stop_flag.requested:
                    self.save_checkpoint()
                    raise TrainingInterrupted(self.run_dir, ctr["step"])
                t0 = time.time()
                if ctr["step"] % max(1, c.flops_every) == 0 or not self.flops.rate["dense"]:
                    self._refresh_flops()
                stats = self.train_iteration()
                self.flops.add_iteration()
                ctr["train_time_s"] += time.time() - t0
                if bar is not None:
                    bar.update(c.batch * c.n_critic)
                if ctr["step"] % max(1, c.log_every) == 0:
                    self._log_stats(stats, bar)
                done = ctr["real_images"] >= total
                if ctr["real_images"] >= self._next["eval"] or done:
                    self._next["eval"] = (ctr["real_images"] // eval_every + 1) * eval_every
                    self._show(bar, self._evaluate(final=done))
                    self.save_checkpoint()
                elif ckpt_every and ctr["real_images"] >= self._next["ckpt"]:
                    self.save_checkpoint()
                if ckpt_every:
                    self._next["ckpt"] = (ctr["real_images"] // ckpt_every + 1) * ckpt_every
        finally:
            if bar is not None:
                bar.close()
            if self.writer is not None:
                self.writer.close()
        return self._finish()

    def _final_outdated(self) -> bool:
        """Whether the last final evaluation was measured with another sample count than the final one
        configured now (a finished run resumed with --final-fid-samples)."""
        want = self.cfg.final_fid_samples or self.cfg.fid_samples
        finals = [r for r in read_jsonl(os.path.join(self.run_dir, "metrics.jsonl")) if r.get("final")]
        return bool(finals) and finals[-1]["fid_samples"] != want

    def _start(self, bar) -> None:
        """The initial evaluation and the first checkpoint. A stop asked for before the evaluation (which
        can take minutes) writes a checkpoint of the untrained state first, so that the run can be
        resumed; one asked for during it is honoured by the loop right after."""
        if self.stop_flag.requested:
            self.save_checkpoint()
            raise TrainingInterrupted(self.run_dir, self.counters["step"])
        self._next["started"] = True
        if self.cfg.eval_at_start:
            self._show(bar, self._evaluate())
        self.save_checkpoint()

    def _bar(self, total: int):
        if not self.cfg.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=min(self.counters["real_images"], total), unit="img", unit_scale=True,
                    dynamic_ncols=True, desc=f"{self.cfg.arch}{'-RG' if self.pruned else ''}")

    def _show(self, bar, row: Dict) -> None:
        name = self.evaluator.primary
        val = row.get(name)
        msg = (f"step {row['step']} kimg {row['kimg']:.1f}: {name} {val:.2f} ({row['fid_samples']} samples vs "
               f"{row['fid_ref_images']} {row['fid_ref_split']}), mode {row['mode']}->{row['next_mode']}, "
               f"keep G {row['keep_ratio_G']:.3f} D {row['keep_ratio_D']:.3f}")
        if bar is not None:
            bar.write(msg)
            self._postfix(bar)
        else:
            self.log(msg)

    def _postfix(self, bar, keep=None) -> None:
        name = self.evaluator.primary
        val = self.last_scores.get(name)
        keep = keep or self._keep_ratios()
        bar.set_postfix_str(f"{name}={val:.1f} mode={self.controller.mode if self.pruned else 'dense'} "
                            f"keepG={keep['G']:.3f} keepD={keep['D']:.3f}" if val is not None else "", refresh=False)

    def _log_stats(self, stats: Dict[str, torch.Tensor], bar) -> None:
        ctr = self.counters
        keep = self._keep_ratios()
        row = {"step": ctr["step"], "real_images": ctr["real_images"], "time_s": round(self._elapsed(), 3),
               **{k: float(v) for k, v in stats.items()},
               "mode": self.controller.mode if self.pruned else "dense",
               "keep_ratio_G": keep["G"], "keep_ratio_D": keep["D"]}
        append_jsonl(os.path.join(self.run_dir, "stats.jsonl"), row)
        if self.writer is not None:
            for k, v in row.items():
                if k not in ("step", "real_images", "mode", "time_s"):
                    self.writer.add_scalar(f"train/{k}", v, ctr["real_images"])
        if bar is not None:
            self._postfix(bar, keep)

    def _finish(self) -> Dict:
        ctr = self.counters
        rows = read_jsonl(os.path.join(self.run_dir, "metrics.jsonl"))
        summary = {
            "run_dir": self.run_dir, "steps": ctr["step"], "real_images": ctr["real_images"],
            "time_s": round(self._elapsed(), 1), "train_time_s": round(ctr["train_time_s"], 1),
            "eval_time_s": round(ctr["eval_time_s"], 1), "metric": self.evaluator.label,
            "score_name": self.evaluator.primary,
            **score_summary(rows, self.evaluator.primary, self.cfg.fid_samples),
            "fid_ref_images": rows[-1]["fid_ref_images"] if rows else None,
            "keep_ratio_G": rows[-1]["keep_ratio_G"] if rows else None,
            "keep_ratio_D": rows[-1]["keep_ratio_D"] if rows else None,
            "mode": self.controller.mode if self.pruned else "dense",
            "mode_switches": sum(1 for e in self.controller.log if e["before"] != e["after"]),
            "flops_dense": self.flops.total["dense"], "flops_active": self.flops.total["active"],
            "flops_executed": self.flops.total["executed"],
        }
        with open(os.path.join(self.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        try:
            from safetensors.torch import save_file

            sd = {k: v.detach().cpu().contiguous() for k, v in self.G_ema.state_dict().items()}
            save_file(sd, os.path.join(self.run_dir, "G_ema.safetensors"))
        except ImportError:
            pass
        try:
            from ..plot import plot_run

            summary["plot"] = plot_run(self.run_dir)
        except ImportError:  # matplotlib is optional
            pass
        return summary


def score_summary(rows: List[Dict], name: str, fid_samples: int) -> Dict:
    """First, last and best score of a run, each with the sample count it was measured with. "best" is
    over the evaluations during training (fid_samples each): a final evaluation with another count is
    not comparable with them (FID falls with more samples)."""
    comparable = [r for r in rows if r.get(name) is not None and r["fid_samples"] == fid_samples]
    picked = {"first": rows[0] if rows else None, "last": rows[-1] if rows else None,
              "best": min(comparable, key=lambda r: r[name], default=None)}
    out: Dict = {"fid_samples": fid_samples}
    for key, row in picked.items():
        out[key] = row.get(name) if row else None
        out[f"{key}_samples"] = row["fid_samples"] if row else None
    return out
