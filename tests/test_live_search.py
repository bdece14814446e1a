"""`scaler search --live`: queries train through the sweep engine (digits, session Ray with 2 CPUs);
measured architectures are read back from the study, so a rerun trains nothing and a larger budget
trains only the new queries."""

from __future__ import annotations

import json

import pytest

from scaler_cli.app import main
from studies.results import load_records

TINY = ["--dataset", "digits", "--epochs", "1", "--attack-steps", "1", "--val-n", "32", "--batch-size", "256"]
TEST = ["--test-n", "64", "--test-attacks", "clean,pgd20", "--quiet", "--json"]


def live(capsys, space, study, algo, queries):
    capsys.readouterr()
    args = ["search", "--live", str(space), "--out", str(study), "--algo", algo, "--queries", str(queries)]
    rc = main([*args, "--runs", "1", "--seed", "0", *TINY, *TEST])
    out = capsys.readouterr().out
    assert rc == 0, out
    return json.loads(out[out.index("{\n") :])


@pytest.mark.slow
def test_live_search_trains_each_query_once_and_resumes(ray_local, tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("block: basic\ndepths: [[1, 2], 1, [1, 2]]\nwidths: [[1, 2], 1, 1]\n")
    study = tmp_path / "study"

    first = live(capsys, space, study, "random", 3)
    assert first["trained"] == 3 and first["records"] == 3 and first["space_size"] == 8
    run = first["per_run"][0]
    assert run["queries"] == 3 and set(run["best_arch"]) == {"D1", "W1", "D2", "W2", "D3", "W3"}
    ids = {r["arch_id"] for r in load_records(study)}
    assert len(ids) == 3 and run["best_arch_id"] in ids
    best_val = max(r["train"][0]["pgd"][r["train"][0]["best_epoch"]] for r in load_records(study))
    assert run["best_objective"] == pytest.approx(best_val)
    mtimes = {p: p.stat().st_mtime_ns for p in (study / "trials").rglob("*.pt")}

    again = live(capsys, space, study, "random", 3)  # same command: read back, nothing trained
    assert again["trained"] == 0 and again["per_run"] == first["per_run"]
    assert {p: p.stat().st_mtime_ns for p in (study / "trials").rglob("*.pt")} == mtimes

    more = live(capsys, space, study, "random", 5)  # a larger budget trains only the 2 new queries
    assert more["trained"] == 2 and more["records"] == 5
    assert more["per_run"][0]["best_objective"] >= run["best_objective"]

    # the study is a SOURCE like a benchmark file: analyses and plots read it
    capsys.readouterr()
    assert main(["analyze", str(study)]) == 0
    out = capsys.readouterr().out
    assert "5 architectures; robust accuracy = test_pgd_acc" in out and "Kendall tau-b against test_pgd_acc" in out
    assert main(["plot", "pareto", str(study), "-o", str(tmp_path / "front.png")]) == 0
    assert (tmp_path / "front.png").read_bytes().startswith(b"\x89PNG")


def test_live_search_refuses_bad_combinations_in_one_line(capsys, tmp_path):
    cases = [
        (["search", "--live", "nares"], "--live needs the study directory"),
        (["search", "x.jsonl", "--live", "nares", "--out", "s"], "not both"),
        (["search", "x.jsonl", "--epochs", "3"], "go with --live"),
        (["search"], "give a BENCHMARK file"),
    ]
    for args, message in cases:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
