"""Checkpoints: everything a run needs to continue exactly where it stopped, written atomically.

checkpoint.pt holds G, D, G_ema (weights, thresholds, spectral-norm and batch-norm buffers), both
optimisers' states, the RG controller with its FID history, the data stream position, the RNG
states (torch CPU / CUDA, numpy, python) and the loop's counters. It is written to a temporary
file in the run directory, flushed to disk and renamed over the old one, so a kill at any moment
leaves either the previous or the new checkpoint, never a broken one.
"""
from __future__ import annotations

import os
import random
from typing import Any, Dict

import numpy as np
import torch

CHECKPOINT = "checkpoint.pt"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """checkpoint.pt cannot be used (damaged, not a checkpoint, another format); names the file."""


def rng_state() -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run_dir: str, state: Dict[str, Any]) -> str:
    path = os.path.join(run_dir, CHECKPOINT)
    tmp = path + f".tmp{os.getpid()}"
    state = {"format": FORMAT_VERSION, **state}
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(run_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return path


def load(run_dir: str, map_location="cpu") -> Dict[str, Any]:
    path = os.path.join(run_dir, CHECKPOINT)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint in {run_dir} (expected {path})")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises many types for damaged files (RuntimeError, ValueError, EOFError, ...)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: cannot be read, the file is damaged or not a checkpoint ({reason})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a rggan_fast checkpoint (holds a {type(state).__name__})")
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {state.get('format')} is not {FORMAT_VERSION}")
    return state


def exists(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(run_dir, CHECKPOINT))


def remove_stale_temporaries(run_dir: str) -> None:
    """Deletes the temporary files of saves that a hard kill interrupted (checkpoint.pt.tmp<pid> of
    another process: the run directory is locked by this one)."""
    own = f"{CHECKPOINT}.tmp{os.getpid()}"
    prefix = f"{CHECKPOINT}.tmp"
    try:
        names = os.listdir(run_dir)
    except OSError:
        return
    for name in names:
        if name.startswith(prefix) and name[len(prefix):].isdigit() and name != own:
            try:
                os.remove(os.path.join(run_dir, name))
            except OSError:
                pass
