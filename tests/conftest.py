"""Shared test set-up: deterministic hypothesis and running the CLI as a user would."""

from __future__ import annotations

import subprocess
import sys

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
