"""Helpers shared by the benchmarks."""
import torch


def devices():
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()
