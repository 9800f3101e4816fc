"""Data sources: lfw100, folders, zips, CIFAR-10 pickles, subsets, errors, the batch stream."""
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from rggan_fast.data import BatchStream, DataError, detect_kind, load_training_data
from rggan_fast.data.sources import load_cifar10, load_folder, load_lfw100, load_zip, subset


def _png(path, size=(40, 30), mode="RGB", color=(200, 10, 10)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, color if mode != "L" else 128).save(path)


def test_lfw100():
    s = load_lfw100(32)
    assert s.images.shape == (100, 3, 32, 32) and s.images.dtype == torch.uint8
    assert torch.equal(s.images[:, 0], s.images[:, 1])  # grey brought to RGB
    from skimage.data import lfw_subset
    small = load_lfw100(25).images[:, 0].float() / 255
    assert torch.allclose(small, torch.from_numpy(lfw_subset()[:100]).float(), atol=1 / 255)


def test_folder_any_size_and_mode(tmp_path):
    _png(str(tmp_path / "a.png"), (40, 30))
    _png(str(tmp_path / "sub" / "b.jpg"), (300, 500))
    _png(str(tmp_path / "c.png"), (8, 8), mode="L")
    Image.new("RGBA", (64, 64), (0, 255, 0, 128)).save(tmp_path / "d.png")
    (tmp_path / "notes.txt").write_text("not an image")
    s = load_folder(str(tmp_path), 16)
    assert s.images.shape == (4, 3, 16, 16)
    assert s.images[0, 0].float().mean() > 150  # a.png is red; files are sorted
    assert detect_kind(str(tmp_path)) == "folder"


def test_sixteen_bit_grey_is_scaled_and_unranged_modes_are_refused(tmp_path):
    """A 16-bit grey PNG (PIL mode I;16) gives the image its 8-bit version gives (convert("RGB") alone
    clips every value above 255 to white); 32-bit integer / float images have no known range: refused,
    naming the file."""
    ramp = np.tile(np.linspace(0, 65535, 32).round().astype(np.uint16), (32, 1))
    d16, d8 = tmp_path / "16", tmp_path / "8"
    d16.mkdir()
    d8.mkdir()
    Image.fromarray(ramp).save(d16 / "ramp.png")
    assert Image.open(d16 / "ramp.png").mode.startswith("I;16")
    Image.fromarray(np.round(ramp / 257).astype(np.uint8)).save(d8 / "ramp.png")
    got, want = load_folder(str(d16), 32).images, load_folder(str(d8), 32).images
    assert torch.equal(got, want) and want.float().mean() == pytest.approx(127.5, abs=1)
    bad = tmp_path / "float"
    bad.mkdir()
    Image.fromarray(ramp.astype(np.float32) / 65535).save(bad / "f.tiff")
    with pytest.raises(DataError, match=r"f\.tiff.*F images \(32-bit integer or float values\) have no known range"):
        load_folder(str(bad), 32)


def test_unreadable_file_is_named(tmp_path):
    _png(str(tmp_path / "good.png"))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="broken.png"):
        load_folder(str(tmp_path), 16)


def test_empty_sets(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_folder(str(tmp_path / "empty"), 16)
    z = tmp_path / "empty.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("readme.txt", "nothing")
    with pytest.raises(DataError, match="no images"):
        load_zip(str(z), 16)
    with pytest.raises(DataError, match="does not exist"):
        load_folder(str(tmp_path / "missing"), 16)


def test_zip(tmp_path):
    _png(str(tmp_path / "src" / "x.png"), (50, 20))
    _png(str(tmp_path / "src" / "y.png"), (20, 50), color=(0, 0, 255))
    z = tmp_path / "set.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.write(tmp_path / "src" / "x.png", "imgs/x.png")
        zf.write(tmp_path / "src" / "y.png", "imgs/y.png")
        zf.writestr("imgs/bad.png", b"garbage")
    assert detect_kind(str(z)) == "zip"
    with pytest.raises(DataError, match="bad.png"):
        load_zip(str(z), 16)
    with zipfile.ZipFile(z, "w") as zf:
        zf.write(tmp_path / "src" / "x.png", "imgs/x.png")
        zf.write(tmp_path / "src" / "y.png", "imgs/y.png")
    s = load_zip(str(z), 16)
    assert s.images.shape == (2, 3, 16, 16) and s.images[1, 2].float().mean() > 200
    (tmp_path / "notzip.zip").write_bytes(b"nope")
    with pytest.raises(DataError, match="notzip.zip"):
        load_zip(str(tmp_path / "notzip.zip"), 16)


def _cifar(dirpath, n=6):
    os.makedirs(dirpath, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        data[:, 0] = i  # marks the file
        with open(os.path.join(dirpath, name), "wb") as f:
            pickle.dump({b"data": data, b"labels": list(range(n))}, f)


def test_cifar10_pickles(tmp_path):
    root = tmp_path / "c10"
    _cifar(str(root / "cifar-10-batches-py"))
    assert detect_kind(str(root)) == "cifar10"
    d = load_training_data(str(root), "cifar10", 32, 1.0, 0)
    assert d.train.images.shape == (30, 3, 32, 32) and d.ref_split == "test"
    assert d.reference.images.shape == (6, 3, 32, 32) and int(d.reference.images[0, 0, 0, 0]) == 5
    # the pickle's row layout is CHW: first value is channel 0, pixel (0, 0)
    assert int(d.train.images[6, 0, 0, 0]) == 1
    assert load_cifar10(str(root), "train", 16).images.shape == (30, 3, 16, 16)


def test_cifar10_broken_and_missing_files_are_named(tmp_path):
    root = tmp_path / "c10"
    _cifar(str(root))
    (root / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3"):
        load_cifar10(str(root), "train", 32)
    os.remove(root / "data_batch_3")
    with pytest.raises(DataError, match="data_batch_3"):
        load_cifar10(str(root), "train", 32)


def test_data_ratio_subsets_are_deterministic():
    full = load_lfw100(16)
    a, ia = subset(full, 0.1, 0)
    b, ib = subset(full, 0.1, 0)
    assert len(a) == 10 and torch.equal(ia, ib) and torch.equal(a.images, b.images)
    c, _ = subset(full, 0.2, 0)
    assert len(c) == 20
    d = load_training_data("lfw100", "lfw100", 16, 0.5, 0)
    assert len(d.train) == 50 and len(d.reference) == 100  # FID reference: the whole split


def test_batch_stream_resumes_exactly():
    imgs = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2).contiguous()
    s = BatchStream(imgs, 4, seed=3, device=torch.device("cpu"))
    seen = torch.cat([s.next_indices() for _ in range(5)])
    assert sorted(seen[:10].tolist()) == list(range(10))  # each epoch is a permutation
    state = s.state_dict()
    expected = [s.next_indices() for _ in range(4)]
    t = BatchStream(imgs, 4, seed=3, device=torch.device("cpu"))
    t.load_state_dict(state)
    assert all(torch.equal(a, t.next_indices()) for a in expected)
    x = t.next()
    assert x.shape == (4, 3, 2, 2) and x.min() >= -1 and x.max() <= 1
