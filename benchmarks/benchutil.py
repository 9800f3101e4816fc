"""Helpers shared by the benchmarks."""
import torch


def devices():
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def paired_clock():
    """(name, clock) for the paired CPU benchmarks: the calling thread's CPU time with one thread (steady on
    a shared machine), wall time with more (thread_time would miss the work of torch's other threads)."""
    import time

    if torch.get_num_threads() == 1:
        return "thread_time", time.thread_time
    return "perf_counter", time.perf_counter
