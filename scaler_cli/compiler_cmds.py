"""Compiler commands: zoo, count, emit, solve, compare (no torch on any of these paths, except
`count` of a user's own model file, which it builds to count)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

import scaler
from scaler.errors import ScalerError
from scaler.parsing import format_count, parse_list
from scaler_cli.app import app
from scaler_cli.options import (
    KNOB_OPTIONS,
    SPEC_FLAGS_NOT_FOR_FILES,
    SPEC_OPTIONS,
    STRUCTURE,
    force_flag,
    json_flag,
    spec_from_options,
    with_options,
)
from scaler_cli.output import fmt_list, knob_summary, table


def _preset_payload(spec, preset=None) -> dict:
    from scaler.cost import payload

    out = payload(spec)
    out["published"] = (
        {
            "params": preset.published_params,
            "flops": preset.published_flops,
            "source": preset.source,
            "table": preset.table,
            "note": preset.note,
        }
        if preset
        else None
    )
    return out


def _vs(ours: int, published: float | None) -> str:
    if not published:
        return "-"
    return f"{format_count(published)} ({(ours / published - 1) * 100:+.2f}%)"


@app.command()
def zoo(as_json: bool = json_flag("a JSON list")) -> None:
    """Table of the published models: our exact counts beside the papers' numbers."""
    from scaler.presets import PRESETS

    if as_json:
        print(json.dumps([_preset_payload(p.spec, p) for p in PRESETS.values()], indent=2))
        return
    rows, notes = [], []
    pad = "  " if any(p.note for p in PRESETS.values()) else ""  # keeps the column's digits aligned
    for p in PRESETS.values():
        c = scaler.count(p.spec)
        mark = " *" if p.note else pad
        rows.append(
            [
                p.name,
                p.spec.block,
                fmt_list(p.spec.depths),
                fmt_list(p.spec.widths),
                f"{c.params:,}",
                format_count(c.flops),
                format_count(p.published_params) if p.published_params else "-",
                (format_count(p.published_flops) if p.published_flops else "-") + mark,
            ]
        )
        if p.note:
            notes.append(f"* {p.name}: {p.note}")
    headers = ["name", "block", "depths", "widening", "params", "FLOPs", "pub. params", "pub. FLOPs"]
    print(table(headers, rows, right={4, 5, 6, 7}))
    print("FLOPs: fvcore multiply-adds on one 1x3x32x32 input (eval-mode norms and pooling included).")
    for n in notes:
        print(n)


@app.command(name="count")
@with_options(SPEC_OPTIONS, into="spec_opts")
def count_cmd(
    name: Optional[str] = typer.Argument(
        None, metavar="MODEL", help="Preset name (see `scaler zoo`) or model file (.py with build_model())."
    ),
    as_json: bool = json_flag(),
    spec_opts: dict = None,
) -> None:
    """Exact params and FLOPs of a preset, a model file or a spec given by flags."""
    from scaler.presets import get_preset

    if name is not None and (name.endswith(".py") or Path(name).is_file()):
        spec, records_spec = _file_spec(name, spec_opts)
        if spec is None:  # a user's own file, or an emitted one edited since: built and counted
            _count_built(name, spec_opts, as_json, records_spec)
            return
        _print_count(spec, None, as_json, counted=f"from the spec {name} records (its code is what that spec renders)")
        return
    spec = spec_from_options(name, spec_opts)
    preset = get_preset(name) if name else None
    if preset is not None and preset.spec != spec:  # knobs changed: the published numbers are another model's
        preset = None
    _print_count(spec, preset, as_json)


def _print_count(spec, preset, as_json: bool, counted: str | None = None) -> None:
    payload = _preset_payload(spec, preset)
    if counted:
        payload["counted"] = counted
    if as_json:
        print(json.dumps(payload, indent=2))
        return
    extras = "".join(
        f", {label} {value}"
        for label, value, default in (("normalize", spec.normalization, "none"), ("padding", spec.padding, "symmetric"))
        if value != default
    )
    print(f"model      {spec.name or '-'}  ({spec.describe()}, {spec.num_classes} classes{extras})")
    print(f"knobs      {knob_summary(spec)}")
    print(f"channels   {fmt_list(spec.channels)}  ({'stem, P1, P2, P3' if spec.family == 'resnet' else 'per stage'})")
    pub_params = f"   published {_vs(payload['params'], preset.published_params)}" if preset else ""
    pub_flops = f"   published {_vs(payload['flops'], preset.published_flops)}" if preset else ""
    print(f"params     {payload['params']:,}{pub_params}")
    print(f"FLOPs      {payload['flops']:,}{pub_flops}")
    print("breakdown  " + ", ".join(f"{k} {format_count(v)}" for k, v in payload["breakdown"].items()))
    print(f"input      1x3x{spec.resolution}x{spec.resolution}")
    if preset:
        print(f"source     {preset.source}, {preset.table}")
        if preset.note:
            print(f"note       {preset.note}")
    if counted:
        print(f"counted    {counted}: exact closed forms")


