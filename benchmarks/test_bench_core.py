"""Benchmarks for the compiler core (run: python -m pytest benchmarks -q).

- closed-form cost vs one fvcore count of robustresnet-a4 (the same number, ~10^5x faster);
- a cold `scaler solve --flops 10G` process vs a bare `python -c pass` in the same run.
"""

import logging
import subprocess
import sys

import pytest

from scaler.cost import count
from scaler.presets import PRESETS

A4 = PRESETS["robustresnet-a4"].spec


def test_closed_form_a4(benchmark):
    cost = benchmark(count, A4)
    assert cost.flops == 39_432_229_376


def test_fvcore_a4(benchmark):
    torch = pytest.importorskip("torch")
    from fvcore.nn import FlopCountAnalysis

    from scaler.builder import build_model

    logging.getLogger("fvcore").setLevel(logging.ERROR)
    model = build_model(A4).eval()
    x = torch.rand(1, 3, 32, 32)

    def fvcore_total():
        fca = FlopCountAnalysis(model, x)
        fca.unsupported_ops_warnings(False)
        fca.uncalled_modules_warnings(False)
        return fca.total()

    total = benchmark.pedantic(fvcore_total, rounds=3, iterations=1)
    assert total == count(A4).flops


def _run(*args):
    subprocess.run([sys.executable, *args], check=True, capture_output=True)


def test_cold_python_baseline(benchmark):
    benchmark.pedantic(_run, args=("-c", "pass"), rounds=15, iterations=1)


def test_cold_scaler_solve(benchmark):
    benchmark.pedantic(_run, args=("-m", "scaler_cli", "solve", "--flops", "10G"), rounds=15, iterations=1)
    assert benchmark.stats.stats.median < 1.0  # hard limit from the issue; the goal is 0.5 s
