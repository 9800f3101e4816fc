"""Metrics: a registry of score functions over feature sets, and the Evaluator that feeds them.

    REGISTRY[name](gen_feats, ref_feats, **options) -> float

The Evaluator resolves the feature network (metrics/inception.py, or the proxy), computes the
reference features once per data set / split / resolution / network and caches them under
the cache directory, and at every evaluation draws `num` samples from the EMA generator with a
fixed noise seed, passes them through clean-fid's own generator pipeline
(cleanfid.fid.get_model_features: 'clean' PIL-bicubic resize to 299, then the network) and
scores them with every metric of the run.

With --metric proxy the scores are named `proxy_fid` / `proxy_kid`: they are NOT FID / KID.
"""
from __future__ import annotations

import hashlib
import os
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from . import fid, kid
from .inception import FeatureExtractor, InceptionUnavailable, resolve_inception
from .proxy import proxy_extractor

REGISTRY: Dict[str, Callable[..., float]] = {
    "fid": fid.compute,
    "kid": kid.compute,
}

__all__ = ["REGISTRY", "Evaluator", "InceptionUnavailable", "FeatureExtractor", "default_cache_dir",
           "image_features", "generator_features"]


def default_cache_dir(cache_dir: str = "") -> str:
    return cache_dir or os.environ.get("RGGAN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rggan_fast")


def _clean_resizer():
    from cleanfid.resize import build_resizer

    return build_resizer("clean")


def image_features(images: torch.Tensor, extractor: FeatureExtractor, batch: int, device: torch.device,
                   progress: Callable = lambda it, **kw: it) -> np.ndarray:
    """Features of uint8 images [N, 3, H, W], pre-processed exactly like clean-fid's image files
    (uint8 HWC -> clean resize -> float CHW in [0, 255] -> network)."""
    fn_resize = extractor.fn_resize or _clean_resizer()
    out = []
    for start in progress(range(0, images.shape[0], batch), desc="reference features"):
        chunk = images[start:start + batch].permute(0, 2, 3, 1).cpu().numpy()
        x = torch.from_numpy(np.stack([fn_resize(im) for im in chunk]).transpose(0, 3, 1, 2).copy())
        out.append(extractor(x.float().to(device)).cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def generator_features(G: torch.nn.Module, extractor: FeatureExtractor, num: int, batch: int,
                       device: torch.device, seed: int = 0) -> np.ndarray:
    """Features of `num` samples of G through clean-fid's get_model_features.

    The noise comes from a fixed seed inside torch.random.fork_rng, so every evaluation sees the
    same z and training's RNG stream is untouched (a resumed run stays exact)."""
    from cleanfid.fid import get_model_features

    z_dim = G.z_dim

    def gen(z):  # clean-fid wants images in [0, 255]; quantised like images written to disk
        return (G(z.to(device)) * 127.5 + 128).clamp(0, 255).floor()

    batch = max(1, min(batch, num))
    devices = [device.index or 0] if device.type == "cuda" else []
    was_training = G.training
    G.eval()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(seed)
            feats = get_model_features(gen, extractor, mode="clean", z_dim=z_dim, num_gen=num,
                                       batch_size=batch, device=device, verbose=False,
                                       custom_fn_resize=extractor.fn_resize)
    finally:
        G.train(was_training)
    return np.asarray(feats, dtype=np.float32)


class Evaluator:
    """Scores a generator against a reference image set with the run's metrics."""

    def __init__(self, metric: str, reference_images: torch.Tensor, reference_key: str, device: torch.device,
                 cache_dir: str = "", batch: int = 50, kid_on: bool = True, kid_subsets: int = 100,
                 kid_subset_size: int = 1000, allow_download: bool = True, log: Callable[[str], None] = print,
                 progress: Callable = lambda it, **kw: it):
        self.device = device
        self.batch = batch
        self.cache_dir = default_cache_dir(cache_dir)
        self.kid_opts = {"num_subsets": kid_subsets, "max_subset_size": kid_subset_size}
        if metric == "fid":
            self.extractor = resolve_inception(device, self.cache_dir, allow_download, log=log)
            prefix = ""
        elif metric == "proxy":
            self.extractor = proxy_extractor(device)
            prefix = "proxy_"
        else:
            raise ValueError(f"unknown metric {metric!r}")
        self.metrics: List[str] = ["fid"] + (["kid"] if kid_on else [])
        self.names = {m: prefix + m for m in self.metrics}  # what the scores are called in logs
        self.primary = self.names["fid"]
        self.ref_feats = self._reference(reference_images, reference_key, log, progress)

    @property
    def label(self) -> str:
        return self.extractor.name

    def _reference(self, images, key, log, progress) -> np.ndarray:
        # The data's key names files by their sizes and times, which a copy that keeps them (cp -p, rsync -t)
        # or a rewrite within a second does not change: the pixels themselves are hashed too (a fraction of
        # the time the features take).
        content = hashlib.sha1(images.cpu().contiguous().numpy().tobytes()).hexdigest()
        tag = hashlib.sha1(f"{key}|{self.extractor.ident}|n{images.shape[0]}|{content}".encode()).hexdigest()[:12]
        path = os.path.join(self.cache_dir, "fid_refs", f"{key}-{self.extractor.ident}-{tag}.npz")
        if os.path.isfile(path):
            try:
                with np.load(path) as f:
                    return f["feats"]
            except Exception:
                pass  # a broken cache file is recomputed
        log(f"computing reference features of {images.shape[0]} images ({key}) -> {path}")
        feats = image_features(images, self.extractor, self.batch, self.device, progress)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + f".tmp{os.getpid()}.npz"
        st = fid.stats(feats)
        np.savez(tmp, feats=feats, mu=st["mu"], sigma=st["sigma"])
        os.replace(tmp, path)
        return feats

    def __call__(self, G: torch.nn.Module, num: int, seed: int = 0) -> Dict[str, float]:
        feats = generator_features(G, self.extractor, num, self.batch, self.device, seed)
        out = {}
        for m in self.metrics:
            opts = self.kid_opts if m == "kid" else {}
            out[self.names[m]] = float(REGISTRY[m](feats, self.ref_feats, **opts))
        return out
