"""The benchmark reader and the four NARes search algorithms on files the tests write."""

from __future__ import annotations

import json

import numpy as np
import pytest
from nares_files import KEYS, OPTIMUM, record, write_grid

from scaler.errors import ScalerError
from scaler_cli.app import main
from studies import benchmark, search
from studies.search import Problem, Settings

FAST_BANANAS = Settings(bananas_epochs=60, bananas_candidates=60)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    return write_grid(tmp_path_factory.mktemp("bench") / "grid.jsonl")


@pytest.fixture(scope="module")
def bench(grid):
    return benchmark.load(grid)


@pytest.fixture(scope="module")
def problem(bench):
    return Problem.from_benchmark(bench, "val_pgd_acc")


# ------------------------------------------------------------------------ reader
def test_reader_queries_by_arch_and_reads_the_best_epoch(bench):
    assert len(bench) == 1728 and bench.keys == KEYS
    arch = dict(zip(KEYS, OPTIMUM))
    rec = bench.query(arch)
    assert rec["arch"] == arch
    assert bench.query(OPTIMUM) == rec  # a tuple in key order works too
    assert bench.objective(arch) == rec["train"][0]["pgd"][1]  # index best_epoch=1, not the last or first
    row = bench.row(arch)
    assert bench.metric("val_cw_acc")[row] == rec["train"][0]["cw"][1]
    assert bench.metric("test_aa_acc")[row] == rec["test_best"][0]["Linf_aa_acc"]
    assert np.isnan(bench.metric("test_fgsm_acc")).all()  # absent from these records: NaN, not an error


def test_get_metric_names_follow_the_nares_api():
    rec = record({"D1": 4}, 30.0, train_loss=0.5, val_acc=70.0)
    rec["test_best"][0]["corruptions"] = {"fog": {"1": {"acc": 80.0}, "2": {"acc": 70.0}}, "snow": {"1": {"acc": 60.0}}}
    assert benchmark.get_metric(rec, "val_pgd_acc") == 30.0
    assert benchmark.get_metric(rec, "val_clean_acc") == 70.0
    assert benchmark.get_metric(rec, "train_loss") == 0.5
    assert benchmark.get_metric(rec, "test_corrupt_acc") == pytest.approx(70.0)
    assert benchmark.get_metric(rec, "macs") == 1e9 and benchmark.get_metric(rec, "best_epoch") == 1
    with pytest.raises(ScalerError, match="unknown metric"):
        benchmark.get_metric(rec, "val_pgd")
    rec["test_best"][0]["corruptions"] = None  # a study that did not measure corruptions writes null
    assert np.isnan(benchmark.get_metric(rec, "test_corrupt_acc"))


@pytest.mark.parametrize("metric", ["test_aa_acc", "test_pgd_acc", "test_clean_acc"])
def test_objective_refuses_test_metrics(bench, metric):
    with pytest.raises(ScalerError, match="is a test metric") as exc:
        bench.objective(OPTIMUM, metric)
    assert "\n" not in str(exc.value)


def test_an_unknown_objective_lists_only_what_a_search_may_optimise():
    with pytest.raises(ScalerError, match="a search optimises one of train_acc") as exc:
        benchmark.objective_metric("val_pgd")
    assert "val_cw_acc" in str(exc.value) and "test_" not in str(exc.value) and "macs" not in str(exc.value)


