"""Study commands over measured architectures: search, analyze, plot, and the synthetic benchmark.

None of these import torch except `search --algo bananas` (its MLP ensemble, in the workers),
`search --live` (training through the sweep engine on Ray) and `plot lipschitz` on a run
directory; matplotlib only for `plot`.
"""

from __future__ import annotations

import json
from typing import Optional

import typer

from scaler.errors import ScalerError
from scaler_cli.app import app
from scaler_cli.options import TRAIN_OPTIONS, force_flag, json_flag, quiet_flag, recipe_config, with_options
from scaler_cli.output import table

SOURCE_HELP = "A NARes-format .jsonl file or a study directory."
LIVE_TRAIN_OPTIONS = [o for o in TRAIN_OPTIONS if o.name != "seed"]  # --seed is the search's; trials use the default


def note_synthetic(bench) -> None:
    """Say on stderr, in one line, when a benchmark's metrics are invented (`scaler synthetic`)."""
    import sys

    if bench.synthetic_note:
        print(bench.synthetic_note, file=sys.stderr)


def arch_label(arch: dict) -> str:
    from studies.benchmark import arch_text

    return arch_text(arch)


@app.command()
@with_options(LIVE_TRAIN_OPTIONS, into="train_opts")
def search(
    benchmark: Optional[str] = typer.Argument(None, help=SOURCE_HELP + " Not with --live."),
    algo: str = typer.Option("evolution", help="random, local, evolution or bananas."),
    queries: int = typer.Option(500, help="Architectures each run may query (NARes: 500)."),
    runs: int = typer.Option(20, help="Independent runs (NARes: 400)."),
    seed: int = typer.Option(0, help="Seed of run 0; runs draw spawned seeds from it."),
    metric: str = typer.Option("val_pgd_acc", help="Objective: a validation or training metric."),
    workers: Optional[int] = typer.Option(None, help="Processes [default: one per CPU]."),
    live: Optional[str] = typer.Option(
        None, help="Search a space live (YAML file or nares, rrn-depth, ...): each query trains."
    ),
    out: Optional[str] = typer.Option(None, "--out", help="--live: the study directory (rerun to resume)."),
    recipe: Optional[str] = typer.Option(
        None, help="--live: published recipe: bat, nares, trades-paper or mart-paper."
    ),
    test_attacks: str = typer.Option("clean,fgsm,pgd20,cw40", help="--live: final test attacks of each trial."),
    test_n: Optional[int] = typer.Option(None, help="--live: test on the first N test points [default: all]."),
    address: Optional[str] = typer.Option(None, help="--live: Ray cluster (e.g. auto or HEAD:6379) [default: local]."),
    gpus_per_trial: Optional[float] = typer.Option(None, help="--live: GPUs per trial."),
    cpus_per_trial: float = typer.Option(1.0, help="--live: CPUs per trial."),
    max_concurrent: Optional[int] = typer.Option(None, help="--live: most trials at once."),
    retries: int = typer.Option(2, help="--live: retries of a failing trial."),
    quiet: bool = quiet_flag("No progress bars."),
    as_json: bool = json_flag(),
    train_opts: dict = None,
) -> None:
    """Search a tabular benchmark (or, with --live, a space trained on demand) with NARes's algorithms."""
    from studies.benchmark import objective_metric
    from studies.search import ALGOS

    objective_metric(metric)  # refuse a test metric before loading anything
    if algo not in ALGOS:
        raise ScalerError(f"unknown --algo {algo!r}; choose one of {', '.join(ALGOS)}")
    if workers is not None and workers < 1:
        raise ScalerError("--workers must be >= 1")
    if live is not None:
        if benchmark is not None:
            raise ScalerError("give a BENCHMARK file or --live SPACE, not both")
        sweep_opts = dict(test_attacks=test_attacks, test_n=test_n, address=address, gpus_per_trial=gpus_per_trial)
        sweep_opts.update(cpus_per_trial=cpus_per_trial, max_concurrent=max_concurrent, retries=retries, quiet=quiet)
        report = _live(live, out, algo, queries, runs, seed, metric, recipe, train_opts, sweep_opts)
    else:
        if benchmark is None:
            raise ScalerError(
                "give a BENCHMARK file (NARes-format .jsonl or a study directory), or --live SPACE --out DIR"
            )
        given = [k for k, v in train_opts.items() if v is not None]
        if out or recipe or given:
            raise ScalerError("--out, --recipe and training options go with --live SPACE")
        report = _tabular(benchmark, algo, queries, runs, seed, metric, workers, progress=not quiet)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    _print_search(report)


