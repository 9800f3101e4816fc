"""GAN losses with RG-GAN's sparsity regulariser.

D step: L_D = relu(1 - D(aug(x))) + relu(1 + D(aug(G(z)))) + lambda * sum exp(-t_D)
G step: L_G = -D(aug(G(z)))                                   + lambda * sum exp(-t_G)

The regulariser (rgkernels.threshold_regularizer) only counts masked layers in sparse mode, so it
is off in dense mode and for networks that are not pruned.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def d_hinge(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()


def g_hinge(fake_logits: Tensor) -> Tensor:
    return -fake_logits.mean()


LOSSES: Dict[str, Tuple[Callable, Callable]] = {"hinge": (d_hinge, g_hinge)}


class GANLoss:
    def __init__(self, G: nn.Module, D: nn.Module, augment: Callable, kind: str = "hinge",
                 lam: float = 0.0, regularise_G: bool = False, regularise_D: bool = False):
        if kind not in LOSSES:
            raise ValueError(f"unknown loss {kind!r}; known: {', '.join(LOSSES)}")
        self.G, self.D, self.augment = G, D, augment
        self.d_fn, self.g_fn = LOSSES[kind]
        self.lam = float(lam)
        self.regularise_G, self.regularise_D = regularise_G, regularise_D

    def _reg(self, net: nn.Module, on: bool, like: Tensor) -> Tensor:
        if not on:
            return like.new_zeros(())
        import rgkernels

        return rgkernels.threshold_regularizer(net, self.lam)

    def d_loss(self, real: Tensor, fake: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        """D's loss on a real batch and a (detached) fake batch; one D call on both."""
        n = real.shape[0]
        logits = self.D(torch.cat([self.augment(real), self.augment(fake.detach())]))
        logits_real, logits_fake = logits[:n], logits[n:]
        adv = self.d_fn(logits_real, logits_fake)
        reg = self._reg(self.D, self.regularise_D, adv)
        return adv + reg, {"loss_D": adv.detach(), "reg_D": reg.detach(),
                           "D_real": logits_real.detach().mean(), "D_fake": logits_fake.detach().mean()}

    def g_loss(self, z: Tensor) -> Tuple[Tensor, Dict[str, Tensor]]:
        fake = self.G(z)
        adv = self.g_fn(self.D(self.augment(fake)))
        reg = self._reg(self.G, self.regularise_G, adv)
        return adv + reg, {"loss_G": adv.detach(), "reg_G": reg.detach()}
