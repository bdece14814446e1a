"""Study commands: space (no torch, no ray), sweep (Ray), results (pandas, no torch)."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from scaler.errors import ScalerError
from scaler.parsing import format_count
from scaler_cli.app import app
from scaler_cli.options import TRAIN_OPTIONS, force_flag, json_flag, quiet_flag, recipe_config, with_options
from scaler_cli.output import fmt_list, table

SAMPLE_HELP = "Draw a seeded subset of N architectures (ids kept)."


def _load(space_ref: str, sample: int | None, seed: int):
    from studies.spaces import load_space

    space = load_space(space_ref)
    return space, (space.sample(sample, seed) if sample is not None else space)


@app.command()
def space(
    space_ref: str = typer.Argument(
        ..., metavar="SPACE", help="A YAML space file, or nares, rrn-depth, rrn-width, rd-<budget>."
    ),
    as_json: bool = json_flag("one JSON object with every architecture"),
    count_only: bool = typer.Option(False, "--count", help="Print the summary line only."),
    sample: Optional[int] = typer.Option(None, "--sample", help=SAMPLE_HELP),
    seed: int = typer.Option(0, "--seed", help="Seed of --sample."),
) -> None:
    """List a design space: every architecture with its id and exact params/FLOPs."""
    from studies.spaces import dumps

    full, chosen = _load(space_ref, sample, seed)
    if as_json:
        print(dumps(chosen))
        return
    params = [a.params for a in chosen.archs]
    flops = [a.flops for a in chosen.archs]
    of = f" (sampled from {len(full):,}, seed {seed})" if sample is not None else ""
    print(
        f"{chosen.name}: {len(chosen):,} architectures{of}; params {format_count(min(params))}..{format_count(max(params))}, "
        f"FLOPs {format_count(min(flops))}..{format_count(max(flops))}"
    )
    if count_only:
        return
    tagged = any("r_d" in a.tags for a in chosen.archs)
    rows = [
        [
            a.arch_id,
            a.spec.block,
            fmt_list(a.spec.depths),
            fmt_list(a.spec.widths),
            a.spec.activation,
            f"{a.params:,}",
            format_count(a.flops),
        ]
        + ([f"{a.tags['r_d']:.3f}"] if tagged else [])
        for a in chosen.archs
    ]
    headers = ["id", "block", "depths", "widening", "act", "params", "FLOPs"] + (["r_D"] if tagged else [])
    print(table(headers, rows, right={0, 5, 6, 7}))


@app.command()
@with_options(TRAIN_OPTIONS, into="train_opts")
def sweep(
    space_ref: str = typer.Argument(
        ..., metavar="SPACE", help="A YAML space file, or nares, rrn-depth, rrn-width, rd-<budget>."
    ),
    out: Optional[str] = typer.Option(None, "--out", help="Study directory: results.sqlite and trials/<arch-id>/."),
    recipe: Optional[str] = typer.Option(None, help="Published recipe: bat, nares, trades-paper or mart-paper."),
    test_attacks: str = typer.Option(
        "clean,fgsm,pgd20,cw40", help="Final test of best.pt, from clean,fgsm,pgd20,cw40,aa,aa-compact."
    ),
    test_n: Optional[int] = typer.Option(None, help="Test on the first N test points [default: all]."),
    address: Optional[str] = typer.Option(
        None, help="Ray cluster to use (e.g. auto or HEAD:6379) [default: a local Ray]."
    ),
    gpus_per_trial: Optional[float] = typer.Option(
        None,
        help="GPUs per trial; 0.25 runs four small trials on each GPU [default: 1 where the cluster has GPUs, else 0].",
    ),
    cpus_per_trial: float = typer.Option(1.0, help="CPUs per trial (also its torch threads)."),
    max_concurrent: Optional[int] = typer.Option(None, help="Most trials at once [default: what the resources hold]."),
    retries: int = typer.Option(2, help="Retries of a failing trial before it is recorded as failed."),
    sample: Optional[int] = typer.Option(None, "--sample", help=SAMPLE_HELP),
    sample_seed: int = typer.Option(0, "--sample-seed", help="Seed of --sample."),
    quiet: bool = quiet_flag(),
    as_json: bool = json_flag("the summary as one JSON object"),
    train_opts: dict = None,
) -> None:
    """Train and test every architecture of a space on Ray; results go to STUDY/results.sqlite."""
    from scaler.interrupts import stop_on_sigterm
    from studies.sweep import SweepOptions
    from studies.sweep import sweep as run_sweep
    from trainers.evaluation import parse_attacks

    if not out:
        raise ScalerError("give the study directory with --out DIR")
    if train_opts.get("init_from") is not None:
        raise ScalerError("--init-from fine-tunes one model; a sweep trains every architecture from scratch")
    full, chosen = _load(space_ref, sample, sample_seed)
    cfg = recipe_config(train_opts, recipe)
    options = SweepOptions(
        test_attacks=tuple(parse_attacks(test_attacks)),
        test_n=test_n,
        address=address,
        cpus_per_trial=cpus_per_trial,
        gpus_per_trial=gpus_per_trial,
        max_concurrent=max_concurrent,
        retries=retries,
        progress=not quiet,
    )
    announce = None if quiet else (lambda line: print(line, file=sys.stderr))
    try:
        with stop_on_sigterm():  # SLURM and schedulers stop jobs with SIGTERM: stop as on Ctrl-C
            summary = run_sweep(full, out, cfg, options, arch_ids=[a.arch_id for a in chosen.archs], announce=announce)
    except KeyboardInterrupt as exc:
        if str(exc):
            print(str(exc), file=sys.stderr)
        raise
    _print_summary(summary, as_json)
    if summary.failed:
        raise typer.Exit(1)  # scripts notice; the other trials' results are stored


def _print_summary(summary, as_json: bool) -> None:
    """A sweep's summary: one JSON object, or a line and each failed trial's error."""
    if as_json:
        print(json.dumps(summary.to_dict(), indent=2))
        return
    print(
        f"{summary.study}: {summary.complete} trials completed, {summary.failed} failed, "
        f"{summary.skipped} already complete, {summary.pending} left, in {summary.seconds:.1f}s"
    )
    for arch_id, line in summary.errors.items():
        print(f"failed: arch {arch_id}: {line}")


@app.command()
def results(
    study: str = typer.Argument(..., help="Study directory (holds results.sqlite)."),
    top: Optional[int] = typer.Option(None, help="Show the first K rows (after --by)."),
    by: Optional[str] = typer.Option(None, help="Sort by a column, e.g. test_pgd20, val_cw40, params."),
    where: Optional[str] = typer.Option(None, help="Filter, e.g. 'params < 1e6 and status == \"complete\"'."),
    as_json: bool = json_flag("the rows as a JSON list"),
    export: Optional[str] = typer.Option(None, help="Write FILE: .jsonl (NARes records), .csv or .parquet."),
    force: bool = force_flag("Overwrite the --export file."),
) -> None:
    """Table of a study's trials: cost, best epoch, validation and test metrics, compute used."""
    from studies import results as res

    if export:
        n = res.export(study, export, force=force)
        kind = "NARes records" if export.lower().endswith(".jsonl") else "rows"
        print(f"wrote {n} {kind} to {export}")
        return
    df = res.select(res.dataframe(study), where=where, by=by, top=top)
    rows = json.loads(df.to_json(orient="records")) if len(df) else []
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        print(f"{study}: no trials{' match' if where else ''}")
        return
    headers, cells = _table(rows)
    print(table(headers, cells, right={0, *range(4, len(headers))}))
    for r in rows:
        if r["status"] == "failed":
            print(f"failed: arch {r['arch_id']} after {r['attempts']} attempts: {r['error']}")


