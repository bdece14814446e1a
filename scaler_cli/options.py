"""Options shared by several commands, declared once.

`with_options(TABLE, into="name")` adds every option of TABLE to a command's signature and hands
the command one dict `name` of the values given (None where not given). Commands therefore list
only their own options; a new spec knob or training option is one row here.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import typer

from scaler.errors import ScalerError
from scaler.parsing import parse_list


@dataclass(frozen=True)
class Opt:
    """One command-line option: its type, typer declaration and how its text becomes a value."""

    name: str
    type: Any
    help: str
    decls: tuple[str, ...] = ()
    parse: Callable[[Any], Any] | None = None
    default: Any = None

    def parameter(self) -> inspect.Parameter:
        option = typer.Option(self.default, *self.decls, help=self.help, show_default=False)
        return inspect.Parameter(self.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=self.type)


def with_options(table: list[Opt], into: str):
    """Decorator: append `table`'s options to the command and pass their parsed values as `into`."""

    def decorate(func):
        sig = inspect.signature(func)
        own = [p for p in sig.parameters.values() if p.name != into]
        added = [o.parameter() for o in table]

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            values = {}
            for o in table:
                raw = kwargs.pop(o.name)
                values[o.name] = o.parse(raw) if (o.parse and raw is not None) else raw
            return func(*args, **{into: values}, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=own + added)
        wrapper.__annotations__ = {**func.__annotations__, **{o.name: o.type for o in table}}
        return wrapper

    return decorate


# --------------------------------------------------------------------------- architecture
def _triple(what: str):
    return lambda t: parse_list(t, what, kind=float, minimum=-math.inf)


def _stages(what: str, kind=int):
    """Parser of a per-stage knob: one value (all stages) or a comma list, one per stage."""

    def parse(text: str):
        parts = [p.strip() for p in text.split(",")]
        if not 1 <= len(parts) <= 5 or any(not p for p in parts):
            raise ScalerError(f"{what} takes one value, or one per stage separated by commas, got {text!r}")
        if kind is int:
            values = []
            for p in parts:
                if not p.isdigit():
                    raise ScalerError(f"{what} must be whole numbers, got {text!r}")
                values.append(int(p))
        else:
            values = [p.lower() for p in parts]
        return values[0] if len(values) == 1 else tuple(values)

    return parse


def _stage_counts(what: str, kind=int, minimum: float = 1):
    """Parser of depths and channels: 3 values (residual blocks), 4 (dense) or 5 (vgg)."""

    def parse(text: str):
        n = len((text or "").split(","))
        if n not in (3, 4, 5):
            raise ScalerError(
                f"{what} needs 3 comma-separated values (one per stage; 4 for dense, 5 for vgg), got {text!r}"
            )
        return parse_list(text, what, kind=kind, n=n, minimum=minimum)

    return parse


def _stage_knob(name: str, help: str, kind=int) -> Opt:
    """A spec knob given once or once per stage (`--scales 8` or `--scales 8,8,4`)."""
    return Opt(name, Optional[str], help, parse=_stages("--" + name.replace("_", "-"), kind))


KNOB_OPTIONS = [
    _stage_knob(
        "activation",
        "relu, silu, gelu, softplus, mish, elu, leaky_relu or prelu; one, or one per stage "
        "(default relu, or the preset's).",
        str,
    ),
    _stage_knob("norm", "batch, group, layer or instance; one, or one per stage.", str),
    _stage_knob("kernel_size", "Kernel size of the k x k convs: 1, 3, 5 or 7, per stage."),
    _stage_knob("scales", "Bottleneck: hierarchical scales S (1: no split) [default 8]."),
    _stage_knob("base_width", "Bottleneck: base width bw, w = floor(P*bw/160)*G [default 10]."),
    _stage_knob("cardinality", "Bottleneck: groups G of the k x k convs [default 4]."),
    _stage_knob("se", "Bottleneck SE: none, standard, residual, identity or conv3x3 [default residual].", str),
    _stage_knob("se_reduction", "Bottleneck: SE reduction r [default 64]."),
    Opt("growth", Optional[int], "Dense block: growth rate [default 32]."),
    Opt("resolution", Optional[int], "Input resolution the FLOPs are counted at (default 32; 64 for Tiny-ImageNet)."),
]
KNOBS = tuple(o.name for o in KNOB_OPTIONS)

