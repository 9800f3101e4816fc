"""DiffAugment (Zhao et al. 2020): differentiable augmentations applied to every image D sees.

Policy: comma-separated list of `color`, `translation`, `cutout` (or '' / 'none' for no
augmentation). The translation and cutout strengths are configuration fields (diffaug_translation,
diffaug_cutout; DiffAugment's 0.125 and 0.5 by default). Each call draws fresh random parameters
per image from torch's global RNG, so the same policy is applied independently to reals and fakes,
and a resumed run (which restores the RNG) draws the same augmentations as an uninterrupted one.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F


def _rand(x: torch.Tensor, *shape: int) -> torch.Tensor:
    return torch.rand(x.shape[0], *shape, device=x.device, dtype=x.dtype)


def brightness(x):
    return x + (_rand(x, 1, 1, 1) - 0.5)


def saturation(x):
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (_rand(x, 1, 1, 1) * 2) + mean


def contrast(x):
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_rand(x, 1, 1, 1) + 0.5) + mean


def translation(x, ratio: float = 0.125):
    """Shift each image by up to ratio * size pixels in x and y, filling with zeros."""
    n, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-sh, sh + 1, (n, 1, 1), device=x.device)
    dx = torch.randint(-sw, sw + 1, (n, 1, 1), device=x.device)
    ys = torch.arange(h, device=x.device).view(1, h, 1) + dy  # source row for each output row
    xs = torch.arange(w, device=x.device).view(1, 1, w) + dx
    # pad by one pixel of zeros so that out-of-range sources read zero
    ys = (ys + 1).clamp(0, h + 1).expand(n, h, w)
    xs = (xs + 1).clamp(0, w + 1).expand(n, h, w)
    padded = F.pad(x, (1, 1, 1, 1))
    flat = padded.flatten(2)  # [n, c, (h+2)*(w+2)]
    idx = (ys * (w + 2) + xs).flatten(1).unsqueeze(1).expand(-1, x.shape[1], -1)
    return flat.gather(2, idx).view_as(x)


def cutout(x, ratio: float = 0.5):
    """Zero one square of side ratio * size per image, at a random position."""
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), device=x.device)
    cx = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), device=x.device)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    top, left = cy - ch // 2, cx - cw // 2
    inside = (ys >= top) & (ys < top + ch) & (xs >= left) & (xs < left + cw)
    return x * (~inside).unsqueeze(1).to(x.dtype)


AUGMENTS: Dict[str, List[Callable]] = {
    "color": [brightness, saturation, contrast],
    "translation": [translation],
    "cutout": [cutout],
}


def parse_policy(policy: str) -> List[str]:
    names = [p.strip() for p in (policy or "").split(",") if p.strip() and p.strip().lower() != "none"]
    unknown = [p for p in names if p not in AUGMENTS]
    if unknown:
        raise ValueError(f"unknown DiffAugment policy {', '.join(unknown)}; known: {', '.join(AUGMENTS)}")
    return names


class DiffAugment:
    def __init__(self, policy: str = "color,translation,cutout", translation_ratio: float = 0.125,
                 cutout_ratio: float = 0.5):
        self.names = parse_policy(policy)
        self.policy = ",".join(self.names)
        self.translation_ratio, self.cutout_ratio = float(translation_ratio), float(cutout_ratio)
        ratios = {translation: self.translation_ratio, cutout: self.cutout_ratio}
        # each augmentation with its strength bound (colour ones take none)
        self._fns = [functools.partial(fn, ratio=ratios[fn]) if fn in ratios else fn
                     for name in self.names for fn in AUGMENTS[name]]

    def __bool__(self) -> bool:
        return bool(self.names)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for fn in self._fns:
            x = fn(x)
        return x.contiguous()

    def __repr__(self) -> str:
        return f"DiffAugment({self.policy!r})"
