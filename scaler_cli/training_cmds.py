"""One-model commands: train, eval, bench train (torch is imported inside them only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from scaler.errors import ScalerError
from scaler_cli.app import CONTEXT, app
from scaler_cli.options import (
    BENCH_OPTIONS,
    CUDA_GRAPHS_HELP,
    FUSED_HELP,
    SPEC_OPTIONS,
    TRAIN_OPTIONS,
    json_flag,
    model_from_options,
    quiet_flag,
    train_config,
    with_options,
)
from scaler_cli.output import table

bench_app = typer.Typer(
    add_completion=False, no_args_is_help=True, rich_markup_mode=None, context_settings=CONTEXT, help="Benchmarks."
)
app.add_typer(bench_app, name="bench")

ARCH_OPTIONS = [o for o in SPEC_OPTIONS if o.name != "classes"]  # training takes the classes from the data


@app.command()
@with_options(TRAIN_OPTIONS, into="train_opts")
@with_options(ARCH_OPTIONS, into="spec_opts")
def train(
    model: Optional[str] = typer.Argument(None, help="Preset name or a model file with build_model()."),
    out: Optional[str] = typer.Option(None, "--out", help="Run directory (created; must be new or empty)."),
    recipe: Optional[str] = typer.Option(None, help="Published recipe: bat, nares, trades-paper or mart-paper."),
    war_calibrate: bool = typer.Option(
        False, "--war-calibrate", help="WAR: measure zeta on a half-width copy first (trades/mart)."
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last.pt."),
    stop_after: Optional[int] = typer.Option(None, help="End after this epoch (the run stays resumable)."),
    distributed: bool = typer.Option(False, "--distributed", help="DDP: one process per device under torchrun."),
    quiet: bool = quiet_flag("No progress bar or epoch lines."),
    spec_opts: dict = None,
    train_opts: dict = None,
) -> None:
    """Adversarially train a model; writes model.py, config.json, metrics.jsonl and checkpoints."""
    import trainers

    if not out:
        raise ScalerError("give the run directory with --out DIR")
    if stop_after is not None and stop_after < 1:
        raise ScalerError("--stop-after must be >= 1 (the epoch to end after)")
    if resume:
        epochs = _resume_epochs(out, model, spec_opts, train_opts, recipe, war_calibrate)
        result = trainers.resume(out, epochs=epochs, progress=not quiet, stop_after=stop_after, distributed=distributed)
    else:
        cfg = train_config(model, spec_opts, train_opts, recipe, war_calibrate)
        result = trainers.train(cfg, out, progress=not quiet, stop_after=stop_after, distributed=distributed)
    if result:
        print(json.dumps(result))


def _resume_epochs(out, model, spec_opts, train_opts, recipe, war_calibrate) -> int | None:
    """--resume with the run's own command (its model, recipe and flags given again) continues the
    run; a setting that differs from the saved config is refused, each named with both values.
    Only --epochs may change, and only grow. Returns the epochs to extend to (None: the run's)."""
    from trainers import checkpoint
    from trainers.config import TrainConfig, config_differences

    epochs = train_opts.get("epochs")
    given = {k for k, v in {**spec_opts, **train_opts}.items() if v is not None and k != "epochs"}
    if model is None and recipe is None and not war_calibrate and not given:
        return epochs
    saved = TrainConfig.from_dict(checkpoint.read_config(Path(out)))
    wanted = train_config(model, spec_opts, {**train_opts, "epochs": saved.epochs}, recipe, war_calibrate)
    unset = {name for name in ("compile", "fused", "device") if train_opts.get(name) is None}
    differences = config_differences(saved, wanted, ignore=unset)
    if differences:
        raise ScalerError(
            "--resume continues the run's own config, and these settings differ from it (saved, then given): "
            + "; ".join(differences)
        )
    if epochs is not None and epochs < saved.epochs:
        raise ScalerError(f"--epochs {epochs} is below the run's {saved.epochs}: a resumed run's epochs may only grow")
    return epochs


@app.command(name="eval")
def eval_cmd(
    target: str = typer.Argument(..., help="Run directory (its best.pt, else last.pt) or a checkpoint file."),
    dataset: Optional[str] = typer.Option(None, help="Test set [default: the run's dataset]."),
    data_dir: Optional[str] = typer.Option(None, help="Dataset directory [default: the run's]."),
    attacks: str = typer.Option("clean,pgd20,cw40", help="From clean,fgsm,pgd20,cw40,aa,aa-compact."),
    eps: Optional[str] = typer.Option(None, help="L-inf radius [default: the run's, else 8/255]."),
    n: Optional[int] = typer.Option(None, help="Evaluate the first n test points [default: all]."),
    seed: int = typer.Option(0, help="Seed of the attacks' random starts."),
    batch_size: Optional[int] = typer.Option(
        None, help="Evaluation batch size [default: 32 on a CPU, 256 on a GPU and for AutoAttack]."
    ),
    precision: str = typer.Option(
        "fp32",
        help="fp32 (exact), bf16 (autocast of the attacks and logits; faster) or auto (bf16 where the device has it).",
    ),
    per_block_lipschitz: bool = typer.Option(False, "--per-block-lipschitz", help="LIP at every block output."),
    compile_model: bool = typer.Option(
        False,
        "--compile",
        help="torch.compile the logits and our attacks (AutoAttack stays eager); little gain on a CPU.",
    ),
    fused: Optional[bool] = typer.Option(None, "--fused/--no-fused", help=FUSED_HELP),
    cuda_graphs: bool = typer.Option(False, "--cuda-graphs", help=CUDA_GRAPHS_HELP),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    quiet: bool = quiet_flag("No progress bars."),
    as_json: bool = json_flag(),
) -> None:
    """Evaluate a trained model: accuracy, stable accuracy and empirical Lipschitz per attack."""
    import sys

    import trainers
    from trainers.config import parse_eps
    from trainers.evaluation import EvaluationStopped, parse_attacks

    stopped = None
    try:
        results, info = trainers.evaluate(
            target,
            attacks=parse_attacks(attacks),
            dataset=dataset,
            data_dir=data_dir,
            eps=parse_eps(eps) if eps else None,
            n=n,
            seed=seed,
            batch_size=batch_size,
            per_block=per_block_lipschitz,
            device=device,
            progress=not quiet,
            announce=(lambda line: print(line, file=sys.stderr)) if not quiet else None,
            precision=precision,
            compile=compile_model,
            fused=fused,
            cuda_graphs=cuda_graphs,
        )
    except EvaluationStopped as exc:  # print what finished, then the stop's own line
        stopped, results, info = exc, exc.results, exc.info
    _print_evaluation(results, info, as_json)
    if stopped is not None:
        raise stopped


def _print_evaluation(results: dict, info: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps({**results, "checkpoint": info}, indent=2))
        return
    when = f"imported, {info['imported']['format']}" if "imported" in info else f"epoch {info['epoch']}"
    print(
        f"{info['checkpoint']} ({when}{', unfinished run' if info.get('unfinished') else ''}; "
        f"{info['dataset']}, {info['n']} points, eps {info['eps']:.5f}{', bf16' if info.get('precision') == 'bf16' else ''})"
    )
    rows = [
        [name, f"{r['accuracy']:.2f}", f"{r['stable']:.2f}", f"{r['lip']:.3f}"]
        for name, r in results.items()
        if name != "warnings"
    ]
    print(table(["attack", "accuracy %", "stable %", "LIP"], rows, right={1, 2, 3}))
    for name, r in results.items():
        if name != "warnings" and "per_block_lip" in r:
            print("per-block LIP (pgd20): " + ", ".join(f"{k} {v:.2f}" for k, v in r["per_block_lip"].items()))
    for w in results["warnings"]:
        print(f"warning: {w}")


def _bench_command(name: str):
    """Register a `scaler bench` subcommand: its own options, the shared bench options (into
    `bench_opts`) and the architecture flags (into `spec_opts`)."""

    def register(fn):
        fn = with_options(ARCH_OPTIONS, into="spec_opts")(fn)
        return bench_app.command(name=name)(with_options(BENCH_OPTIONS, into="bench_opts")(fn))

    return register


@_bench_command("train")
def bench_train_cmd(
    model: Optional[str] = typer.Argument(None, help="Preset name or model file."),
    method: str = typer.Option("pgd-at", help="pgd-at, trades or mart."),
    batch_size: int = typer.Option(64, help="Batch size."),
    steps: int = typer.Option(5, help="Timed steps (after warm-up)."),
    warmup: int = typer.Option(2, help="Untimed warm-up steps."),
    precision: str = typer.Option("auto", help="auto, fp32 or bf16."),
    compile_model: bool = typer.Option(False, "--compile", help="torch.compile the model."),
    as_json: bool = json_flag(),
    spec_opts: dict = None,
    bench_opts: dict = None,
) -> None:
    """Images/s of full adversarial training steps (bat recipe attack) vs a plain fp32 loop."""
    from trainers.bench import bench_train

    settings = dict(method=method, batch_size=batch_size, steps=steps, warmup=warmup, precision=precision)
    result = _bench(bench_train, model, spec_opts, bench_opts, as_json, compile=compile_model, **settings)
    if result is None:
        return
    print(f"{result['model']}: {method}, batch {batch_size}, {_bench_setting(result)}")
    print(f"ours       {result['images_per_s']:.1f} images/s ({result['seconds_per_step'] * 1000:.1f} ms/step)")
    _print_speed(result, bench_opts["reference"], "attack steps 2x a forward, trained forwards 3x")


def _bench(run, model: str | None, spec_opts: dict, bench_opts: dict, as_json: bool, **settings) -> dict | None:
    """`run` (bench_train or bench_eval) on MODEL or the spec flags, its result labelled with the
    model; printed as one JSON object (and None returned) with --json."""
    label, net, model_opts = _bench_model(model, spec_opts)
    result = {**run(net, **settings, **model_opts, **bench_opts), "model": label}
    if as_json:
        print(json.dumps(result, indent=2))
        return None
    return result


def _bench_model(model: str | None, spec_opts: dict):
    """(label, model, {flops_per_image, resolution}) of a bench command's MODEL or spec flags."""
    import scaler

    label, spec = model_from_options(model, spec_opts)
    net = scaler.create_model(spec if spec is not None else label)
    flops = scaler.count(spec).flops if spec is not None else None
    return label, net, {"flops_per_image": flops, "resolution": spec.resolution if spec is not None else 32}


def _bench_setting(result: dict) -> str:
    """'bf16, channels_last, compiled, fused on cpu': how ours ran."""
    layout = "channels_last" if result["channels_last"] else "NCHW"
    extras = (", compiled" if result["compile"] else "") + (", fused" if result["fused"] else "")
    return f"{result['precision']}, {layout}{extras} on {result['device']}"


def _print_speed(result: dict, reference: bool, counted: str) -> None:
    """The reference's images/s and the speedup, then GFLOP/s and the share of peak of both (bench
    train and bench eval); `counted` says how the multiply-adds were counted."""
    if reference:
        print(
            f"reference  {result['reference_images_per_s']:.1f} images/s (fp32 NCHW)   speedup {result['speedup']:.2f}x"
        )
    faults = {"ours": result.get("page_faults_per_image"), "reference": result.get("reference_page_faults_per_image")}
    counted_faults = ", ".join(f"{k} {v:,.1f}" for k, v in faults.items() if v is not None)
    if counted_faults:
        print(
            f"page faults per image: {counted_faults} (pages of fresh allocations the OS zero-fills, part of the time)"
        )
    if "gflops_per_s" not in result:
        return
    line = (
        f"ours       {result['gflops_per_s']:.1f} GFLOP/s = {100 * result['fraction_of_peak']:.1f}% of this machine's "
    )
    line += f"{result['peak_precision']} matmul peak ({result['peak_gflops_per_s']:.0f} GFLOP/s)"
    print(line)
    if reference:
        print(
            f"reference  {result['reference_gflops_per_s']:.1f} GFLOP/s = "
            f"{100 * result['reference_fraction_of_peak']:.1f}% of the {result['reference_peak_precision']} peak"
        )
    print(f"GFLOP/s: the cost model's multiply-adds ({counted}) per second")


@_bench_command("eval")
def bench_eval_cmd(
    model: Optional[str] = typer.Argument(None, help="Preset name or model file."),
    attack: str = typer.Option("pgd20", help="clean, fgsm, pgd20 or cw40."),
    n: int = typer.Option(256, help="Synthetic images evaluated (fixed seed)."),
    batch_size: Optional[int] = typer.Option(
        None, help="Batch size [default: scaler eval's: 32 on a CPU, 256 on a GPU]."
    ),
    precision: str = typer.Option("fp32", help="fp32, bf16 or auto (bf16 where the device has it)."),
    compile_model: bool = typer.Option(
        False, "--compile", help="torch.compile ours; its compiling warm-up is reported, not timed."
    ),
    rounds: int = typer.Option(1, help="Timed passes of each (alternating); the medians are reported."),
    cuda_graphs: bool = typer.Option(False, "--cuda-graphs", help=CUDA_GRAPHS_HELP),
    as_json: bool = json_flag(),
    spec_opts: dict = None,
    bench_opts: dict = None,
) -> None:
    """Images/s of `scaler eval`'s attack evaluation vs a plain fp32 evaluation loop."""
    from trainers.bench import bench_eval

    settings = dict(attack=attack, n=n, batch_size=batch_size, precision=precision, rounds=rounds)
    settings["cuda_graphs"] = cuda_graphs
    result = _bench(bench_eval, model, spec_opts, bench_opts, as_json, compile=compile_model, **settings)
    if result is None:
        return
    print(
        f"{result['model']}: {attack} evaluation of {n} images, batch {result['batch_size']}, {_bench_setting(result)}"
    )
    print(f"ours       {result['images_per_s']:.1f} images/s ({result['seconds']:.2f} s)")
    if compile_model:
        print(f"           compiling warm-up {result['warmup_seconds']:.1f} s (not timed)")
    _print_speed(result, bench_opts["reference"], "clean and attacked forwards 1x, attack steps 2x")