SPEC_OPTIONS = [
    Opt(
        "block",
        Optional[str],
        "Spec flags instead of a preset: basic, basic-post, robust, robust-post, inverted (one, or one per "
        "stage), vgg or dense.",
        parse=_stages("--block", str),
    ),
    Opt("depths", Optional[str], "Blocks per stage, e.g. 14,14,7.", parse=_stage_counts("--depths")),
    Opt(
        "widths",
        Optional[str],
        "Widening factors per stage, e.g. 5,7,3 (planes 16W1, 32W2, 64W3).",
        parse=lambda t: parse_list(t, "--widths", kind=float, minimum=1e-9),
    ),
    Opt(
        "channels",
        Optional[str],
        "Channels instead of --widths, as count and solve print them: stem,P1,P2,P3, e.g. 16,80,224,192, or the "
        "planes P1,P2,P3 alone (stem 16); vgg: 5 values, dense: 4.",
        parse=_stage_counts("--channels"),
    ),
    *KNOB_OPTIONS,
    Opt("classes", Optional[int], "Number of classes (default 10)."),
    Opt("normalize", Optional[str], "Normalise inputs inside the model: none, cifar10 or cifar100 (mean/std)."),
    Opt(
        "mean", Optional[str], "Custom per-channel input mean, e.g. 0.5,0.5,0.5 (with --std).", parse=_triple("--mean")
    ),
    Opt(
        "std", Optional[str], "Custom per-channel input std, e.g. 0.25,0.25,0.25 (with --mean).", parse=_triple("--std")
    ),
    Opt(
        "padding",
        Optional[str],
        "Strided k x k convs: symmetric (default) or same (TensorFlow, DeepMind's WRNs); vgg and dense have none.",
    ),
]
STRUCTURE = ("block", "depths", "widths", "channels")
SPEC_FLAGS_NOT_FOR_FILES = (*KNOBS, "normalize", "mean", "std", "padding")
"""Flags that change a spec: refused with a model file (which they would not change)."""


def spec_from_options(name: str | None, opts: dict):
    """A spec from a preset name or the spec flags (`scaler.api.spec_from_flags`)."""
    from scaler.api import spec_from_flags

    return spec_from_flags(name, **opts)


def model_from_options(model: str | None, opts: dict) -> tuple[str, object]:
    """(label, spec or None) for commands that also take a model file: a preset, a `.py` file with
    build_model(), or spec flags."""
    if model is not None and (model.endswith(".py") or Path(model).is_file()):
        if any(opts.get(k) is not None for k in STRUCTURE):
            raise ScalerError("give a model file or --block/--depths/--widths, not both")
        ignored = [k for k in SPEC_FLAGS_NOT_FOR_FILES if opts.get(k) is not None]
        if ignored:
            flag = ignored[0].replace("_", "-")
            raise ScalerError(f"--{flag} changes a spec, not a model file: emit the file with it instead")
        if not Path(model).is_file():
            raise ScalerError(f"model file {model} not found")
        return str(Path(model).resolve()), None
    if model is None and opts.get("block") is None:
        raise ScalerError("give MODEL (a preset or a model file) or --block/--depths/--widths")
    return model or "spec", spec_from_options(model, opts)


# --------------------------------------------------------------------------- training
def _eps(text: str) -> float:
    from trainers.config import parse_eps

    return parse_eps(text)


def _int_list(what: str):
    return lambda t: tuple(parse_list(t, what, n=len(t.split(","))))


def _field_help(name: str) -> str:
    from dataclasses import fields

    from trainers.config import TrainConfig

    return next(f.metadata["help"] for f in fields(TrainConfig) if f.name == name)


FUSED_HELP = _field_help("fused")
"""--fused/--no-fused: one meaning in train, eval and bench (trainers.fused.resolve_fused)."""


def json_flag(what: str = "one JSON object"):
    """The --json flag of a command that prints `what` instead of its table."""
    return typer.Option(False, "--json", help=f"Print {what}.")


def force_flag(help: str = "Overwrite an existing file."):
    """The --force flag: replace what a command would otherwise refuse to overwrite."""
    return typer.Option(False, "--force", help=help)


