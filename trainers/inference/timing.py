"""Wall-clock timing shared by the benchmarks, and the one description of the machine a number was measured on."""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch


def stopwatch(fn, device: torch.device):
    """(fn(), its seconds), the device synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    return timed_interleaved([fn], repeats, device)[0]


def timed_interleaved(fns: list, repeats: int, device: torch.device) -> list[float]:
    """Median seconds of each of ``fns`` over ``repeats`` rounds that run every fn once, after one warm-up each.

    On a shared machine a slow spell then lands on every setting alike instead of on one.
    """
    return [statistics.median(samples) for samples in timed_rounds(fns, repeats, device)]


def speedups(rounds: list[list[float]]) -> list[float]:
    """Per fn, the median over rounds of (first fn's seconds / this fn's seconds) in the same round: a ratio that a
    slow spell lasting longer than one round leaves alone."""
    return [statistics.median(base / t for base, t in zip(rounds[0], samples)) for samples in rounds]


def timed_rounds(fns: list, repeats: int, device: torch.device) -> list[list[float]]:
    """Seconds of each of ``fns`` in each of ``repeats`` rounds that run every fn once, after one warm-up each."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, samples in zip(fns, times):
            samples.append(stopwatch(fn, device)[1])
    return times


def machine(device: torch.device | None = None) -> str:
    """'NVIDIA H200' on a GPU; 'x86_64 CPU, 2 cores, torch 2.13.0+cpu with 2 threads' on the CPU."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return (f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__} with {threads} "
            f"thread{'s' if threads > 1 else ''}")
