"""KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel
k(x, y) = (x.y / d + 1)^3, averaged over random subsets (clean-fid's kernel_distance estimator),
with a seeded generator so that evaluating does not touch numpy's global RNG."""
from __future__ import annotations

import numpy as np


def kid_from_features(gen: np.ndarray, ref: np.ndarray, num_subsets: int = 100,
                      max_subset_size: int = 1000, seed: int = 0) -> float:
    gen = np.asarray(gen, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    d = gen.shape[1]
    m = min(gen.shape[0], ref.shape[0], max_subset_size)
    if m < 2:
        return float("nan")
    rng = np.random.default_rng(seed)
    t = 0.0
    for _ in range(num_subsets):
        x = ref[rng.choice(ref.shape[0], m, replace=False)]
        y = gen[rng.choice(gen.shape[0], m, replace=False)]
        a = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3
        b = (x @ y.T / d + 1) ** 3
        t += (a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m
    return float(t / num_subsets / m)


def compute(gen_feats: np.ndarray, ref_feats: np.ndarray, num_subsets: int = 100,
            max_subset_size: int = 1000, **_) -> float:
    """Registry entry."""
    return kid_from_features(gen_feats, ref_feats, num_subsets, max_subset_size)