def quiet_flag(help: str = "No progress bar."):
    """The --quiet flag: no progress output on stderr."""
    return typer.Option(False, "--quiet", help=help)


CUDA_GRAPHS_HELP = "Replay our attack steps as recorded CUDA graphs (GPU; fewer kernel launches; ignored on a CPU)."

BENCH_OPTIONS = [
    Opt("channels_last", bool, "channels_last tensors.", ("--channels-last/--no-channels-last",), default=True),
    Opt("fused", Optional[bool], FUSED_HELP, ("--fused/--no-fused",)),
    Opt("reference", bool, "Also time the fp32 reference loop.", ("--reference/--no-reference",), default=True),
    Opt("device", str, "auto, cpu or cuda.", default="auto"),
]
"""The options bench train and bench eval share (their values go to trainers.bench as they are)."""


def _train_opts() -> list[Opt]:
    """An option for every TrainConfig field that declares one (`trainers.config.option`): its
    help and default, the flag, its type from the field's."""
    from dataclasses import fields

    from trainers.config import TrainConfig

    defaults, opts = TrainConfig(), []
    for f in fields(TrainConfig):
        meta = f.metadata
        if "help" not in meta:
            continue
        parse = {"eps": _eps, "int_list": _int_list("--" + f.name.replace("_", "-"))}.get(meta["parse"])
        kind = str if parse else next(t for t in (bool, int, float, str) if f.type.startswith(t.__name__))
        help = meta["help"]
        shown = getattr(defaults, f.name)
        if meta["shown"] and shown is not None:
            help = f"{help} [default: {f'{shown:.5g}' if isinstance(shown, float) else shown}]"
        flag = "--" + f.name.replace("_", "-")
        decls = (meta["flag"] or f"{flag}/--no-{flag[2:]}",) if kind is bool else ()
        opts.append(Opt(f.name, Optional[kind], help, decls, parse))
    return opts


TRAIN_OPTIONS = _train_opts()


def _init_model(init: str):
    """(label, spec) of the model in the --init-from run: its spec, or its model.py."""
    from scaler.spec import ArchSpec
    from trainers.checkpoint import run_model

    _, spec = run_model(init)
    if spec is not None:
        return f"init-from {init}", ArchSpec.from_dict(spec)
    if not (Path(init) / "model.py").is_file():
        raise ScalerError(f"--init-from {init} records no model: give MODEL to train")
    return str((Path(init) / "model.py").resolve()), None


def train_config(model: str | None, spec_opts: dict, train_opts: dict, recipe: str | None, war_calibrate: bool):
    """The TrainConfig the train options describe (defaults < recipe < flags). With --init-from and
    no model given, the model is the one of that run."""
    init = train_opts.get("init_from")
    if init is not None and not Path(init).exists():
        raise ScalerError(f"--init-from {init}: no such run directory or checkpoint")
    if model is None and init is not None and not any(v is not None for v in spec_opts.values()):
        label, spec = _init_model(init)
    else:
        label, spec = model_from_options(model, spec_opts)
    if spec is not None:
        from dataclasses import replace

        from trainers.config import RECIPES, TrainConfig
        from trainers.data import NUM_CLASSES, RESOLUTION

        # The run's model.py counts params and FLOPs for the classes and resolution it trains on.
        dataset = train_opts.get("dataset") or RECIPES.get(recipe or "", {}).get("dataset") or TrainConfig().dataset
        resolution = spec_opts.get("resolution") or RESOLUTION.get(dataset, spec.resolution)
        spec = replace(spec, resolution=resolution, num_classes=NUM_CLASSES.get(dataset, spec.num_classes))
    fields = dict(model=label, spec=spec.to_dict() if spec is not None else None)
    if init is not None:
        fields["init_from"] = str(Path(init).resolve())  # a resume from elsewhere finds it
    if war_calibrate:
        fields["war_calibrate"] = True
    return recipe_config(train_opts, recipe, **fields)


def recipe_config(train_opts: dict, recipe: str | None, **fields):
    """The TrainConfig of the train options without a model (sweeps set one per trial)."""
    from trainers.config import make_config

    overrides = {k: v for k, v in train_opts.items() if k != "milestones"}
    overrides.update(fields)
    return make_config(recipe, overrides, milestone_epochs=train_opts.get("milestones"))
