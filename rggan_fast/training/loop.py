"""The RG-GAN training loop (SNGAN-style: n_critic D steps, then one G step).

    run = TrainingRun(cfg, run_dir)          # builds everything from the config (rggan_fast/build.py)
    summary = run.train()                    # trains until cfg.kimg thousand real images were shown

Per iteration: n_critic D steps on (augmented) reals and fakes, one G step, an EMA update of G_ema.
Every cfg.eval_kimg: the EMA generator is scored (FID, KID), the RG controller decides the mode
for the next interval (augmented regeneration), a row goes to metrics.jsonl (and TensorBoard),
a sample grid is written and the checkpoint is replaced atomically.

Run directory:
    config.json        resolved configuration (what --resume reads back)
    metrics.jsonl      one row per evaluation (see `_evaluate` for the fields)
    stats.jsonl        losses every cfg.log_every iterations
    checkpoint.pt      everything needed to continue exactly (rggan_fast/training/checkpoint.py)
    reals.png, samples-<step>.png    image grids (real images, G_ema samples at each evaluation)
    summary.json       written when the budget is reached
    G_ema.safetensors  final EMA generator weights and thresholds
    metrics.png        FID, keep ratios and FLOPs against kimg (rggan_fast/plot.py)
    events.out.tfevents.*            TensorBoard scalars
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


class TrainingInterrupted(Exception):
    """Raised after a requested stop (Ctrl-C, SIGTERM) once the checkpoint is written."""

    def __init__(self, run_dir: str, step: int):
        super().__init__(f"interrupted at step {step}; checkpoint written; continue with --resume {run_dir}")
        self.run_dir, self.step = run_dir, step


KERNEL_DECISIONS = "kernel_decisions.json"  # rgkernels.sparse_exec's decision cache, one per run


class StopFlag:
    """Set by a signal handler (see train.py); checked by the loop between iterations."""

    def __init__(self):
        self.requested = False

    def __call__(self, *_):
        self.requested = True


def _jsonl(path: str, row: Dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


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

        # Data and metric first: a broken data set or a missing Inception stops the run before
        # anything is written or trained.
        self.data = build.build_data(cfg, progress)
        self.evaluator = build.build_evaluator(cfg, self.data, self.device, log, progress)

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
        g = torch.Generator().manual_seed(cfg.seed + 1)
        self.grid_z = torch.randn(cfg.grid, cfg.z_dim, generator=g).to(self.device)

        if resume:
            self._load()
        else:
            os.makedirs(run_dir, exist_ok=True)
            cfg.save(os.path.join(run_dir, "config.json"))
            torch.manual_seed(cfg.seed)
            np.random.seed(cfg.seed % (2 ** 32))
            random.seed(cfg.seed)
            save_grid(self.data.train.images[:cfg.grid].float() / 127.5 - 1, os.path.join(run_dir, "reals.png"))
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
        return SummaryWriter(self.run_dir)

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
            beta = min(beta, (1.0 + t) / (10.0 + t))
        w = 1.0 - beta
        for pe, p in zip(self.G_ema.parameters(), self.G.parameters()):
            pe.lerp_(p, w)
        for be, b in zip(self.G_ema.buffers(), self.G.buffers()):
            be.copy_(b)

    # ---- evaluation ----------------------------------------------------------------------------

    def _evaluate(self, final: bool = False) -> Dict:
        import rgkernels

        c = self.cfg
        t0 = time.time()
        num = c.final_fid_samples if (final and c.final_fid_samples) else c.fid_samples
        scores = self.evaluator(self.G_ema, num, seed=c.seed + 2)
        keep = self._keep_ratios()
        layers = {f"layers_{n}": rgkernels.layer_stats(self.nets[n]) for n in self.pruned}
        mode = self.controller.mode
        next_mode = self.controller.update(scores[self.evaluator.primary])
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
            "ar_avg": self.controller.log[-1]["avg"],
            "keep_ratio_G": keep["G"], "keep_ratio_D": keep["D"], "keep_ratio_G_ema": keep["G_ema"],
            "flops_dense": self.flops.total["dense"], "flops_active": self.flops.total["active"],
            "flops_executed": self.flops.total["executed"],
            "flops_per_iter_dense": self.flops.rate["dense"], "flops_per_iter_active": self.flops.rate["active"],
            "flops_per_iter_executed": self.flops.rate["executed"],
            "final": final, **layers,
        }
        _jsonl(os.path.join(self.run_dir, "metrics.jsonl"), row)
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
            "flops": self.flops.state_dict(), "counters": counters, "next": dict(self._next),
            "last_scores": self.last_scores, "rng": checkpoint.rng_state(), "config": self.cfg.to_dict(),
            # layer_stats' previous masks: regeneration counts continue across a resume
            "stats_masks": {n: rgkernels.stats_state(net) for n, net in self.nets.items()},
        }
        return checkpoint.save(self.run_dir, state)

    def _load(self) -> None:
        import rgkernels

        s = checkpoint.load(self.run_dir, map_location="cpu")  # load_state_dict moves tensors
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
        self._resume_next = s["next"]
        self.last_scores = s.get("last_scores", {})
        checkpoint.set_rng_state(s["rng"])

    # ---- the loop ------------------------------------------------------------------------------

    def train(self) -> Dict:
        c, ctr = self.cfg, self.counters
        self._t_start = time.time()
        total = int(round(c.kimg * 1000))
        eval_every = max(1, int(round(c.eval_kimg * 1000)))
        ckpt_every = int(round(c.ckpt_kimg * 1000)) or None
        self._next = getattr(self, "_resume_next", None) or {
            "eval": eval_every, "ckpt": ckpt_every or 0, "started": False}
        bar = self._bar(total)
        try:
            if not self._next["started"]:
                self._next["started"] = True
                if c.eval_at_start:
                    self._show(bar, self._evaluate())
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
        _jsonl(os.path.join(self.run_dir, "stats.jsonl"), row)
        if self.writer is not None:
            for k, v in row.items():
                if k not in ("step", "real_images", "mode", "time_s"):
                    self.writer.add_scalar(f"train/{k}", v, ctr["real_images"])
        if bar is not None:
            self._postfix(bar, keep)

    def _finish(self) -> Dict:
        ctr = self.counters
        rows = read_jsonl(os.path.join(self.run_dir, "metrics.jsonl"))
        name = self.evaluator.primary
        summary = {
            "run_dir": self.run_dir, "steps": ctr["step"], "real_images": ctr["real_images"],
            "time_s": round(self._elapsed(), 1), "train_time_s": round(ctr["train_time_s"], 1),
            "eval_time_s": round(ctr["eval_time_s"], 1), "metric": self.evaluator.label, "score_name": name,
            "first": rows[0].get(name) if rows else None, "last": rows[-1].get(name) if rows else None,
            "best": min((r[name] for r in rows if r.get(name) is not None), default=None),
            "fid_samples": rows[-1]["fid_samples"] if rows else None,
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


def read_jsonl(path: str) -> List[Dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
