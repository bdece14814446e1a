"""Emitted model file (generated/robustresnet_a1.py): import time and CPU forward time.
Run: python -m pytest benchmarks -q -k emitted"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

A1 = Path(__file__).resolve().parents[1] / "generated" / "robustresnet_a1.py"


def _import_fresh():
    spec = importlib.util.spec_from_file_location("a1_bench", A1)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_emitted_a1_import_in_process(benchmark):
    pytest.importorskip("torch")
    benchmark.pedantic(_import_fresh, rounds=20, iterations=1)


def test_emitted_a1_cold_import_process(benchmark):
    """A fresh interpreter that imports torch and the file (torch's import dominates)."""
    code = f"import importlib.util as u; s = u.spec_from_file_location('m', {str(A1)!r}); s.loader.exec_module(u.module_from_spec(s))"
    benchmark.pedantic(
        subprocess.run, args=([sys.executable, "-I", "-c", code],), kwargs={"check": True}, rounds=5, iterations=1
    )


def test_cold_torch_import_baseline(benchmark):
    benchmark.pedantic(
        subprocess.run,
        args=([sys.executable, "-I", "-c", "import torch"],),
        kwargs={"check": True},
        rounds=5,
        iterations=1,
    )


def test_emitted_a1_build(benchmark):
    module = _import_fresh()
    benchmark.pedantic(module.build_model, rounds=3, iterations=1)


@pytest.mark.parametrize("batch", [1, 64])
def test_emitted_a1_forward(benchmark, batch):
    import torch

    torch.manual_seed(0)
    model = _import_fresh().build_model().eval()
    x = torch.rand(batch, 3, 32, 32)

    def forward():
        with torch.inference_mode():
            return model(x)

    out = benchmark.pedantic(forward, rounds=5, iterations=1, warmup_rounds=1)
    assert out.shape == (batch, 10)
