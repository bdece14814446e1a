"""This machine's measured matmul peak, the yardstick for a training or evaluation step's FLOP
efficiency: `bench` reports achieved GFLOP/s beside the fraction of it.

FLOPs here are multiply-adds (fvcore's convention, the cost model's): an n x n by n x n matmul
is n^3 of them. A convolution network cannot beat a large square matmul in the same precision,
so the fraction says how much of the machine a model's step uses.
"""

from __future__ import annotations

import time
from functools import cache

import torch


@cache
def matmul_peak(device: str = "cpu", dtype: str = "bf16", size: int = 2048, repeats: int = 9) -> float:
    """Multiply-adds per second of an n x n matmul: the median of `repeats` timings after a
    warm-up (a median, since single timings on a shared machine swing both ways)."""
    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dt, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dt, generator=gen)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    torch.mm(a, b)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        times.append(time.perf_counter() - start)
    return size**3 / sorted(times)[repeats // 2]


def efficiency(macs_per_s: float, device: str, dtype: str) -> dict:
    """{gflops_per_s, peak_gflops_per_s, fraction_of_peak} of an achieved multiply-add rate."""
    peak = matmul_peak(device, dtype)
    return {
        "gflops_per_s": macs_per_s / 1e9,
        "peak_gflops_per_s": peak / 1e9,
        "peak_precision": dtype,
        "fraction_of_peak": macs_per_s / peak,
    }