def _pct(v) -> str:
    return "-" if v is None else f"{v:.2f}"


TEST_COLUMNS = ("test_clean", "test_fgsm", "test_pgd20", "test_cw40", "test_aa")


def _table(rows: list[dict]) -> tuple[list[str], list[list]]:
    """The results table: every test attack some trial was tested with (a study tests all its trials
    with the same attacks), each a column."""
    tests = [k for k in TEST_COLUMNS if any(r.get(k) is not None for r in rows)] or list(TEST_COLUMNS[:1])
    headers = ["arch", "status", "depths", "widening", "params", "FLOPs", "best ep", "val clean", "val pgd20"]
    headers += ["val cw40", *(k.replace("_", " ") for k in tests), "img/s", "GPU-h", "CPU-h"]
    out = []
    for r in rows:
        out.append(
            [
                r["arch_id"],
                r["status"],
                fmt_list([r["D1"], r["D2"], r["D3"]]),
                fmt_list([r["W1"], r["W2"], r["W3"]]),
                format_count(r["params"]),
                format_count(r["flops"]),
                "-" if r["best_epoch"] is None else int(r["best_epoch"]),
                *(_pct(r[k]) for k in ("val_clean", "val_pgd20", "val_cw40")),
                *(_pct(r[k]) for k in tests),
                "-" if r.get("images_per_s") is None else f"{r['images_per_s']:.0f}",
                f"{r['gpu_hours']:.3f}",
                f"{r['cpu_hours']:.3f}",
            ]
        )
    return headers, out
