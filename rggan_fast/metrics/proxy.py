"""A proxy feature extractor for machines without Inception weights (--metric proxy).

Frechet distance in the feature space of a fixed, randomly initialised conv net (seed 0) on
64x64 images. It moves when the samples change and is cheap, but it is NOT a FID: its values are
reported as `proxy_fid` everywhere and cannot be compared with any published FID.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .inception import FeatureExtractor


def _net() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    layers, cin = [], 3
    for cout in (32, 64, 128, 256):
        conv = nn.Conv2d(cin, cout, 3, 2, 1)
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2.0 / (cin * 9)) ** 0.5)
            conv.bias.zero_()
        layers += [conv, nn.LeakyReLU(0.2)]
        cin = cout
    return nn.Sequential(*layers)


def proxy_extractor(device: torch.device) -> FeatureExtractor:
    net = _net().to(device).eval()

    def fn(x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x / 127.5 - 1.0, size=(64, 64), mode="bilinear", align_corners=False)
        h = net(x)
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)

    return FeatureExtractor(fn=fn, name="proxy: random conv features (NOT a FID)", ident="proxy-randconv-v1",
                            is_inception=False, fn_resize=lambda img: img.astype("float32"))