def _tabular(benchmark, algo, queries, runs, seed, metric, workers, progress: bool) -> dict:
    from studies.benchmark import load
    from studies.search import Problem, summarize
    from studies.search import search as run_search

    bench = load(benchmark)
    problem = Problem.from_benchmark(bench, metric)
    results = run_search(problem, algo, queries=queries, runs=runs, seed=seed, workers=workers, progress=progress)
    report = summarize(bench, metric, algo, results, queries=queries, seed=seed)
    note_synthetic(bench)  # once the search stands: an error stays the only line
    return report


def _live(space_ref, out, algo, queries, runs, seed, metric, recipe, train_opts, o) -> dict:
    import sys

    from scaler.interrupts import stop_on_sigterm
    from studies.benchmark import load
    from studies.live import live_search, remap
    from studies.search import summarize
    from studies.spaces import load_space
    from studies.sweep import SweepOptions
    from trainers.evaluation import parse_attacks

    if not out:
        raise ScalerError("--live needs the study directory: --out DIR")
    if queries < 1 or runs < 1:
        raise ScalerError("--queries and --runs must be >= 1")
    space = load_space(space_ref)
    cfg = recipe_config(train_opts, recipe)
    options = SweepOptions(
        test_attacks=tuple(parse_attacks(o["test_attacks"])),
        test_n=o["test_n"],
        address=o["address"],
        cpus_per_trial=o["cpus_per_trial"],
        gpus_per_trial=o["gpus_per_trial"],
        max_concurrent=o["max_concurrent"],
        retries=o["retries"],
        progress=not o["quiet"],
    )
    announce = None if o["quiet"] else (lambda line: print(line, file=sys.stderr))
    how = dict(algo=algo, queries=queries, runs=runs, seed=seed, metric=metric, announce=announce)
    try:
        with stop_on_sigterm():  # as `scaler sweep`: SIGTERM stops like Ctrl-C
            results, study, archs = live_search(space, out, cfg, options, **how)
    except KeyboardInterrupt as exc:
        if str(exc):  # the sweep's "stopped: ..." line
            print(str(exc), file=sys.stderr)
        raise
    bench = load(out)
    report = summarize(bench, metric, algo, remap(results, archs, bench), queries=queries, seed=seed)
    report.update(live=space.name, space_size=len(space), trained=study.trained, failed=study.failed)
    return report


def _print_search(r: dict) -> None:
    if "live" in r:
        print(
            f"{r['algo']} live on {r['live']} ({r['space_size']} architectures) into {r['benchmark']}: "
            f"{r['records']} measured, {r['trained']} trained by this command, {len(r['failed'])} failed"
        )
    else:
        print(
            f"{r['algo']} on {r['benchmark']} ({r['records']} architectures): {r['runs']} runs x {r['queries']} queries"
        )
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
    force: bool = force_flag(),
) -> None:
    """Write a SYNTHETIC NARes-format benchmark (15,625 WRNs, exact costs, invented metrics)."""
    from studies import synthetic as synth

    if limit is not None and limit < 1:
        raise ScalerError("--limit must be >= 1")
    path = synth.write(output, synth.generate(seed, epochs, limit=limit), force=force)
    print(f"wrote {path} (synthetic: exact MACs/params, invented metrics; not measured)")


def _budget_list(text: str | None):
    if text is None:
        return None
    from scaler.parsing import parse_budget

    return [parse_budget(t.strip(), "--budgets") for t in text.split(",") if t.strip()]


