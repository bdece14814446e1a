"""The `scaler` command: a thin typer layer over the Python API.

Every command answers bad input with one line on stderr and exit code 2, never a traceback.
torch is imported only by the commands that run models (train, eval, bench).
"""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

try:  # typer >= 0.25 vendors click; its exceptions are not the `click` package's
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover - older typer on top of click
    from click import exceptions as click_exc

from scaler.errors import ScalerError
from scaler.parsing import format_count, parse_budget, parse_list

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Architecture scaling compiler for adversarially robust CNNs.",
)
bench_app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None, help="Benchmarks.")
app.add_typer(bench_app, name="bench")


# --------------------------------------------------------------------------- helpers
def _table(headers: list[str], rows: list[list], right: set[int] = frozenset()) -> str:
    cells = [[str(c) for c in r] for r in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return "\n".join([line(cells[0]), line(["-" * w for w in widths]), *map(line, cells[1:])])


def _fmt_list(values) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def spec_from_options(
    name: Optional[str],
    block: Optional[str],
    depths: Optional[str],
    widths: Optional[str],
    channels: Optional[str],
    classes: Optional[int],
    activation: Optional[str],
):
    """A spec from a preset name or from --block/--depths/--widths|--channels flags."""
    from dataclasses import replace

    from scaler.presets import get_preset
    from scaler.spec import ArchSpec, widths_to_planes

    if name is not None:
        if any(v is not None for v in (block, depths, widths, channels)):
            raise ScalerError("give a preset name or --block/--depths/--widths, not both")
        spec = get_preset(name).spec
    else:
        if block is None or depths is None or (widths is None and channels is None):
            raise ScalerError("give a preset name, or --block, --depths and --widths (or --channels)")
        if widths is not None and channels is not None:
            raise ScalerError("give --widths or --channels, not both")
        d = parse_list(depths, "--depths")
        if channels is not None:
            planes = parse_list(channels, "--channels")
        else:
            planes = widths_to_planes(parse_list(widths, "--widths", kind=float, minimum=1e-9))
        spec = ArchSpec(block, d, planes)
    changes = {}
    if classes is not None:
        changes["num_classes"] = classes
    if activation is not None:
        changes["activation"] = activation
    if changes:
        spec = replace(spec, **changes)
    return spec


def _count_payload(spec, preset=None) -> dict:
    from scaler.cost import count

    cost = count(spec)
    return {
        "name": spec.name,
        "block": spec.block,
        "depths": list(spec.depths),
        "widths": list(spec.widths),
        "channels": list(spec.channels),
        "activation": spec.activation,
        "num_classes": spec.num_classes,
        "params": cost.params,
        "flops": cost.flops,
        "breakdown": cost.breakdown,
        "published": (
            {
                "params": preset.published_params,
                "flops": preset.published_flops,
                "source": preset.source,
                "table": preset.table,
                "note": preset.note,
            }
            if preset
            else None
        ),
    }


def _vs(ours: int, published: float | None) -> str:
    if not published:
        return "-"
    return f"{format_count(published)} ({(ours / published - 1) * 100:+.2f}%)"


# --------------------------------------------------------------------------- zoo / count
@app.command()
def zoo(as_json: bool = typer.Option(False, "--json", help="Print a JSON list.")) -> None:
    """Table of the published models: our exact counts beside the papers' numbers."""
    from scaler.cost import count
    from scaler.presets import PRESETS

    if as_json:
        print(json.dumps([_count_payload(p.spec, p) for p in PRESETS.values()], indent=2))
        return
    rows, notes = [], []
    for p in PRESETS.values():
        c = count(p.spec)
        mark = " *" if p.note else ""
        rows.append(
            [
                p.name,
                p.spec.block,
                _fmt_list(p.spec.depths),
                _fmt_list(p.spec.widths),
                f"{c.params:,}",
                format_count(c.flops),
                format_count(p.published_params) if p.published_params else "-",
                (format_count(p.published_flops) if p.published_flops else "-") + mark,
            ]
        )
        if p.note:
            notes.append(f"* {p.name}: {p.note}")
    headers = ["name", "block", "depths", "widening", "params", "FLOPs", "pub. params", "pub. FLOPs"]
    print(_table(headers, rows, right={4, 5, 6, 7}))
    print("FLOPs: fvcore multiply-adds on one 1x3x32x32 input (eval-mode BN and pooling included).")
    for n in notes:
        print(n)


@app.command(name="count")
def count_cmd(
    name: Optional[str] = typer.Argument(None, help="Preset name (see `scaler zoo`)."),
    block: Optional[str] = typer.Option(None, help="basic or robust."),
    depths: Optional[str] = typer.Option(None, help="Blocks per stage, e.g. 14,14,7."),
    widths: Optional[str] = typer.Option(None, help="Widening factors, e.g. 5,7,3."),
    channels: Optional[str] = typer.Option(None, help="Planes per stage instead of widths, e.g. 80,224,192."),
    classes: Optional[int] = typer.Option(None, help="Number of classes (default 10)."),
    activation: Optional[str] = typer.Option(None, help="relu or silu."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Exact params and FLOPs of a preset or of a spec given by flags."""
    from scaler.presets import get_preset

    spec = spec_from_options(name, block, depths, widths, channels, classes, activation)
    preset = get_preset(name) if name else None
    payload = _count_payload(spec, preset)
    if as_json:
        print(json.dumps(payload, indent=2))
        return
    print(f"model      {spec.name or '-'}  ({spec.describe()}, {spec.activation}, {spec.num_classes} classes)")
    print(f"channels   {_fmt_list(spec.channels)}  (stem, P1, P2, P3)")
    print(
        f"params     {payload['params']:,}"
        + (f"   published {_vs(payload['params'], preset.published_params)}" if preset else "")
    )
    print(
        f"FLOPs      {payload['flops']:,}"
        + (f"   published {_vs(payload['flops'], preset.published_flops)}" if preset else "")
    )
    print("breakdown  " + ", ".join(f"{k} {format_count(v)}" for k, v in payload["breakdown"].items()))
    if preset:
        print(f"source     {preset.source}, {preset.table}")
        if preset.note:
            print(f"note       {preset.note}")


# --------------------------------------------------------------------------- emit
@app.command()
def emit(
    name: Optional[str] = typer.Argument(None, help="Preset name (see `scaler zoo`)."),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="File to write."),
    block: Optional[str] = typer.Option(None, help="basic or robust."),
    depths: Optional[str] = typer.Option(None, help="Blocks per stage, e.g. 14,14,7."),
    widths: Optional[str] = typer.Option(None, help="Widening factors, e.g. 5,7,3."),
    channels: Optional[str] = typer.Option(None, help="Planes per stage, e.g. 80,224,192."),
    classes: Optional[int] = typer.Option(None, help="Number of classes (default 10)."),
    activation: Optional[str] = typer.Option(None, help="relu or silu."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
    parents: bool = typer.Option(False, "--parents", help="Create missing parent directories."),
) -> None:
    """Write a standalone PyTorch model file (needs only torch) for a preset or spec."""
    from scaler.codegen import emit as emit_file

    if not output:
        raise ScalerError("give the output file with -o PATH")
    spec = spec_from_options(name, block, depths, widths, channels, classes, activation)
    path = emit_file(spec, output, force=force, parents=parents)
    print(f"wrote {path} ({spec.describe()})")


# --------------------------------------------------------------------------- solve / compare
def _budgets(flops, params, max_flops, max_params):
    from scaler.solver import Budget

    if flops is not None and params is not None:
        raise ScalerError("give one target, --flops or --params (cap the other with --max-params/--max-flops)")
    if flops is None and params is None:
        raise ScalerError("give a budget: --flops 10G or --params 40M")
    if flops is not None:
        if max_flops is not None:
            raise ScalerError("--max-flops caps a --params target; with --flops give --max-params")
        target = Budget("flops", parse_budget(flops, "--flops"))
        cap = Budget("params", parse_budget(max_params, "--max-params")) if max_params is not None else None
    else:
        if max_params is not None:
            raise ScalerError("--max-params caps a --flops target; with --params give --max-flops")
        target = Budget("params", parse_budget(params, "--params"))
        cap = Budget("flops", parse_budget(max_flops, "--max-flops")) if max_flops is not None else None
    return target, cap


def _print_solution(sol) -> None:
    from scaler.cost import count
    from scaler.presets import PRESETS

    s, c = sol.spec, sol.cost
    cont = sol.continuous
    print(f"rule        {sol.rule}  ({s.block} block)")
    print(f"target      {sol.target}" + (f", cap {sol.cap}" + (" (binding)" if sol.capped else "") if sol.cap else ""))
    print(f"depths      {_fmt_list(s.depths)}   (continuous {', '.join(f'{d:.2f}' for d in cont.depths)})")
    print(f"widening    {_fmt_list(s.widths)}   (continuous {', '.join(f'{w:.2f}' for w in cont.widths)})")
    print(f"channels    {_fmt_list(s.channels)}  (stem, P1, P2, P3)")
    print(f"params      {c.params:,}  ({format_count(c.params)})")
    print(f"FLOPs       {c.flops:,}  ({format_count(c.flops)})")
    print(f"error       {sol.error * 100:+.2f}% vs target")
    print(f"r_D         {sol.r_d:.3f}  (continuous {cont.r_d:.3f})")
    d, w = s.depths, s.widths
    print(f"ratios      D {':'.join(f'{x / d[2]:.2f}' for x in d)}   W {':'.join(f'{x / w[2]:.2f}' for x in w)}")
    if sol.published:
        p = PRESETS[sol.published]
        pc = count(p.spec)
        same = "identical" if p.spec == s else "differs"
        print(
            f"published   {p.name}: depths {_fmt_list(p.spec.depths)}, widening {_fmt_list(p.spec.widths)}, "
            f"{format_count(pc.params)} params, {format_count(pc.flops)} FLOPs ({same})"
        )
    else:
        print("published   none of this rule's family within 1.5x of the budget")


@app.command()
def solve(
    flops: Optional[str] = typer.Option(None, help="Target FLOPs (multiply-adds), e.g. 10G."),
    params: Optional[str] = typer.Option(None, help="Target parameter count, e.g. 40M."),
    max_params: Optional[str] = typer.Option(None, help="Cap on params when targeting FLOPs."),
    max_flops: Optional[str] = typer.Option(None, help="Cap on FLOPs when targeting params."),
    rule: str = typer.Option("robustscaling", help="robustscaling, robustwrn or uniform."),
    block: Optional[str] = typer.Option(None, help="basic or robust (default: the rule's)."),
    depths: Optional[str] = typer.Option(None, help="robustwrn: fixed depths (default 5,5,5)."),
    round_to: int = typer.Option(1, help="robustwrn: round channels to a multiple of this."),
    classes: int = typer.Option(10, help="Number of classes."),
    activation: str = typer.Option("relu", help="relu or silu."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    emit_path: Optional[str] = typer.Option(None, "--emit", help="Also write the model file here."),
    force: bool = typer.Option(False, "--force", help="With --emit: overwrite."),
) -> None:
    """The architecture a scaling rule prescribes for a FLOPs or params budget."""
    from scaler.solver import solve as solve_budget

    target, cap = _budgets(flops, params, max_flops, max_params)
    fixed = parse_list(depths, "--depths") if depths is not None else None
    sol = solve_budget(
        rule, target, cap=cap, block=block, depths=fixed, round_to=round_to, num_classes=classes, activation=activation
    )
    if emit_path:
        from scaler.codegen import Provenance
        from scaler.codegen import emit as emit_file

        emit_file(sol.spec, emit_path, provenance=Provenance(rule=sol.rule, budget=str(target)), force=force)
    if as_json:
        print(json.dumps(sol.to_dict(), indent=2))
    else:
        _print_solution(sol)
        if emit_path:
            print(f"wrote       {emit_path}")


@app.command()
def compare(
    flops: Optional[str] = typer.Option(None, help="Target FLOPs, e.g. 10G."),
    params: Optional[str] = typer.Option(None, help="Target params, e.g. 40M."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list."),
) -> None:
    """The three rules side by side at one budget."""
    from scaler.rules import RULES
    from scaler.solver import solve as solve_budget

    target, _ = _budgets(flops, params, None, None)
    sols = [solve_budget(name, target) for name in RULES]
    if as_json:
        print(json.dumps([s.to_dict() for s in sols], indent=2))
        return
    rows = [
        [
            s.rule,
            s.spec.block,
            _fmt_list(s.spec.depths),
            _fmt_list(s.spec.widths),
            format_count(s.cost.params),
            format_count(s.cost.flops),
            f"{s.error * 100:+.2f}%",
            f"{s.r_d:.3f}",
            s.published or "-",
        ]
        for s in sols
    ]
    print(f"target {target}")
    print(
        _table(
            ["rule", "block", "depths", "widening", "params", "FLOPs", "error", "r_D", "nearest published"],
            rows,
            right={4, 5, 6, 7},
        )
    )


# --------------------------------------------------------------------------- train / eval
def _train_model_spec(model, block, depths, widths, channels, activation):
    """(model label, spec dict or None) for `scaler train`: a preset, a model file, or spec flags."""
    from pathlib import Path

    if model is not None and (model.endswith(".py") or Path(model).is_file()):
        if any(v is not None for v in (block, depths, widths, channels)):
            raise ScalerError("give a model file or --block/--depths/--widths, not both")
        if not Path(model).is_file():
            raise ScalerError(f"model file {model} not found")
        return str(Path(model).resolve()), None
    spec = spec_from_options(model, block, depths, widths, channels, None, activation)
    return model or "spec", spec.to_dict()


@app.command()
def train(
    model: Optional[str] = typer.Argument(None, help="Preset name or path to a model file with build_model()."),
    block: Optional[str] = typer.Option(None, help="Spec flags instead of MODEL: basic or robust."),
    depths: Optional[str] = typer.Option(None, help="Spec flags: blocks per stage."),
    widths: Optional[str] = typer.Option(None, help="Spec flags: widening factors."),
    channels: Optional[str] = typer.Option(None, help="Spec flags: planes per stage."),
    activation: Optional[str] = typer.Option(None, help="relu or silu."),
    dataset: Optional[str] = typer.Option(None, help="cifar10, cifar100, digits or synthetic."),
    data_dir: Optional[str] = typer.Option(None, help="Directory with the CIFAR archives."),
    val: Optional[str] = typer.Option(None, help="Validation: holdout (from train) or cifar10.1."),
    val_size: Optional[int] = typer.Option(None, help="Held-out training points for validation."),
    val_n: Optional[int] = typer.Option(None, help="Validation points attacked each epoch."),
    method: Optional[str] = typer.Option(None, help="standard, pgd-at, trades or mart."),
    beta: Optional[float] = typer.Option(None, help="TRADES/MART beta."),
    recipe: Optional[str] = typer.Option(None, help="bat, nares, trades-paper or mart-paper."),
    epochs: Optional[int] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None),
    lr: Optional[float] = typer.Option(None),
    momentum: Optional[float] = typer.Option(None),
    nesterov: Optional[bool] = typer.Option(None, "--nesterov/--no-nesterov"),
    weight_decay: Optional[float] = typer.Option(None),
    wd_exclude_bn_bias: Optional[bool] = typer.Option(None, "--wd-exclude-bn-bias/--wd-all"),
    schedule: Optional[str] = typer.Option(None, help="step, cosine or onecycle."),
    milestones: Optional[str] = typer.Option(None, help="Step schedule: epochs, e.g. 75,90."),
    warmup_epochs: Optional[float] = typer.Option(None, help="onecycle warm-up epochs."),
    grad_clip: Optional[float] = typer.Option(None, help="Max gradient norm (0: off)."),
    ema: Optional[float] = typer.Option(None, help="Weight EMA decay, e.g. 0.995 (0: off)."),
    label_smoothing: Optional[float] = typer.Option(None),
    eps: Optional[str] = typer.Option(None, help="L-inf radius, e.g. 8/255."),
    attack_steps: Optional[int] = typer.Option(None),
    attack_step: Optional[str] = typer.Option(None, help="Attack step, e.g. 2/255."),
    attack_start: Optional[str] = typer.Option(None, help="normal, uniform or none."),
    war_zeta: Optional[float] = typer.Option(None, help="WAR: target l_nat/l_rob ratio."),
    war_calibrate: bool = typer.Option(False, "--war-calibrate", help="WAR: measure zeta on a thin network first."),
    augment: Optional[str] = typer.Option(None, help="crop-flip, crop or none."),
    best_metric: Optional[str] = typer.Option(None, help="pgd20 or cw40."),
    save_epochs: Optional[str] = typer.Option(None, help="Keep checkpoints after these epochs, e.g. 75,90."),
    eval_every: Optional[int] = typer.Option(None, help="Validate every N epochs (and after the last)."),
    seed: Optional[int] = typer.Option(None),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda."),
    precision: Optional[str] = typer.Option(None, help="auto, fp32 or bf16 (autocast for training)."),
    channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last"),
    compile_model: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the model."),
    out: Optional[str] = typer.Option(None, "--out", help="Run directory."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from last.pt."),
    stop_after: Optional[int] = typer.Option(None, help="End after this epoch (resumable)."),
    distributed: bool = typer.Option(False, "--distributed", help="DDP under torchrun."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Adversarially train a model; writes model.py, config.json, metrics.jsonl and checkpoints."""
    from trainers.attacks import parse_eps
    from trainers.config import make_config
    from trainers.train import run_training

    if not out:
        raise ScalerError("give the run directory with --out DIR")
    if resume:
        result = run_training(
            None, out, resume=True, progress=not quiet, stop_after=stop_after, distributed=distributed, epochs=epochs
        )
    else:
        if model is None and block is None:
            raise ScalerError("give MODEL (a preset or a model file) or --block/--depths/--widths")
        label, spec = _train_model_spec(model, block, depths, widths, channels, activation)
        overrides = dict(
            model=label,
            spec=spec,
            dataset=dataset,
            data_dir=data_dir,
            val=val,
            val_size=val_size,
            val_n=val_n,
            method=method,
            beta=beta,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            wd_exclude_bn_bias=wd_exclude_bn_bias,
            schedule=schedule,
            warmup_epochs=warmup_epochs,
            grad_clip=grad_clip,
            ema=ema,
            label_smoothing=label_smoothing,
            eps=parse_eps(eps) if eps is not None else None,
            attack_steps=attack_steps,
            attack_step=parse_eps(attack_step) if attack_step is not None else None,
            attack_start=attack_start,
            war_zeta=war_zeta,
            war_calibrate=war_calibrate or None,
            augment=augment,
            best_metric=best_metric,
            eval_every=eval_every,
            seed=seed,
            device=device,
            precision=precision,
            channels_last=channels_last,
            compile=compile_model,
        )
        if save_epochs is not None:
            overrides["save_epochs"] = tuple(parse_list(save_epochs, "--save-epochs", n=len(save_epochs.split(","))))
        if dataset is None:
            overrides["dataset"] = "cifar10"
        cfg = make_config(recipe, overrides)
        if milestones is not None:
            ms = parse_list(milestones, "--milestones", n=len(milestones.split(",")))
            cfg.milestones = tuple(m / cfg.epochs for m in ms)
        if augment is None and cfg.dataset == "digits":
            cfg.augment = "crop"  # digits are not mirror-symmetric
        result = run_training(cfg, out, progress=not quiet, stop_after=stop_after, distributed=distributed)
    if result:
        print(json.dumps(result))


@app.command(name="eval")
def eval_cmd(
    target: str = typer.Argument(..., help="Run directory (its best.pt) or a checkpoint file."),
    dataset: Optional[str] = typer.Option(None, help="Default: the run's dataset."),
    data_dir: Optional[str] = typer.Option(None, help="Default: the run's data directory."),
    attacks: str = typer.Option("clean,pgd20,cw40", help="From clean,fgsm,pgd20,cw40,aa,aa-compact."),
    eps: Optional[str] = typer.Option(None, help="L-inf radius (default: the run's, else 8/255)."),
    n: Optional[int] = typer.Option(None, help="Evaluate the first n test points."),
    seed: int = typer.Option(0),
    batch_size: int = typer.Option(256),
    per_block_lipschitz: bool = typer.Option(False, "--per-block-lipschitz", help="LIP at every block output."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Evaluate a trained model: accuracy, stable accuracy and empirical Lipschitz per attack."""
    from trainers.attacks import parse_eps
    from trainers.evaluate import parse_attacks
    from trainers.run_eval import evaluate_run

    names = parse_attacks(attacks)
    if n is not None and n < 1:
        raise ScalerError("--n must be >= 1")
    if batch_size < 1:
        raise ScalerError("--batch-size must be >= 1")
    results, info = evaluate_run(
        target,
        attacks=names,
        dataset=dataset,
        data_dir=data_dir,
        eps=parse_eps(eps) if eps else None,
        n=n,
        seed=seed,
        batch_size=batch_size,
        per_block=per_block_lipschitz,
        device=device,
    )
    if as_json:
        print(json.dumps(results, indent=2))
        return
    print(f"{info['checkpoint']}  ({info['dataset']}, {info['n']} points, eps {info['eps']:.5f})")
    rows = [
        [name, f"{r['accuracy']:.2f}", f"{r['stable']:.2f}", f"{r['lip']:.3f}"]
        for name, r in results.items()
        if name != "warnings"
    ]
    print(_table(["attack", "accuracy %", "stable %", "LIP"], rows, right={1, 2, 3}))
    for name, r in results.items():
        if name != "warnings" and "per_block_lip" in r:
            print("per-block LIP (pgd20): " + ", ".join(f"{k} {v:.2f}" for k, v in r["per_block_lip"].items()))
    for w in results["warnings"]:
        print(f"warning: {w}")


@bench_app.command(name="train")
def bench_train_cmd(
    model: Optional[str] = typer.Argument(None, help="Preset name or model file."),
    block: Optional[str] = typer.Option(None, help="Spec flags instead of MODEL: basic or robust."),
    depths: Optional[str] = typer.Option(None),
    widths: Optional[str] = typer.Option(None),
    channels: Optional[str] = typer.Option(None),
    method: str = typer.Option("pgd-at", help="pgd-at, trades or mart."),
    batch_size: int = typer.Option(64),
    steps: int = typer.Option(5, help="Timed steps (after warm-up)."),
    warmup: int = typer.Option(2, help="Untimed warm-up steps."),
    precision: str = typer.Option("auto", help="auto, fp32 or bf16."),
    channels_last: bool = typer.Option(True, "--channels-last/--no-channels-last"),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the model."),
    reference: bool = typer.Option(True, "--reference/--no-reference", help="Also time the fp32 reference loop."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Images/s of full adversarial training steps (bat recipe attack) vs a plain fp32 loop."""
    from scaler.builder import build_model, load_model_file
    from scaler.cost import count
    from trainers.bench import bench_train

    if precision not in ("auto", "fp32", "bf16"):
        raise ScalerError(f"unknown precision {precision!r}; choose auto, fp32 or bf16")
    label, spec = _train_model_spec(model, block, depths, widths, channels, None)
    if spec is None:
        net, flops = load_model_file(label), None
    else:
        from scaler.spec import ArchSpec

        arch = ArchSpec.from_dict(spec)
        net, flops = build_model(arch), count(arch).flops
    result = bench_train(
        net,
        method=method,
        batch_size=batch_size,
        steps=steps,
        warmup=warmup,
        precision=precision,
        compile=compile_model,
        channels_last=channels_last,
        device=device,
        reference=reference,
        flops_per_image=flops,
    )
    result["model"] = label
    if as_json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"{label}: {method}, batch {batch_size}, {result['precision']}, "
        f"{'channels_last' if channels_last else 'NCHW'}{', compiled' if compile_model else ''} on {result['device']}"
    )
    print(f"ours       {result['images_per_s']:.1f} images/s ({result['seconds_per_step'] * 1000:.1f} ms/step)")
    if reference:
        print(
            f"reference  {result['reference_images_per_s']:.1f} images/s (fp32 NCHW)   speedup {result['speedup']:.2f}x"
        )
    if "tflops_per_s" in result:
        print(f"achieved   {result['tflops_per_s']:.2f} TFLOP/s (cost-model FLOPs x 3 x (attack steps + 1))")


# --------------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> int:
    """Run the CLI; every error is one line on stderr and exit code 2."""
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="scaler", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except ScalerError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)  # always one line
    except click_exc.NoArgsIsHelpError as exc:  # bare `scaler` or group: show help
        print(exc.ctx.get_help() if exc.ctx else "", file=sys.stderr)
    except click_exc.UsageError as exc:
        print(f"error: {exc.format_message()}", file=sys.stderr)
    except typer.Exit as exc:
        return getattr(exc, "exit_code", getattr(exc, "code", 0))
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 2


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
