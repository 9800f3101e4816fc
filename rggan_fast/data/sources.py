"""Image sources: each returns the images of one split as a uint8 tensor [N, 3, res, res].

Sources (the `--data` argument):
    lfw100          the first 100 (face) images of scikit-image's lfw_subset(): grey 25x25,
                    resized to res and repeated to RGB.
    DIR             a folder of images (searched recursively; png, jpg, jpeg, bmp, webp, ...).
    FILE.zip        a zip of images.
    DIR (CIFAR-10)  a directory holding CIFAR-10's python pickles (data_batch_1..5, test_batch),
                    directly or in a cifar-10-batches-py/ subfolder.

Folder and zip images of any size are resized (shorter side to res) and centre-cropped.
A file that cannot be read stops loading with a DataError that names it.
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import zipfile
from dataclasses import dataclass
from typing import Callable, Iterable, List, Tuple

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".gif")
CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST = ["test_batch"]


class DataError(RuntimeError):
    """The data set cannot be used (unreadable file, empty set, wrong format)."""


@dataclass
class ImageSet:
    images: torch.Tensor  # uint8 [N, 3, res, res]
    name: str             # short name for run directories and messages
    key: str              # identifies the content (for caching FID reference statistics)
    split: str            # train | test

    def __len__(self) -> int:
        return int(self.images.shape[0])


# ---- helpers ---------------------------------------------------------------------------------

def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit grey (PIL modes I;16*: 16-bit PNGs) scaled to 8 bits; convert("RGB") would clip every value
    above 255 to white. 32-bit integer or float images (mode I or F) have no known range: refused."""
    if img.mode.startswith("I;16"):
        a = np.asarray(img).astype(np.uint32)  # (native byte order whatever the mode's suffix)
        return Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), mode="L")
    if img.mode in ("I", "F") or img.mode.startswith(("I;", "F;")):
        raise ValueError(f"{img.mode} images (32-bit integer or float values) have no known range; "
                         "convert them to 8 or 16 bits per channel")
    return img


def to_square(img: Image.Image, res: int) -> np.ndarray:
    """PIL image -> uint8 [res, res, 3]: shorter side resized to res, then centre crop."""
    img = to_8bit(img).convert("RGB")
    w, h = img.size
    if (w, h) != (res, res):
        s = res / min(w, h)
        nw, nh = max(res, round(w * s)), max(res, round(h * s))
        img = img.resize((nw, nh), resample=Image.LANCZOS)
        left, top = (nw - res) // 2, (nh - res) // 2
        img = img.crop((left, top, left + res, top + res))
    return np.asarray(img, dtype=np.uint8)


