"""Study commands over measured architectures: search, analyze, plot, and the synthetic benchmark.

None of these import torch except `search --algo bananas` (its MLP ensemble, in the workers) and
`plot lipschitz` on a run directory; matplotlib only for `plot`.
"""

from __future__ import annotations

import json
from typing import Optional

import typer

from scaler.errors import ScalerError
from scaler_cli.app import app
from scaler_cli.output import table

SOURCE_HELP = "A NARes-format .jsonl file or a study directory."


@app.command()
def search(
    benchmark: str = typer.Argument(..., help=SOURCE_HELP),
    algo: str = typer.Option("evolution", help="random, local, evolution or bananas."),
    queries: int = typer.Option(500, help="Architectures each run may query (NARes: 500)."),
    runs: int = typer.Option(20, help="Independent runs (NARes: 400)."),
    seed: int = typer.Option(0, help="Seed of run 0; runs draw spawned seeds from it."),
    metric: str = typer.Option("val_pgd_acc", help="Objective: a validation or training metric."),
    workers: Optional[int] = typer.Option(None, help="Processes [default: one per CPU]."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Search a tabular benchmark with NARes's algorithms; report the best architecture of each run."""
    from studies.benchmark import load, objective_metric
    from studies.search import ALGOS, Problem, summarize
    from studies.search import search as run_search

    objective_metric(metric)  # refuse a test metric before loading anything
    if algo not in ALGOS:
        raise ScalerError(f"unknown --algo {algo!r}; choose one of {', '.join(ALGOS)}")
    if workers is not None and workers < 1:
        raise ScalerError("--workers must be >= 1")
    bench = load(benchmark)
    problem = Problem.from_benchmark(bench, metric)
    results = run_search(problem, algo, queries=queries, runs=runs, seed=seed, workers=workers)
    report = summarize(bench, metric, algo, results, queries=queries, seed=seed)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    _print_search(report)


def arch_label(arch: dict) -> str:
    """'d4-5-7 w8-10-16' for D1..W3 archs, 'key=value ...' otherwise."""
    d = [arch[k] for k in sorted(arch) if k[:1] == "D" and k[1:].isdigit()]
    w = [arch[k] for k in sorted(arch) if k[:1] == "W" and k[1:].isdigit()]
    if d and w and len(d) + len(w) == len(arch):
        return f"d{'-'.join(map(str, d))} w{'-'.join(map(str, w))}"
    return " ".join(f"{k}={v}" for k, v in arch.items())


def _print_search(r: dict) -> None:
    print(f"{r['algo']} on {r['benchmark']} ({r['records']} architectures): {r['runs']} runs x {r['queries']} queries")
    rows = []
    for e in r["per_run"]:
        arch = arch_label(e["best_arch"])
        aa = e["test"].get("test_aa_acc", e["test"].get("test_pgd_acc", float("nan")))
        rows.append([e["run"], arch, f"{e['best_objective']:.2f}", e["found_at"], f"{aa:.2f}"])
    last = "test AA" if "test_aa_acc" in r["mean_test"] else "test PGD"
    print(table(["run", "best arch", r["metric"], "found at", last], rows, right={0, 2, 3, 4}))
    print()
    std_obj = r["std_best_objective"]
    print(
        f"{r['metric']} (objective): {r['mean_best_objective']:.2f} +- {std_obj:.2f}  (optimum {r['optimum_objective']:.2f})"
    )
    rows = [
        [m, f"{r['mean_test'][m]:.2f} +- {r['std_test'][m]:.2f}", f"{r['optimum_test'][m]:.2f}"] for m in r["mean_test"]
    ]
    print(table(["test metric of the best found", "mean +- std", "optimum"], rows, right={1, 2}))


@app.command()
def synthetic(
    output: str = typer.Argument(..., help="The .jsonl file to write."),
    seed: int = typer.Option(0, help="Seed of the invented metrics."),
    epochs: int = typer.Option(100, help="Length of the per-epoch histories."),
    limit: Optional[int] = typer.Option(None, help="Keep only the N cheapest architectures."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Write a SYNTHETIC NARes-format benchmark (15,625 WRNs, exact costs, invented metrics)."""
    from studies import synthetic as synth

    if limit is not None and limit < 1:
        raise ScalerError("--limit must be >= 1")
    path = synth.write(output, synth.generate(seed, epochs, limit=limit), force=force)
    print(f"wrote {path} (synthetic: exact MACs/params, invented metrics; not measured)")
