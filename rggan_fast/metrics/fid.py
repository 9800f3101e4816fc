"""FID (Heusel et al. 2017) from Inception features, clean-fid conventions.

Features come from clean-fid's pipeline (see metrics/__init__.py). The Frechet distance
    |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))
uses the exact identity tr((S1 S2)^(1/2)) = sum of sqrt(eigenvalues of S1 S2), computed in the
smaller of sample space (singular values of B A^T, A and B the centred feature matrices) and
feature space (eigenvalues of S1^(1/2) S2 S1^(1/2)), instead of scipy's sqrtm of a 2048x2048
matrix (tens of seconds on a small CPU). tests/test_fid*.py checks it against clean-fid's own
frechet_distance.
"""
from __future__ import annotations

from typing import Dict

import numpy as np


def stats(feats: np.ndarray) -> Dict[str, np.ndarray]:
    feats = np.asarray(feats, dtype=np.float64)
    return {"mu": feats.mean(axis=0), "sigma": np.cov(feats, rowvar=False)}


def trace_sqrt_product(a: np.ndarray, b: np.ndarray, sigma_a: np.ndarray = None, sigma_b: np.ndarray = None) -> float:
    """tr((cov(a) cov(b))^(1/2)) for feature matrices a [n1, d], b [n2, d]."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    n1, n2, d = a.shape[0], b.shape[0], a.shape[1]
    if n1 * n2 * min(n1, n2) <= 10 * d ** 3:  # sample space is the cheaper one
        A = a - a.mean(axis=0)
        B = b - b.mean(axis=0)
        sv = np.linalg.svd(B @ A.T, compute_uv=False)
        return float(sv.sum() / np.sqrt((n1 - 1) * (n2 - 1)))
    sa = np.cov(a, rowvar=False) if sigma_a is None else sigma_a
    sb = np.cov(b, rowvar=False) if sigma_b is None else sigma_b
    w, v = np.linalg.eigh(sa)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    e = np.linalg.eigvalsh(root @ sb @ root)
    return float(np.sqrt(np.clip(e, 0, None)).sum())


def fid_from_features(gen: np.ndarray, ref: np.ndarray) -> float:
    sg, sr = stats(gen), stats(ref)
    diff = sg["mu"] - sr["mu"]
    tr = trace_sqrt_product(gen, ref, sg["sigma"], sr["sigma"])
    return float(diff @ diff + np.trace(sg["sigma"]) + np.trace(sr["sigma"]) - 2.0 * tr)


def compute(gen_feats: np.ndarray, ref_feats: np.ndarray, **_) -> float:
    """Registry entry: FID between generated and reference features."""
    return fid_from_features(gen_feats, ref_feats)