@app.command()
def analyze(
    source: str = typer.Argument(..., help=SOURCE_HELP),
    metric: Optional[str] = typer.Option(None, help="Robust accuracy [default: test_aa_acc, else test_pgd_acc, ...]."),
    budgets: Optional[str] = typer.Option(
        None, help="FLOPs budgets of the rule check, e.g. 5G,10G [default: 5G..40G in range]."
    ),
    top: int = typer.Option(10, help="Pareto rows to print per front (all with --json)."),
    as_json: bool = json_flag(),
) -> None:
    """Pareto fronts, Kendall tau, stage distributions, accuracy vs r_D and the rule check."""
    from studies.analysis import analyze as run_analysis
    from studies.benchmark import load

    bench = load(source)
    report = run_analysis(bench, metric, _budget_list(budgets))
    note_synthetic(bench)  # once the analysis stands: an error stays the only line
    if as_json:
        print(json.dumps(report, indent=2))
        return
    _print_analysis(report, top)


def _fmt(x: float) -> str:
    from scaler.parsing import format_count

    return format_count(int(x))


def _print_analysis(r: dict, top: int) -> None:
    m = r["metric"]
    b = r["best"]
    synthetic = " (SYNTHETIC: invented metrics, not measured)" if r.get("synthetic_records") else ""
    print(f"{r['source']}: {r['records']} architectures{synthetic}; robust accuracy = {m}")
    print(f"best: {arch_label(b['arch'])}  {m} {b['acc']:.2f}  ({_fmt(b['flops'])} FLOPs, {_fmt(b['params'])} params)")
    for key, label in (("pareto_flops", "FLOPs"), ("pareto_params", "params")):
        front = r[key]
        print(f"\nPareto front: {m} vs {label} ({len(front)} architectures; the {min(top, len(front))} most accurate)")
        rows = [[arch_label(e["arch"]), _fmt(e["flops"]), _fmt(e["params"]), f"{e['acc']:.2f}"] for e in front[-top:]]
        print(table(["arch", "FLOPs", "params", m], rows, right={1, 2, 3}))
    print(f"\nKendall tau-b against {m}")
    print(table(["quantity", "tau"], [[k.replace("_", " "), f"{v:+.3f}"] for k, v in r["kendall"].items()], right={1}))
    _print_stages(r, m)
    _print_r_d(r["r_d"], m)
    if r["rules"]:
        _print_rule_check(r["rules"], m)
    if r["budgets_unfit"]:
        budgets = ", ".join(_fmt(b) for b in r["budgets_unfit"])
        print(
            f"\nno rule check at {budgets} FLOPs: no architecture with {m} fits "
            f"(the cheapest measured has {_fmt(r['cheapest_flops'])})"
        )


def _print_stages(r: dict, m: str) -> None:
    frac = round(r["stages"]["fraction"] * 100)
    for kind, letter in (("depth", "D"), ("width", "W")):
        print(f"\nStage shares of total {kind}: top {frac}% vs bottom {frac}% by {m}")
        rows = [
            [
                f"{e['total']:g}",
                e["n"],
                ":".join(f"{s:.2f}" for s in e["top_share"]),
                ":".join(f"{s:.2f}" for s in e["bottom_share"]),
                f"{e['top_acc']:.2f}",
                f"{e['bottom_acc']:.2f}",
            ]
            for e in r["stages"][kind]
        ]
        share = f"{letter}1:{letter}2:{letter}3"
        headers = [f"total {kind}", "n", f"top {share}", f"bottom {share}", "top acc", "bottom acc"]
        print(table(headers, rows, right={0, 1, 4, 5}))


def _print_r_d(rd: dict, m: str) -> None:
    print(f"\n{m} vs r_D = sum D / (sum D + sum W)")
    rows = [[f"{e['lo']:.3f}-{e['hi']:.3f}", e["n"], f"{e['mean']:.2f}", f"{e['max']:.2f}"] for e in rd["bins"]]
    print(table(["r_D", "n", "mean", "max"], rows, right={1, 2, 3}))
    q = rd["quadratic"]
    if q:
        peak = f"peak at r_D {q['peak_r_d']:.3f}" if q["peak_r_d"] is not None else "no interior peak"
        print(
            f"quadratic fit: {q['a']:.1f} r^2 + {q['b']:.1f} r + {q['c']:.1f} ({peak}); best arch at r_D {rd['best_r_d']:.3f}"
        )