FILE_FLAGS = ("classes", "resolution")
"""Spec flags `count FILE` takes: the classes its build_model() gets, the input FLOPs are counted on."""


def _file_spec(path: str, opts: dict):
    """(the spec an emitted model file records, with --classes/--resolution applied, or None for a
    user's own file or an emitted one edited since: those are built and counted; whether the file
    records a spec at all)."""
    from dataclasses import replace

    from scaler.codegen import embedded_spec, render

    if any(opts.get(k) is not None for k in STRUCTURE):
        raise ScalerError("give a model file or --block/--depths/--widths, not both")
    refused = [k for k in SPEC_FLAGS_NOT_FOR_FILES if k not in FILE_FLAGS and opts.get(k) is not None]
    if refused:
        flag = refused[0].replace("_", "-")
        raise ScalerError(f"--{flag} changes a spec, not a model file: emit the file with it instead")
    file = Path(path)
    if not file.is_file():
        raise ScalerError(f"model file {path} not found")
    try:
        source = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScalerError(f"cannot read model file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    spec = embedded_spec(source)
    if spec is None or _body(source) != _body(render(spec)):  # not ours, or edited: its code is the truth
        return None, spec is not None
    changes = {"num_classes": opts.get("classes"), "resolution": opts.get("resolution")}
    return replace(spec, **{k: v for k, v in changes.items() if v is not None}), True


def _body(source: str) -> str:
    """An emitted file without its docstring header (which carries the provenance and counts)."""
    return source.split('"""', 2)[-1]


def _count_built(path: str, opts: dict, as_json: bool, records_spec: bool) -> None:
    """Params (numel) and fvcore FLOPs of the model a user's own file builds."""
    from scaler.builder import load_model_file
    from scaler.verify import fvcore_flops, numel

    resolution = opts.get("resolution") or 32
    model = load_model_file(path, opts.get("classes"))
    try:
        flops, by_op = fvcore_flops(model, resolution)
    except Exception as exc:  # a user's model that fvcore cannot trace on this input
        text = " ".join(str(exc).split())[:300]
        raise ScalerError(
            f"fvcore could not count {path} on a 1x3x{resolution}x{resolution} input "
            f"({type(exc).__name__}: {text}); give its input size with --resolution"
        ) from None
    how = "built from the file: params by numel, FLOPs by fvcore (multiply-adds); it records no scaler spec"
    if records_spec:
        how = "built from the file (its code differs from the spec it records): params by numel, FLOPs by fvcore"
    payload = {
        "file": str(Path(path).resolve()),
        "params": numel(model),
        "flops": flops,
        "by_operator": by_op,
        "resolution": resolution,
        "counted": how,
    }
    if as_json:
        print(json.dumps(payload, indent=2))
        return
    print(f"model      {path}  ({type(model).__name__} from its build_model())")
    print(f"params     {payload['params']:,}")
    print(f"FLOPs      {flops:,}")
    print("by op      " + (", ".join(f"{k} {format_count(v)}" for k, v in by_op.items()) or "-"))
    print(f"input      1x3x{resolution}x{resolution}")
    print(f"counted    {how}")


@app.command()
@with_options(SPEC_OPTIONS, into="spec_opts")
def emit(
    name: Optional[str] = typer.Argument(None, help="Preset name (see `scaler zoo`)."),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="File to write."),
    force: bool = force_flag(),
    parents: bool = typer.Option(False, "--parents", help="Create missing parent directories."),
    spec_opts: dict = None,
) -> None:
    """Write a standalone PyTorch model file (needs only torch) for a preset or spec."""
    if not output:
        raise ScalerError("give the output file with -o PATH")
    spec = spec_from_options(name, spec_opts)
    path = scaler.emit(spec, output, force=force, parents=parents)
    print(f"wrote {path} ({spec.describe()})")


