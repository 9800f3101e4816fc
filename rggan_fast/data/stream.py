"""Endless, resumable stream of training batches.

Each epoch is a fresh permutation drawn from (seed, epoch), so the stream's whole state is two
integers (epoch, position) and a resumed run draws exactly the batches an uninterrupted one would.
"""
from __future__ import annotations

from typing import Dict

import torch


class BatchStream:
    def __init__(self, images: torch.Tensor, batch: int, seed: int, device: torch.device, xflip: bool = False):
        self.images = images.to(device)  # uint8 [N, 3, H, W], kept on the training device
        self.n = int(images.shape[0])
        self.batch = int(batch)
        self.seed = int(seed)
        self.xflip = xflip
        self.epoch = 0
        self.pos = 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def next_indices(self) -> torch.Tensor:
        out = []
        need = self.batch
        while need > 0:
            take = self._perm[self.pos:self.pos + need]
            out.append(take)
            need -= len(take)
            self.pos += len(take)
            if self.pos >= self.n:
                self.epoch += 1
                self.pos = 0
                self._perm = self._permutation(self.epoch)
        return torch.cat(out)

    def next(self) -> torch.Tensor:
        """A float batch in [-1, 1], [batch, 3, H, W]."""
        idx = self.next_indices().to(self.images.device)
        x = self.images.index_select(0, idx).float().div_(127.5).sub_(1.0)
        if self.xflip:
            flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
            x = torch.where(flip, x.flip(3), x)
        return x

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "n": self.n}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if state["n"] != self.n:
            raise ValueError(f"the data set has {self.n} images but the checkpoint was made with {state['n']}")
        self.seed = state["seed"]
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._perm = self._permutation(self.epoch)