def test_reader_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(record({"D1": 4}, 1.0)) + "\n{oops\n")
    with pytest.raises(ScalerError, match=r"bad.jsonl:2: not JSON"):
        benchmark.load(bad)
    dup = tmp_path / "dup.jsonl"
    dup.write_text((json.dumps(record({"D1": 4}, 1.0)) + "\n") * 2)
    with pytest.raises(ScalerError, match="appears twice"):
        benchmark.load(dup)
    with pytest.raises(ScalerError, match="not found"):
        benchmark.load(tmp_path / "missing.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ScalerError, match="no records"):
        benchmark.load(empty)
    with pytest.raises(ScalerError, match="not in"):
        benchmark.from_records([record({"D1": 4}, 1.0)]).query({"D1": 5})


def test_in_memory_records_equal_the_file(grid, bench):
    recs = [json.loads(line) for line in grid.read_text().splitlines()]
    mem = benchmark.from_records(recs)
    assert np.array_equal(mem.archs, bench.archs)
    assert np.array_equal(mem.metric("val_pgd_acc"), bench.metric("val_pgd_acc"))


# ------------------------------------------------------------------------ search
def test_same_seed_same_result_whatever_the_workers(problem):
    a = search.search(problem, "evolution", queries=60, runs=4, seed=3, workers=1)
    b = search.search(problem, "evolution", queries=60, runs=4, seed=3, workers=2)
    c = search.search(problem, "evolution", queries=60, runs=4, seed=4, workers=1)
    assert [r["order"] for r in a] == [r["order"] for r in b]
    assert [r["order"] for r in a] != [r["order"] for r in c]


def test_progress_shows_a_bar_over_the_runs_and_changes_nothing(problem, capsys, monkeypatch):
    quiet = search.search(problem, "evolution", queries=60, runs=3, seed=3, workers=2)
    capsys.readouterr()
    shown = search.search(problem, "evolution", queries=60, runs=3, seed=3, workers=2, progress=True)
    assert [r["order"] for r in quiet] == [r["order"] for r in shown]
    assert "search evolution:" in capsys.readouterr().err

    class Bar:
        n, closed = 0, False

        def update(self, k):
            self.n += k

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.closed = True

    for workers in (1, 2):
        bar = Bar()
        monkeypatch.setattr(search, "_bar", lambda runs, algo, progress, bar=bar: bar)
        search.search(problem, "random", queries=20, runs=3, seed=0, workers=workers, progress=True)
        assert bar.n == 3 and bar.closed


def test_random_search_samples_without_replacement(problem):
    (r,) = search.search(problem, "random", queries=100, runs=1, seed=0)
    assert len(r["order"]) == len(set(r["order"])) == 100
    (whole,) = search.search(problem, "random", queries=5000, runs=1, seed=0)
    assert whole["queries"] == 1728 and whole["best_row"] == int(np.argmax(problem.values))


def test_local_search_reaches_local_optima_and_restarts(problem):
    (r,) = search.search(problem, "local", queries=400, runs=1, seed=1)
    assert r["restarts"] >= 2 and len(r["local_optima"]) == r["restarts"]
    for row in r["local_optima"]:
        assert all(problem.values[n] <= problem.values[row] for n in problem.neighbours(row))
    assert len(set(r["local_optima"])) >= 2 or r["local_optima"][0] == int(np.argmax(problem.values))
    # the first queries climb: every move after the start improves the objective
    first_opt = r["order"].index(r["local_optima"][0])
    assert problem.values[r["local_optima"][0]] >= problem.values[r["order"][0]]
    assert first_opt > 0


def test_evolution_finds_the_known_optimum_with_enough_queries(problem, bench):
    runs = search.search(problem, "evolution", queries=400, runs=4, seed=0)
    best = bench.row(OPTIMUM)
    assert sum(r["best_row"] == best for r in runs) >= 3


def _mean_best(problem, algo, settings=Settings(), runs=16, queries=60):
    res = search.search(problem, algo, queries=queries, runs=runs, seed=11, workers=2, settings=settings)
    assert all(r["queries"] == queries for r in res)
    return float(np.mean([r["best_value"] for r in res]))


def test_evolution_and_bananas_beat_random_at_equal_queries(problem):
    rnd = _mean_best(problem, "random")
    assert _mean_best(problem, "evolution") > rnd + 0.3
    assert _mean_best(problem, "bananas", FAST_BANANAS, runs=8) > rnd + 0.3


def test_search_only_queries_measured_architectures(tmp_path):
    skip = {OPTIMUM, (4, 8, 4, 8, 4, 8)}
    bench = benchmark.load(write_grid(tmp_path / "sparse.jsonl", skip=skip))
    problem = Problem.from_benchmark(bench, "val_pgd_acc")
    assert len(problem.rows) == 1726
    for algo in ("local", "evolution"):
        (r,) = search.search(problem, algo, queries=200, runs=1, seed=0)
        assert all(0 <= row < len(bench) for row in r["order"])


def test_losses_are_minimised(bench):
    p = Problem.from_benchmark(bench, "val_pgd_acc")
    q = Problem.from_benchmark(benchmark.from_records([record({"D1": 4}, 1.0, val_loss=2.0)]), "val_loss")
    assert q.values[0] == -2.0 and p.values.max() == bench.metric("val_pgd_acc").max()


# ------------------------------------------------------------------------ CLI
def test_cli_search_json(capsys, grid):
    code = main(["search", str(grid), "--algo", "evolution", "--queries", "50", "--runs", "3", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    for key in ("mean_best_objective", "std_best_objective", "mean_test", "per_run", "optimum_objective"):
        assert key in out
    assert len(out["per_run"]) == 3 and out["runs"] == 3
    run0 = out["per_run"][0]
    assert set(run0["best_arch"]) == set(KEYS) and run0["best_objective"] <= out["optimum_objective"]
    assert out["mean_best_objective"] == pytest.approx(np.mean([r["best_objective"] for r in out["per_run"]]))
    assert out["mean_test"]["test_aa_acc"] == pytest.approx(np.mean([r["test"]["test_aa_acc"] for r in out["per_run"]]))


def test_cli_search_table(capsys, grid):
    assert main(["search", str(grid), "--algo", "local", "--queries", "40", "--runs", "2"]) == 0
    out = capsys.readouterr().out
    assert "d7-5-4 w10-12-14" in out or "best arch" in out
    assert "test_aa_acc" in out and "val_pgd_acc (objective)" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--metric", "test_aa_acc"], "test_aa_acc is a test metric"),
        (["--algo", "hillclimb"], "unknown --algo"),
        (["--queries", "0"], "--queries and --runs must be >= 1"),
    ],
)
def test_cli_search_refuses_bad_input_in_one_line(capsys, grid, args, message):
    code = main(["search", str(grid), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_a_study_directory_is_read_through_studies_results(monkeypatch, tmp_path):
    import sys
    import types

    recs = [record({"D1": d, "W1": 8}, 30.0 + d) for d in (4, 5, 7)]
    seen = []
    fake = types.ModuleType("studies.results")
    fake.load_records = lambda path: seen.append(path) or recs
    monkeypatch.setitem(sys.modules, "studies.results", fake)
    bench = benchmark.load(tmp_path)
    assert seen == [tmp_path] and len(bench) == 3
    assert bench.objective({"D1": 7, "W1": 8}) == 37.0 and bench.query((5, 8)) is recs[1]


def test_surrogate_fit_sets_its_threads_and_restores_them(monkeypatch):
    """A fit runs on the threads it is given (1 for searches, torch's own for the measured rule)
    and leaves the process's setting as it was (it used to pin the whole process to one thread)."""
    import torch

    from studies import surrogate

    seen = []
    real = surrogate._forward
    monkeypatch.setattr(surrogate, "_forward", lambda w, h: seen.append(torch.get_num_threads()) or real(w, h))
    x = surrogate.encode(np.array([[0, 1], [1, 0], [2, 2], [1, 1]]), (3, 3))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        surrogate.fit(x, np.arange(4.0), epochs=2)
        assert set(seen) == {1} and torch.get_num_threads() == 2
        seen.clear()
        surrogate.fit(x, np.arange(4.0), epochs=2, threads=None)
        assert set(seen) == {2} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_surrogate_adam_step_is_torch_adams_update(weight_decay):
    """fit's own Adam (kept off torch.optim, whose import of torch._dynamo costs seconds) makes
    torch.optim.Adam's updates, its L2 weight decay included (0.1: far above the tolerance), step
    after step; and fitting leaves torch._dynamo unimported."""
    import subprocess
    import sys

    import torch

    from studies.surrogate import adam_step

    gen = torch.Generator().manual_seed(0)
    ours = [torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen)]
    theirs = [p.clone().requires_grad_() for p in ours]
    opt = torch.optim.Adam(theirs, lr=0.01, weight_decay=weight_decay)
    state = [(torch.zeros_like(p), torch.zeros_like(p)) for p in ours]
    for step in range(1, 6):
        grads = [torch.randn(p.shape, generator=gen) for p in ours]
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        opt.step()
        adam_step(ours, grads, state, step, lr=0.01, weight_decay=weight_decay)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-7)
    if weight_decay:
        return
    code = (
        "import sys, numpy as np; from studies import surrogate; "
        "surrogate.fit(np.eye(4, dtype=np.float32), np.arange(4.0), epochs=2); "
        "print('torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
