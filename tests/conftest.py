"""Shared test set-up: deterministic hypothesis and running the CLI as a user would."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import torch  # noqa: E402  (it does not import triton)

# Triton reads this when first imported (torch may import it later): without a GPU the kernel tests
# run it on the CPU. Nothing else runs kernels on the CPU (trainers.kernels.usable asks for
# SCALER_KERNELS_ON_CPU too). With a GPU the kernels compile and run there.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run (CI must be deterministic).
settings.register_profile("scaler", derandomize=True, database=None)
settings.load_profile("scaler")


def run_cli(*args: str, cwd=None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `scaler ARGS` in a fresh interpreter, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "scaler_cli", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (2 CPUs, no dashboard), shut down at the end. Workers get
    this checkout on PYTHONPATH so they import the code under test."""
    import os
    from pathlib import Path

    ray = pytest.importorskip("ray")
    root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    yield ray
    ray.shutdown()
