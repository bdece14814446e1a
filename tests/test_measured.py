"""`scaler solve --rule measured --results SOURCE`: best measured within budget + a surrogate's pick."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
from nares_files import record

from scaler_cli.app import main
from studies.measured import solve_measured
from studies.synthetic import wrn_cost

CHOICES = ((4, 5, 7), (8, 10, 12))


def truth(arch) -> float:
    """Robustness that grows with depth and with the last stage's width: a smooth, learnable rule."""
    d1, w1, d2, w2, d3, w3 = arch
    return 40 + 0.8 * (d1 + d2 + d3) + 0.5 * w3 - 0.1 * w1


@pytest.fixture(scope="module")
def half_measured(tmp_path_factory):
    """729 archs, a seeded 300 of them 'measured' and written as NARes records."""
    archs = list(itertools.product(CHOICES[0], CHOICES[1], CHOICES[0], CHOICES[1], CHOICES[0], CHOICES[1]))
    rng = np.random.default_rng(0)
    measured = [archs[i] for i in rng.choice(len(archs), 300, replace=False)]
    lines = []
    for a in measured:
        params, macs = wrn_cost(a)
        arch = dict(zip(("D1", "W1", "D2", "W2", "D3", "W3"), a))
        lines.append(json.dumps(record(arch, truth(a) - 15, test=truth(a), macs=macs, params=params)))
    path = tmp_path_factory.mktemp("measured") / "half.jsonl"
    path.write_text("\n".join(lines))
    return path, archs, measured


def test_best_measured_and_a_useful_surrogate_pick(half_measured):
    path, archs, measured = half_measured
    budget = 6e9
    out = solve_measured(str(path), flops=str(int(budget)), metric="test_pgd_acc", epochs=200)
    fits = [a for a in measured if wrn_cost(a)[1] <= budget]
    best = max(fits, key=truth)
    got = out["best_measured"]
    assert tuple(got["arch"].values()) == best and got["test_pgd_acc"] == pytest.approx(truth(best))
    assert got["flops"] <= budget and out["measured_within"] == len(fits)
    s = out["surrogate"]
    assert s["held_out_kendall_tau"] > 0.6 and s["held_out"] == 60
    pick = tuple(s["best_predicted"]["arch"].values())
    assert pick not in measured and s["best_predicted"]["flops"] <= budget
    unmeasured = sorted((truth(a) for a in archs if a not in measured and wrn_cost(a)[1] <= budget), reverse=True)
    assert s["unmeasured_within"] == len(unmeasured)
    assert truth(pick) >= unmeasured[len(unmeasured) // 10]  # in the true top 10% of the candidates


def test_cli_measured_rule_and_its_errors(capsys, half_measured):
    path = str(half_measured[0])
    assert main(["solve", "--flops", "6G", "--rule", "measured", "--results", path, "--metric", "test_pgd_acc"]) == 0
    out = capsys.readouterr().out
    assert "measured    d" in out and "held-out Kendall tau" in out and "(not measured)" in out
    cases = [
        (["--rule", "measured"], "needs --results"),
        (["--results", path], "--results goes with --rule measured"),
        (["--rule", "measured", "--results", path, "--flops", "1G"], "no measured architecture"),
    ]
    for args, message in cases:
        args = args if "--flops" in args else [*args, "--flops", "6G"]
        assert main(["solve", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


def test_other_rules_import_no_studies_numpy_or_plotting():
    code = (
        "import sys; from scaler_cli.app import main; main(['solve', '--flops', '10G', '--json']); "
        "bad = [m for m in ('torch', 'matplotlib', 'pandas', 'numpy', 'studies.benchmark') if m in sys.modules]; "
        "assert not bad, bad"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
