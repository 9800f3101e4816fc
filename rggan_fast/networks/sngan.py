"""SNGAN ResNet generator and discriminator (Miyato et al. 2018), as used by RG-GAN (Table 5).

At 32x32 (CIFAR-10): G maps z (128) to a 4x4x256 map, three up-sampling residual blocks and a
3x3 conv to RGB; D has an optimised first block and three residual blocks of width 128 (two of
them down-sampling), ReLU, global sum pooling and a linear output, with spectral norm on every
layer. Other resolutions (powers of two) add or remove up / down blocks.

The networks are plain nn.Modules; RG-GAN's masked layers are swapped in afterwards by
`rgkernels.sparsify` (see rggan_fast/build.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm


def _init(layer: nn.Module, gain: float) -> nn.Module:
    nn.init.xavier_uniform_(layer.weight, gain)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class GBlock(nn.Module):
    """BN-ReLU-up-conv3-BN-ReLU-conv3, plus an up-sampled 1x1 conv shortcut."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = _init(nn.Conv2d(cin, cout, 3, 1, 1), math.sqrt(2))
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = _init(nn.Conv2d(cout, cout, 3, 1, 1), math.sqrt(2))
        self.shortcut = _init(nn.Conv2d(cin, cout, 1, 1, 0), 1.0)

    def forward(self, x):
        h = F.interpolate(F.relu(self.bn1(x)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h))))
        return h + self.shortcut(F.interpolate(x, scale_factor=2, mode="nearest"))


class Generator(nn.Module):
    def __init__(self, z_dim: int = 128, ch: int = 256, res: int = 32, bottom: int = 4):
        super().__init__()
        self.z_dim, self.ch, self.res, self.bottom = z_dim, ch, res, bottom
        n_up = int(round(math.log2(res / bottom)))
        self.fc = _init(nn.Linear(z_dim, bottom * bottom * ch), 1.0)
        self.blocks = nn.Sequential(*[GBlock(ch, ch) for _ in range(n_up)])
        self.bn = nn.BatchNorm2d(ch)
        self.to_rgb = _init(nn.Conv2d(ch, 3, 3, 1, 1), 1.0)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(z.shape[0], self.ch, self.bottom, self.bottom)
        h = F.relu(self.bn(self.blocks(h)))
        return torch.tanh(self.to_rgb(h))


class DBlock(nn.Module):
    """ReLU-conv3-ReLU-conv3(-avgpool), with a 1x1 conv (+avgpool) shortcut when needed."""

    def __init__(self, cin: int, cout: int, down: bool):
        super().__init__()
        self.down = down
        self.conv1 = spectral_norm(_init(nn.Conv2d(cin, cout, 3, 1, 1), math.sqrt(2)))
        self.conv2 = spectral_norm(_init(nn.Conv2d(cout, cout, 3, 1, 1), math.sqrt(2)))
        self.shortcut = spectral_norm(_init(nn.Conv2d(cin, cout, 1, 1, 0), 1.0)) if (down or cin != cout) else None

    def forward(self, x):
        h = self.conv2(F.relu(self.conv1(F.relu(x))))
        s = x
        if self.shortcut is not None:
            s = self.shortcut(s)
        if self.down:
            h, s = F.avg_pool2d(h, 2), F.avg_pool2d(s, 2)
        return h + s


class DBlockOptimized(nn.Module):
    """First D block: conv3-ReLU-conv3-avgpool, shortcut avgpool-conv1."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = spectral_norm(_init(nn.Conv2d(cin, cout, 3, 1, 1), math.sqrt(2)))
        self.conv2 = spectral_norm(_init(nn.Conv2d(cout, cout, 3, 1, 1), math.sqrt(2)))
        self.shortcut = spectral_norm(_init(nn.Conv2d(cin, cout, 1, 1, 0), 1.0))

    def forward(self, x):
        h = F.avg_pool2d(self.conv2(F.relu(self.conv1(x))), 2)
        return h + self.shortcut(F.avg_pool2d(x, 2))


class Discriminator(nn.Module):
    def __init__(self, ch: int = 128, res: int = 32):
        super().__init__()
        n_down = int(round(math.log2(res))) - 3  # 32x32 -> two down-sampling blocks, 8x8 features
        blocks = [DBlockOptimized(3, ch)]
        blocks += [DBlock(ch, ch, down=True) for _ in range(n_down - 1)]
        blocks += [DBlock(ch, ch, down=False) for _ in range(2)]
        self.blocks = nn.Sequential(*blocks)
        self.fc = spectral_norm(_init(nn.Linear(ch, 1), 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.blocks(x)).sum(dim=(2, 3))
        return self.fc(h).view(-1)
