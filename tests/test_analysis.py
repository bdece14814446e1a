"""Analyses on constructed data with known answers, and `scaler analyze` on a written benchmark."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from nares_files import record
from scipy.stats import kendalltau

from scaler_cli.app import main
from studies import analysis, benchmark


def test_pareto_front_of_a_known_set():
    cost = [1, 2, 2, 3, 4, 5, 5]
    acc = [10, 9, 12, 11, 15, 15, 14]
    # (1,10) (2,12) (4,15) are efficient; (2,9) (3,11) (5,15) (5,14) are dominated
    assert analysis.pareto_front(cost, acc).tolist() == [0, 2, 4]
    assert analysis.pareto_front([1, 2, 3], [3, 2, 1]).tolist() == [0]
    assert analysis.pareto_front([1, 2, 3], [1, 2, 3]).tolist() == [0, 1, 2]


def test_kendall_tau_is_plus_and_minus_one_on_monotone_data():
    x = np.arange(50.0)
    assert analysis.kendall_tau(x, 2 * x + 1) == pytest.approx(1.0)
    assert analysis.kendall_tau(x, -(x**3)) == pytest.approx(-1.0)
    assert np.isnan(analysis.kendall_tau(x, np.ones(50)))


@pytest.mark.parametrize("seed", range(5))
def test_kendall_tau_b_with_ties_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    x, y = rng.integers(0, 6, 300), rng.integers(0, 4, 300) + 0.1 * rng.integers(0, 2, 300)
    assert analysis.kendall_tau(x, y) == pytest.approx(kendalltau(x, y).statistic, abs=1e-12)


def test_stage_distribution_top_and_bottom_ten_percent():
    # 20 archs of total depth 12: the accurate ones put their depth in stage 1, the poor ones in stage 3
    stages, acc = [], []
    for i in range(20):
        stages.append([8, 2, 2] if i < 2 else [2, 2, 8] if i >= 18 else [4, 4, 4])
        acc.append(100 - i)
    stages.append([3, 3, 3])  # a lone architecture of total 9: skipped, nothing to rank
    acc.append(50)
    (out,) = analysis.stage_distribution(np.array(stages), np.array(acc, float), 0.1)
    assert out["total"] == 12 and out["n"] == 20 and out["k"] == 2
    assert out["top_share"] == pytest.approx([8 / 12, 2 / 12, 2 / 12])
    assert out["bottom_share"] == pytest.approx([2 / 12, 2 / 12, 8 / 12])
    assert out["top_mean"] == [8, 2, 2] and out["top_acc"] == 99.5


def test_rd_profile_finds_the_peak_of_a_quadratic():
    r = np.linspace(0.2, 0.8, 61)
    prof = analysis.rd_profile(r, 50 - 100 * (r - 0.55) ** 2, bins=6)
    assert prof["quadratic"]["peak_r_d"] == pytest.approx(0.55)
    assert sum(b["n"] for b in prof["bins"]) == 61
    assert analysis.r_d_of([[4, 4, 4]], [[8, 8, 8]]).tolist() == [pytest.approx(1 / 3)]


def _wrn_space(acc_of):
    """NARes-style records over a small grid, exact costs, accuracy from acc_of(depths, widths)."""
    from studies.synthetic import wrn_cost

    recs = []
    for d1, w1, d2, w2, d3, w3 in itertools.product((4, 5), (8, 10), (4, 5), (8, 10), (4, 5), (8, 10)):
        params, macs = wrn_cost((d1, w1, d2, w2, d3, w3))
        arch = dict(D1=d1, W1=w1, D2=d2, W2=w2, D3=d3, W3=w3)
        a = acc_of((d1, d2, d3), (w1, w2, w3))
        recs.append(record(arch, a - 15, test=a, macs=macs, params=params))
    return recs


def test_analyze_on_a_space_where_depth_alone_matters():
    bench = benchmark.from_records(_wrn_space(lambda d, w: 40 + sum(d) + 0.001 * w[0]))
    report = analysis.analyze(bench, "test_pgd_acc", budgets=[4e9, 5e9])
    assert report["kendall"]["total_depth"] > 0.9 and abs(report["kendall"]["total_width"]) < 0.2
    best = bench.metric("test_pgd_acc").argmax()
    assert report["best"]["arch"] == bench.arch(best)
    front = report["pareto_flops"]
    assert front[-1]["acc"] == bench.metric("test_pgd_acc").max()
    assert all(a["flops"] < b["flops"] and a["acc"] < b["acc"] for a, b in zip(front, front[1:]))
    assert [c["budget"] for c in report["rules"]] == [4e9, 5e9]
    for check in report["rules"]:
        assert [r["rule"] for r in check["rules"]] == ["robustscaling", "robustwrn", "uniform"]
        inside = bench.metric("macs") <= check["budget"]
        assert check["best"]["acc"] == bench.metric("test_pgd_acc")[inside].max()
        for rule in check["rules"]:
            assert rule["measured"]["flops"] <= check["budget"] and rule["gap"] >= 0


def test_budgets_nothing_fits_are_named_only_where_the_rules_apply():
    three = benchmark.from_records(_wrn_space(lambda d, w: 40 + sum(d)))
    acc = three.metric("test_pgd_acc")
    assert analysis.unfit_budgets(three, acc, [1e3, 5e9]) == [1e3]
    assert [c["budget"] for c in analysis.rule_check(three, acc, [1e3, 5e9])] == [5e9]
    two = benchmark.from_records([record({"D1": d, "W1": 8, "D2": d, "W2": 8}, 30.0 + d, macs=d * 1e9) for d in (4, 5)])
    assert analysis.rule_check(two, two.metric("test_pgd_acc"), [1e3]) == []
    assert analysis.unfit_budgets(two, two.metric("test_pgd_acc"), [1e3]) == []  # no rule check, not an unfit one


def test_cli_analyze_prints_every_table_and_json(capsys, tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _wrn_space(lambda d, w: 40 + sum(d) - 0.1 * sum(w))))
    assert main(["analyze", str(path), "--budgets", "4G,5G"]) == 0
    out = capsys.readouterr().out
    for heading in (
        "Pareto front",
        "Kendall tau-b",
        "Stage shares of total depth",
        "total width",
        "vs r_D",
        "Rule check",
    ):
        assert heading in out
    assert "no rule check" not in out
    assert main(["analyze", str(path), "--budgets", "1K,5G"]) == 0
    out = capsys.readouterr().out
    assert (
        "5.000G  best measured" in out and "no rule check at 1.000K FLOPs: no architecture with test_aa_acc fits" in out
    )
    assert main(["analyze", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["budgets_unfit"] == [] and data["cheapest_flops"] == min(r["MACs"] for r in _wrn_space(lambda d, w: 0))
    assert data["metric"] == "test_aa_acc" and data["kendall"]["total_width"] < 0
    assert main(["analyze", str(path), "--metric", "test_fgsm_acc"]) == 2
    assert "has no test_fgsm_acc values" in capsys.readouterr().err