def _print_rule_check(rules: list, m: str) -> None:
    print("\nRule check: each rule's solution (or its nearest measured architecture) vs the best within the budget")
    rows = []
    for e in rules:
        rows.append(
            [_fmt(e["budget"]), "best measured", arch_label(e["best"]["arch"]), f"{e['best']['acc']:.2f}", "-", "1"]
        )
        for s in e["rules"]:
            if "error" in s:
                rows.append(["", s["rule"], s["error"], "-", "-", "-"])
                continue
            where = "" if s["in_space"] else "~"
            measured = f"{where}{arch_label(s['measured']['arch'])}"
            rank = f"{s['rank_within']}/{e['measured_within']}"
            rows.append(["", s["rule"], measured, f"{s['measured']['acc']:.2f}", f"{s['gap']:+.2f}", rank])
    print(table(["budget", "rule", "arch (~: nearest measured)", m, "gap", "rank"], rows, right={3, 4, 5}))


def _arch_list(texts: list[str] | None):
    """--arch D1=4,W1=8,... (repeatable) into arch dicts."""
    out = []
    for text in texts or []:
        try:
            out.append({k.strip(): int(v) for k, v in (kv.split("=") for kv in text.split(","))})
        except ValueError:
            raise ScalerError(f"--arch {text!r}: write it as D1=4,W1=8,D2=4,W2=8,D3=4,W3=8") from None
    return out


@app.command()
def plot(
    kind: str = typer.Argument(..., help="pareto, curves, rd, stages or lipschitz."),
    source: str = typer.Argument(
        ..., help=SOURCE_HELP + " curves: also a run directory; lipschitz: a run directory or eval JSON."
    ),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="Image file: .png, .svg or .pdf."),
    metric: Optional[str] = typer.Option(None, help="Robust accuracy [default: test_aa_acc, else test_pgd_acc, ...]."),
    budgets: Optional[str] = typer.Option(None, help="pareto: FLOPs budgets whose rule solutions are marked."),
    arch: Optional[list[str]] = typer.Option(None, help="curves: an arch to draw, D1=4,W1=8,... (repeatable)."),
    n: int = typer.Option(256, help="lipschitz on a run: test points attacked."),
    device: str = typer.Option("auto", help="lipschitz on a run: auto, cpu or cuda."),
    force: bool = force_flag("Overwrite an existing image."),
    quiet: bool = quiet_flag("lipschitz on a run: no progress bar or checkpoint line."),
) -> None:
    """Draw one of the seeds' figures from a benchmark, a study or a run."""
    from studies import plots

    if kind not in plots.KINDS:
        raise ScalerError(f"unknown plot {kind!r}; choose one of {', '.join(plots.KINDS)}")
    if not output:
        raise ScalerError("give the image file with -o FILE.png (or .svg, .pdf)")
    plots.image_format(output)
    if n < 1:
        raise ScalerError("--n must be >= 1")
    bench = None
    if kind == "curves" and plots.is_run(source):
        fig = plots.curves(source, metric, _arch_list(arch))
    elif kind == "lipschitz":
        import sys

        announce = None if quiet else (lambda line: print(line, file=sys.stderr))
        fig = plots.lipschitz(source, n, device, progress=not quiet, announce=announce)
    else:
        from studies.benchmark import load

        bench = load(source)
        if kind == "curves":
            fig = plots.curves(bench, metric, _arch_list(arch))
        elif kind == "pareto":
            fig = plots.pareto(bench, metric, _budget_list(budgets))
        elif kind == "rd":
            fig = plots.rd(bench, metric)
        else:
            fig = plots.stages(bench, metric)
    path = plots.save(fig, output, force=force)
    if bench is not None:
        note_synthetic(bench)
    print(f"wrote {path}")
