"""Triton kernels for the RobustResBlock on GPUs: the hierarchical cascade's grouped k x k convs with
their BatchNorm and ReLU in one pass (forward, input and weight gradients), and the residual squeeze-and-excitation's elementwise and reduction passes. cuDNN runs
these tiny grouped convs (4-14 channels a group) through generic kernels with layout transforms;
one Triton program reads each input pixel's k x k neighbourhood once and applies the epilogue.

Kernels run where Triton runs them: CUDA tensors, or CPU tensors under Triton's interpreter
(`TRITON_INTERPRET=1`, which must be set before Triton is first imported: tests/conftest.py sets
it). `usable(x)` says where the runtime uses them; elsewhere it keeps its other formulations.
Importing this package does not import Triton.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton's CPU interpreter runs kernels (read when the kernels are first compiled)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def usable(x) -> bool:
    """Whether the runtime runs x's blocks on the kernels: Triton installed and x on a CUDA device;
    CPU tensors only under the interpreter and SCALER_KERNELS_ON_CPU=1 (the tests: the interpreter
    runs a kernel thousands of times slower than the CPU formulations)."""
    if not triton_installed():
        return False
    if x.device.type == "cuda":
        return True
    return x.device.type == "cpu" and interpreting() and os.environ.get("SCALER_KERNELS_ON_CPU") == "1"


def on_device(x):
    """The launch context for kernels on x: Triton launches on the current CUDA device, so x's."""
    if x.device.type != "cuda":
        return contextlib.nullcontext()
    import torch

    return torch.cuda.device(x.device)
