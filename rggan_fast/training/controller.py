"""The RG controller: augmented regeneration (AR), DESIGN.md §1.

After every evaluation the controller gets the new FID. With f the FIDs so far (at least
len(weights) = 5 of them, the current one included):

    avg = 0.1 f[-5] + 0.1 f[-4] + 0.2 f[-3] + 0.2 f[-2] + 0.4 f[-1]
    avg >= f[-1]  ->  sparse mode  (FID is not worse than its recent trend: keep pruning)
    avg <  f[-1]  ->  dense mode   (FID got worse: every pruned weight comes back)

Training starts in sparse mode; with fewer than 5 FIDs the mode does not change. The controller
only decides; `apply` puts the networks into the mode (rgkernels.set_sparse). Networks for which
AR is switched off (ablation) stay sparse; networks that are not pruned are never touched.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence

SPARSE, DENSE = "sparse", "dense"


def weighted_average(history: Sequence[float], weights: Sequence[float]) -> Optional[float]:
    """sum(w_i * f_i) over the last len(weights) entries (weights oldest first), or None."""
    k = len(weights)
    if len(history) < k:
        return None
    return float(sum(w * f for w, f in zip(weights, history[-k:])))


class RGController:
    def __init__(self, weights: Sequence[float] = (0.1, 0.1, 0.2, 0.2, 0.4), enabled: bool = True):
        self.weights = tuple(float(w) for w in weights)
        self.enabled = enabled       # False: AR off (the mode stays sparse)
        self.history: List[float] = []
        self.mode = SPARSE
        self.log: List[Dict] = []    # one entry per decision, for the record

    def update(self, fid: float) -> str:
        """Record a new FID and return the mode to train in from now on."""
        self.history.append(float(fid))
        avg = weighted_average(self.history, self.weights)
        before = self.mode
        if self.enabled and avg is not None:
            self.mode = SPARSE if avg >= self.history[-1] else DENSE
        self.log.append({"fid": float(fid), "avg": avg, "before": before, "after": self.mode})
        return self.mode

    @property
    def sparse(self) -> bool:
        return self.mode == SPARSE

    def apply(self, nets: Dict[str, object], pruned: Iterable[str], ar_nets: Iterable[str]) -> None:
        """set_sparse on every pruned net: the controller's mode where AR applies, else sparse."""
        import rgkernels

        ar_nets = set(ar_nets)
        for name in pruned:
            flag = self.sparse if name in ar_nets else True
            for net in _as_list(nets[name]):
                rgkernels.set_sparse(net, flag)

    def state_dict(self) -> Dict:
        return {"weights": list(self.weights), "enabled": self.enabled, "history": list(self.history),
                "mode": self.mode, "log": list(self.log)}

    def load_state_dict(self, state: Dict) -> None:
        self.weights = tuple(state["weights"])
        self.enabled = state["enabled"]
        self.history = list(state["history"])
        self.mode = state["mode"]
        self.log = list(state.get("log", []))


def _as_list(x):
    return x if isinstance(x, (list, tuple)) else [x]


class NoRegrowth:
    """Ablation switch 'no recurrent regeneration' for one network.

    With recurrent regeneration (the default) a pruned weight comes back when its row's threshold
    falls below it. Without it, pruning is one-way: after every optimiser step each threshold is
    raised back to at least its value before the step, so thresholds never fall and frozen pruned
    weights never re-enter the mask. (The collapse guard, which lives in the layers, still resets a
    collapsed layer.) Returns a handle with .remove(), like rgkernels.protect_pruned.
    """

    def __init__(self, module, optimizer):
        import rgkernels
        import torch

        self._layers = [m for _, m in rgkernels.masked_layers(module)]
        self._saved = []

        def before(opt, args, kwargs):
            self._saved = [(m.threshold, m.threshold.detach().clone()) for m in self._layers if m.sparse]

        def after(opt, args, kwargs):
            with torch.no_grad():
                for t, old in self._saved:
                    torch.maximum(t, old, out=t)
            self._saved = []

        self._handles = [optimizer.register_step_pre_hook(before), optimizer.register_step_post_hook(after)]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
