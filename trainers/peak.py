"""This machine's measured matmul peak, the yardstick for a training or evaluation step's FLOP
efficiency: `bench` reports achieved GFLOP/s beside the fraction of it.

FLOPs here are multiply-adds (fvcore's convention, the cost model's): an n x n by n x n matmul
is n^3 of them. A convolution network cannot beat a large square matmul in the same precision,
so the fraction says how much of the machine a model's step uses. The peak is taken in the
precision the step's convolutions actually compute in (fp32 convolutions on a CUDA GPU run as
TF32 while cuDNN allows it, PyTorch's default: their peak is TF32's, not fp32's) and with a
matmul large enough to saturate the device (a 2048^3 bf16 matmul reached about half an H100's
rate, 202 T multiply-adds/s, where 8192^3 reaches about 400).
"""

from __future__ import annotations

import time
from functools import cache

import torch

PEAK_SIZE = {"cpu": 2048, "cuda": 8192}
"""Matmul size per device type: the CPU saturates at 2048 (2 cores), an H100 needs 8192."""


def peak_precision(device_type: str, dtype: str, cudnn_tf32: bool | None = None) -> str:
    """The precision a step's convolutions compute in: bf16, fp32, or tf32 (fp32 on CUDA while
    `torch.backends.cudnn.allow_tf32`, True by default)."""
    if cudnn_tf32 is None:
        cudnn_tf32 = torch.backends.cudnn.allow_tf32
    return "tf32" if device_type == "cuda" and dtype == "fp32" and cudnn_tf32 else dtype


@cache
def matmul_peak(device: str = "cpu", dtype: str = "bf16", size: int | None = None, repeats: int = 9) -> float:
    """Multiply-adds per second of an n x n matmul (n from PEAK_SIZE) in `dtype` (bf16, fp32, or
    tf32: fp32 operands with TF32 matmuls allowed): the best of `repeats` timings after a warm-up
    (a peak: noise on a shared machine only slows a run down)."""
    kind = torch.device(device).type
    size = size or PEAK_SIZE.get(kind, 2048)
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dt, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dt, generator=gen)
    sync = torch.cuda.synchronize if kind == "cuda" else (lambda: None)
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    try:
        torch.mm(a, b)
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            sync()
            times.append(time.perf_counter() - start)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed
    return size**3 / min(times)


def efficiency(macs_per_s: float, device: str, dtype: str) -> dict:
    """{gflops_per_s, peak_gflops_per_s, peak_precision, fraction_of_peak} of an achieved
    multiply-add rate of a step run in `dtype` (bf16 or fp32) on `device`."""
    precision = peak_precision(torch.device(device).type, dtype)
    peak = matmul_peak(device, precision)
    return {
        "gflops_per_s": macs_per_s / 1e9,
        "peak_gflops_per_s": peak / 1e9,
        "peak_precision": precision,
        "fraction_of_peak": macs_per_s / peak,
    }