def _print_solution(sol) -> None:
    from scaler.presets import PRESETS

    s, c = sol.spec, sol.cost
    cont = sol.continuous
    cap = (f", cap {sol.cap}" + (" (binding)" if sol.capped else "")) if sol.cap else ""
    print(f"rule        {sol.rule}  ({s.describe().split()[0]} block)")
    print(f"target      {sol.target}{cap}")
    print(f"knobs       {knob_summary(s)}")
    print(f"depths      {fmt_list(s.depths)}   (continuous {', '.join(f'{d:.2f}' for d in cont.depths)})")
    label = "widening" if s.family == "resnet" else "channels"
    print(f"{label:<11} {fmt_list(s.widths)}   (continuous {', '.join(f'{w:.2f}' for w in cont.widths)})")
    if s.family == "resnet":
        print(f"channels    {fmt_list(s.channels)}  (stem, P1, P2, P3)")
    print(f"params      {c.params:,}  ({format_count(c.params)})")
    print(f"FLOPs       {c.flops:,}  ({format_count(c.flops)})")
    print(f"error       {sol.error * 100:+.2f}% vs target")
    if s.family == "resnet":
        print(f"r_D         {sol.r_d:.3f}  (continuous {cont.r_d:.3f})")
        d, w = s.depths, s.widths
        print(f"ratios      D {':'.join(f'{x / d[2]:.2f}' for x in d)}   W {':'.join(f'{x / w[2]:.2f}' for x in w)}")
    if sol.published:
        p = PRESETS[sol.published]
        pc = scaler.count(p.spec)
        same = "identical" if p.spec == s else "differs"
        print(
            f"published   {p.name}: depths {fmt_list(p.spec.depths)}, widening {fmt_list(p.spec.widths)}, "
            f"{format_count(pc.params)} params, {format_count(pc.flops)} FLOPs ({same})"
        )
    else:
        print("published   none of this rule's family within 1.5x of the budget")


SOLVE_OPTIONS = [o for o in SPEC_OPTIONS if o.name in ("block", "classes")] + [
    o for o in KNOB_OPTIONS if o.name != "growth"
]
"""The spec rows `solve` shares: the block and every knob (the rule scales any block); the rule
itself sets depths and widths (and DenseNet's growth)."""


@app.command()
@with_options(SOLVE_OPTIONS, into="spec_opts")
def solve(
    flops: Optional[str] = typer.Option(None, help="Target FLOPs (multiply-adds), e.g. 10G."),
    params: Optional[str] = typer.Option(None, help="Target parameter count, e.g. 40M."),
    max_params: Optional[str] = typer.Option(None, help="Cap on params when targeting FLOPs."),
    max_flops: Optional[str] = typer.Option(None, help="Cap on FLOPs when targeting params."),
    rule: str = typer.Option("robustscaling", help="robustscaling, robustwrn, uniform or measured (with --results)."),
    arch: Optional[str] = typer.Option(
        None, help="robustwrn: the architecture it reduces and scales: wrn34 (default), vgg11 or densenet121."
    ),
    depths: Optional[str] = typer.Option(None, help="robustwrn: fixed depths (default 5,5,5)."),
    round_to: int = typer.Option(1, help="robustwrn: round channels to a multiple of this."),
    as_json: bool = json_flag(),
    emit_path: Optional[str] = typer.Option(None, "--emit", help="Also write the model file here."),
    force: bool = force_flag("With --emit: overwrite an existing file."),
    parents: bool = typer.Option(False, "--parents", help="With --emit: create missing parent directories."),
    results: Optional[str] = typer.Option(None, help="measured: a NARes-format .jsonl file or a study directory."),
    metric: Optional[str] = typer.Option(
        None,
        help="measured: the accuracy it picks by [default: val_pgd_acc, else val_cw_acc; a test metric "
        "peeks at the test set and is taken with a note].",
    ),
    seed: int = typer.Option(0, help="measured: seed of the surrogate's held-out split and fit."),
    spec_opts: dict = None,
) -> None:
    """The architecture a scaling rule prescribes for a FLOPs or params budget."""
    if rule == "measured" or results is not None:
        _solve_measured(rule, results, flops, params, max_flops, max_params, metric, seed, as_json, emit_path)
        return
    opts = dict(spec_opts)
    classes, resolution = opts.pop("classes"), opts.pop("resolution")
    sol = scaler.solve(
        flops,
        params,
        rule=rule,
        max_params=max_params,
        max_flops=max_flops,
        depths=parse_list(depths, "--depths") if depths is not None else None,
        round_to=round_to,
        num_classes=classes or 10,
        resolution=resolution or 32,
        arch=arch,
        **{k: v for k, v in opts.items() if v is not None},
    )
    if emit_path:
        scaler.emit(sol.spec, emit_path, force=force, parents=parents, rule=sol.rule, budget=str(sol.target))
    if as_json:
        print(json.dumps(sol.to_dict(), indent=2))
    else:
        _print_solution(sol)
        if emit_path:
            print(f"wrote       {emit_path}")