def _stack(arrays: List[np.ndarray], where: str) -> torch.Tensor:
    if not arrays:
        raise DataError(f"no images found in {where}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _decode(data_or_path, label: str, res: int) -> np.ndarray:
    try:
        with Image.open(data_or_path) as img:
            img.load()
            return to_square(img, res)
    except Exception as e:  # PIL raises several types for broken files
        raise DataError(f"cannot read image {label}: {type(e).__name__}: {e}") from None


def _digest(parts: Iterable[str]) -> str:
    h = hashlib.sha1()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


# ---- lfw100 ----------------------------------------------------------------------------------

def load_lfw100(res: int) -> ImageSet:
    try:
        from skimage.data import lfw_subset
    except ImportError:
        raise DataError("the lfw100 data set needs scikit-image (pip install scikit-image)") from None
    faces = lfw_subset()[:100]  # float64 in [0, 1], 100 x 25 x 25, grey
    arrays = []
    for f in faces:
        img = Image.fromarray(np.round(f * 255).astype(np.uint8), mode="L")
        arrays.append(to_square(img, res))
    return ImageSet(_stack(arrays, "lfw100"), "lfw100", f"lfw100-{res}", "train")


# ---- folders and zips ------------------------------------------------------------------------

def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not os.path.basename(name).startswith(".")


def load_folder(path: str, res: int, progress: Callable = lambda it, **kw: it) -> ImageSet:
    if not os.path.isdir(path):
        raise DataError(not_a_data_set(path) or f"data folder {path} does not exist")
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs if _is_image(f))
    if not files:
        raise DataError(f"no images found in {path} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    arrays = [_decode(f, f, res) for f in progress(files, desc="loading images")]
    stats = [f"{os.path.relpath(f, path)}:{os.path.getsize(f)}:{int(os.path.getmtime(f))}" for f in files]
    name = os.path.basename(os.path.normpath(path)) or "folder"
    return ImageSet(_stack(arrays, path), name, f"folder-{name}-{_digest(stats)}-{res}", "train")


def load_zip(path: str, res: int, progress: Callable = lambda it, **kw: it) -> ImageSet:
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot read zip file {path}: {e}") from None
    with zf:
        names = sorted(n for n in zf.namelist() if _is_image(n) and not n.endswith("/"))
        if not names:
            raise DataError(f"no images found in {path}")
        arrays = []
        for n in progress(names, desc="loading images"):
            try:
                data = zf.read(n)
            except Exception as e:
                raise DataError(f"cannot read {n} in {path}: {e}") from None
            arrays.append(_decode(io.BytesIO(data), f"{path}:{n}", res))
        infos = [f"{i.filename}:{i.file_size}:{i.CRC}" for i in zf.infolist()]
    name = os.path.splitext(os.path.basename(path))[0]
    return ImageSet(_stack(arrays, path), name, f"zip-{name}-{_digest(infos)}-{res}", "train")


# ---- CIFAR-10 python pickles -----------------------------------------------------------------

def cifar_dir(path: str) -> str:
    """The directory that holds the pickles, or '' when `path` is not a CIFAR-10 directory."""
    for d in (path, os.path.join(path, "cifar-10-batches-py")):
        if os.path.isfile(os.path.join(d, "data_batch_1")) or os.path.isfile(os.path.join(d, "test_batch")):
            return d
    return ""


def load_cifar10(path: str, split: str, res: int) -> ImageSet:
    d = cifar_dir(path)
    if not d:
        raise DataError(f"{path} holds no CIFAR-10 pickles (data_batch_1..5, test_batch)")
    files = CIFAR_TRAIN if split == "train" else CIFAR_TEST
    chunks, stats = [], []
    for f in files:
        fp = os.path.join(d, f)
        try:
            with open(fp, "rb") as fh:
                entry = pickle.load(fh, encoding="bytes")
            data = entry[b"data"] if b"data" in entry else entry["data"]
            data = np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32)
        except FileNotFoundError:
            raise DataError(f"CIFAR-10 file {fp} is missing") from None
        except Exception as e:
            raise DataError(f"cannot read CIFAR-10 file {fp}: {type(e).__name__}: {e}") from None
        chunks.append(data)
        stats.append(f"{f}:{os.path.getsize(fp)}:{int(os.path.getmtime(fp))}")
    images = torch.from_numpy(np.concatenate(chunks))
    if len(images) == 0:
        raise DataError(f"no images found in {d} ({split} split)")
    if res != 32:
        images = _stack([to_square(Image.fromarray(im.permute(1, 2, 0).numpy()), res) for im in images], d)
    return ImageSet(images.contiguous(), "cifar10", f"cifar10-{split}-{_digest(stats)}-{res}", split)


def detect_kind(data: str) -> str:
    if data == "lfw100":
        return "lfw100"
    if data.lower().endswith(".zip"):
        return "zip"
    if os.path.isdir(data) and cifar_dir(data):
        return "cifar10"
    return "folder"


def not_a_data_set(data: str) -> str:
    """Why `data`, an existing file that is not a .zip, cannot be a data set ('' when it is not such a file)."""
    if data == "lfw100" or not os.path.isfile(data) or data.lower().endswith(".zip"):
        return ""
    lower = data.lower()
    if lower.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        return (f"{data} is a tar archive: extract it first, then give the folder (a CIFAR-10 download: the "
                "folder holding cifar-10-batches-py/)")
    return f"{data} is a file: --data takes lfw100, a folder of images, a .zip of images or a CIFAR-10 folder"


def has_test_split(kind: str) -> bool:
    return kind == "cifar10"


def load_split(data: str, kind: str, split: str, res: int, progress: Callable = lambda it, **kw: it) -> ImageSet:
    if kind == "lfw100":
        s = load_lfw100(res)
    elif kind == "zip":
        s = load_zip(data, res, progress)
    elif kind == "cifar10":
        return load_cifar10(data, split, res)
    else:
        s = load_folder(data, res, progress)
    if split != "train":
        raise DataError(f"{data} has no {split} split")
    return s


def subset(images: ImageSet, ratio: float, seed: int) -> Tuple[ImageSet, torch.Tensor]:
    """The first round(ratio * N) images of a fixed permutation (seeded): the same subset every time."""
    n = len(images)
    if ratio >= 1.0:
        return images, torch.arange(n)
    k = max(1, int(round(ratio * n)))
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(n, generator=g)[:k].sort().values
    return ImageSet(images.images[idx].contiguous(), images.name, f"{images.key}-r{ratio:g}s{seed}", images.split), idx
