"""Data sets for training and for FID reference statistics (see sources.py for the formats)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .sources import DataError, ImageSet, detect_kind, has_test_split, load_split, not_a_data_set, subset
from .stream import BatchStream

__all__ = ["DataError", "ImageSet", "BatchStream", "TrainingData", "detect_kind", "load_training_data",
           "not_a_data_set"]


@dataclass
class TrainingData:
    train: ImageSet        # what D sees (after --data-ratio)
    reference: ImageSet    # what FID compares with (a whole split)
    ref_split: str


def load_training_data(data: str, kind: str, res: int, data_ratio: float, subset_seed: int,
                       fid_ref: str = "auto", progress: Callable = lambda it, **kw: it) -> TrainingData:
    """Load the training images (subset per --data-ratio) and the FID reference split.

    fid_ref: 'auto' uses the test split where the set has one (CIFAR-10, as in the paper), else
    the full training split (the few-shot convention: FID against the training images).
    """
    full = load_split(data, kind, "train", res, progress)
    train, _ = subset(full, data_ratio, subset_seed)
    split = fid_ref
    if split == "auto":
        split = "test" if has_test_split(kind) else "train"
    if split == "test" and not has_test_split(kind):
        raise DataError(f"{data} has no test split for the FID reference (use --set fid_ref=train)")
    reference = full if split == "train" else load_split(data, kind, "test", res, progress)
    return TrainingData(train=train, reference=reference, ref_split=split)