def _solve_measured(rule, results, flops, params, max_flops, max_params, metric, seed, as_json, emit_path) -> None:
    """`solve --rule measured --results SOURCE`: studies are imported only on this path."""
    if rule != "measured":
        raise ScalerError("--results goes with --rule measured")
    if results is None:
        raise ScalerError("--rule measured needs --results SOURCE (a NARes-format .jsonl file or a study directory)")
    if emit_path:
        raise ScalerError("--emit is not available with --rule measured; emit the chosen arch with `scaler emit`")
    from studies.measured import solve_measured

    out = solve_measured(results, flops, params, max_flops=max_flops, max_params=max_params, metric=metric, seed=seed)
    _measured_notes(out)
    if as_json:
        print(json.dumps(out, indent=2))
        return
    from studies.benchmark import arch_text

    m, b, s = out["metric"], out["best_measured"], out["surrogate"]
    cap = f", cap {out['cap']}" if out["cap"] else ""
    print(f"rule        measured  ({out['source']}: {out['measured']} architectures with {m})")
    print(f"target      {out['target']}{cap}")
    print(
        f"measured    {arch_text(b['arch'])}  {m} {b[m]:.2f}  "
        f"({format_count(int(b['flops']))} FLOPs, {format_count(int(b['params']))} params; "
        f"best of {out['measured_within']} within budget)"
    )
    tests = {k: v for k, v in b.get("test", {}).items() if k != m}
    if tests:
        chosen = "" if m.startswith("test_") else ", not used to choose"
        print(f"its test    {', '.join(f'{k} {v:.2f}' for k, v in tests.items())}{chosen}")
    if "held_out_kendall_tau" in s:
        print(
            f"surrogate   {s['model']}: held-out Kendall tau {s['held_out_kendall_tau']:+.3f} "
            f"({s['held_out']} of {s['fitted_on']} held out)"
        )
    p = s.get("best_predicted")
    if p:
        print(
            f"predicted   {arch_text(p['arch'])}  {m} {p['predicted']:.2f} +- {p['predicted_std']:.2f} (not measured)  "
            f"({format_count(int(p['flops']))} FLOPs, {format_count(int(p['params']))} params; "
            f"best of {s['unmeasured_within']} unmeasured within budget)"
        )
    if "note" in s:
        print(f"note        {s['note']}")


def _measured_notes(out: dict) -> None:
    """The measured rule's caveats, one line each on stderr: a test metric, synthetic data."""
    import sys

    if out.get("metric_note"):
        print(f"note: {out['metric_note']}", file=sys.stderr)
    if out.get("synthetic_records"):
        print(
            f"note: {Path(out['source']).name} is SYNTHETIC (written by `scaler synthetic`): "
            "exact costs, invented metrics, not measured",
            file=sys.stderr,
        )


@app.command()
def compare(
    flops: Optional[str] = typer.Option(None, help="Target FLOPs, e.g. 10G."),
    params: Optional[str] = typer.Option(None, help="Target params, e.g. 40M."),
    as_json: bool = json_flag("a JSON list"),
) -> None:
    """The three rules side by side at one budget."""
    from scaler.rules import RULES

    sols = [scaler.solve(flops, params, rule=name) for name in RULES]
    if as_json:
        print(json.dumps([s.to_dict() for s in sols], indent=2))
        return
    rows = [
        [
            s.rule,
            s.spec.block,
            fmt_list(s.spec.depths),
            fmt_list(s.spec.widths),
            format_count(s.cost.params),
            format_count(s.cost.flops),
            f"{s.error * 100:+.2f}%",
            f"{s.r_d:.3f}",
            s.published or "-",
        ]
        for s in sols
    ]
    print(f"target {sols[0].target}")
    headers = ["rule", "block", "depths", "widening", "params", "FLOPs", "error", "r_D", "nearest published"]
    print(table(headers, rows, right={4, 5, 6, 7}))
