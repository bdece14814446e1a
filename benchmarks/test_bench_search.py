"""Benchmarks for search on a full-size (SYNTHETIC) NARes-format file (run: python -m pytest benchmarks -q).

The issue's bar: `scaler search FILE.jsonl --algo evolution --queries 200 --runs 20 --seed 0 --json` on
15,625 records finishes in under a minute and beats `--algo random` on mean_best_objective. The
file is written once per session by `studies.synthetic` (exact costs, invented metrics).
"""

import json
import subprocess
import sys
import time

import pytest

from studies import benchmark as bench_mod
from studies.synthetic import generate, write


@pytest.fixture(scope="module")
def nares_file(tmp_path_factory):
    return write(tmp_path_factory.mktemp("nares") / "synthetic_nares.jsonl", generate(seed=0))


def test_load_full_file(benchmark, nares_file):
    bench = benchmark.pedantic(bench_mod.load, args=(nares_file,), rounds=1, iterations=1)
    assert len(bench) == 15_625


def _search(path, algo):
    args = ["search", str(path), "--algo", algo, "--queries", "200", "--runs", "20", "--seed", "0", "--json"]
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "scaler_cli", *args], capture_output=True, text=True, check=True)
    return json.loads(res.stdout), time.perf_counter() - t0


def test_evolution_cli_under_a_minute_and_beats_random(benchmark, nares_file):
    evo, seconds = benchmark.pedantic(_search, args=(nares_file, "evolution"), rounds=1, iterations=1)
    rnd, _ = _search(nares_file, "random")
    assert seconds < 60, f"evolution took {seconds:.1f}s"
    assert evo["mean_best_objective"] > rnd["mean_best_objective"]
