"""Checkpoints from and to other codebases: `scaler import`, `scaler export` (torch inside only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from scaler.errors import ScalerError
from scaler.layouts import FORMATS
from scaler_cli.app import app
from scaler_cli.options import SPEC_OPTIONS, force_flag, json_flag, model_from_options, with_options


@app.command(name="import")
@with_options(SPEC_OPTIONS, into="spec_opts")
def import_cmd(
    checkpoint: str = typer.Argument(..., help="A .pt/.pth file: a state dict, raw or wrapped."),
    model: Optional[str] = typer.Option(None, "--model", help="Preset name or model file (or spec flags)."),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="Run directory to write (new or empty)."),
    source_format: Optional[str] = typer.Option(
        None,
        "--from",
        help=f"Force the layout: {', '.join(FORMATS)} [default: detected from the keys].",
    ),
    dataset: Optional[str] = typer.Option(
        None, help="Dataset `scaler eval` uses [default: cifar10/cifar100 by classes]."
    ),
    data_dir: Optional[str] = typer.Option(None, help="Dataset directory recorded for `scaler eval`."),
    force: bool = force_flag("Replace a non-empty run directory."),
    as_json: bool = json_flag(),
    spec_opts: dict = None,
) -> None:
    """Load a RobustBench or authors' checkpoint into a scaler model; write a run directory."""
    if not output:
        raise ScalerError("give the run directory with -o RUN_DIR")
    label, spec = model_from_options(model, spec_opts)
    source, spec = _model_source(label, spec)
    from trainers.interop import import_checkpoint

    result = import_checkpoint(
        checkpoint,
        output,
        source=source,
        spec=spec,
        label=label,
        fmt=source_format,
        dataset=dataset,
        data_dir=data_dir,
        force=force,
    )
    if as_json:
        print(json.dumps(result, indent=2))
        return
    dropped = f", dropped {_summarize(result['dropped'])}" if result["dropped"] else ""
    if result["zeroed_counters"]:
        dropped += f", {result['zeroed_counters']} BatchNorm counters started at 0 (a pre-0.4.1 checkpoint)"
    print(f"imported {checkpoint} ({result['upstream']}) into {output}: {result['tensors']} tensors{dropped}")
    print(f"evaluate: scaler eval {output}    fine-tune: scaler train --init-from {output} --out RUN")


def _model_source(label: str, spec):
    """(model source, spec) for a preset/spec, or for a model file (its recorded spec, if any)."""
    from scaler.codegen import Provenance, embedded_spec, render

    if spec is not None:
        return render(spec, Provenance(rule=f"import into {label}")), spec
    text = Path(label).read_text()
    return text, embedded_spec(text)


def _summarize(keys: list[str]) -> str:
    """'sub_block1.* (61), mu, sigma'."""
    groups: dict[str, int] = {}
    for key in keys:
        head, _, rest = key.partition(".")
        group = f"{head}.*" if rest else head
        groups[group] = groups.get(group, 0) + 1
    return ", ".join(f"{g} ({n})" if n > 1 else g for g, n in groups.items())


@app.command(name="export")
def export_cmd(
    target: str = typer.Argument(..., help="Run directory (its best.pt, else last.pt) or a checkpoint file."),
    to: str = typer.Option(
        "robustbench",
        "--to",
        help=f"robustbench (the RobustBench class that computes the model) or a layout: {', '.join(FORMATS)}.",
    ),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="File to write (a raw state dict)."),
    force: bool = force_flag(),
    parents: bool = typer.Option(False, "--parents", help="Create missing parent directories."),
    as_json: bool = json_flag(),
) -> None:
    """Write a run's weights in another codebase's names (e.g. for a RobustBench submission)."""
    if not output:
        raise ScalerError("give the output file with -o FILE.pt")
    from trainers.interop import export_run

    result = export_run(target, output, to=to, force=force, parents=parents)
    if as_json:
        print(json.dumps(result, indent=2))
        return
    print(f"wrote {output}: {result['tensors']} tensors in {result['upstream']} names")
    print(f"load strictly into: {result['constructor']}")
