"""The compiler's Python API, in the style of timm: one entry per job, names or specs accepted.

    import scaler
    spec = scaler.get_spec("robustresnet-a1")
    scaler.count(spec).params                       # 19_222_738, no torch needed
    sol = scaler.solve(flops="10G")                 # RobustScaling at 10 GFLOPs
    model = scaler.create_model(sol.spec, num_classes=100)
    scaler.emit("wrn-34-10", "wrn.py")

The CLI (`scaler_cli`) calls exactly these. torch is imported only by `create_model`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from scaler.errors import ScalerError
from scaler.spec import BOTTLENECK_KNOBS, ArchSpec, check_size, refuse_bottleneck_knobs

ModelRef = "str | ArchSpec | dict"


def get_spec(model: str | ArchSpec | dict, **changes) -> ArchSpec:
    """A spec from a preset name, a spec, or a spec dict; keyword `changes` replace fields. Refuses
    stages beyond what scaler builds (`scaler.spec.check_size`, the solver's limit)."""
    if isinstance(model, ArchSpec):
        spec = model
    elif isinstance(model, dict):
        spec = ArchSpec.from_dict(model)
    elif isinstance(model, str):
        from scaler.presets import get_preset

        spec = get_preset(model).spec
    else:
        raise ScalerError(f"a model is a preset name, an ArchSpec or a spec dict, not {type(model).__name__}")
    changes = {k: v for k, v in changes.items() if v is not None}
    spec = replace(spec, **changes) if changes else spec
    refuse_bottleneck_knobs(spec, [k for k in BOTTLENECK_KNOBS if k in changes])  # given, if at their defaults
    return check_size(spec)


def spec_from_flags(
    name: str | None = None,
    *,
    block=None,
    depths=None,
    widths=None,
    channels=None,
    classes: int | None = None,
    normalize: str | None = None,
    mean=None,
    std=None,
    **changes,
) -> ArchSpec:
    """A spec as the command line describes it: a preset `name`, or `block`, `depths` and `widths`
    (or `channels`: stem,P1,P2,P3 as count prints them, or the planes alone with a 16-channel stem;
    VGG and DenseNet take one value per stage); then the knobs in `changes` (None: not given),
    `classes` and a normalisation (`normalize` NAME, or `mean` and `std`) on top."""
    from scaler.spec import FAMILY_BLOCKS, widths_to_planes

    given = {k for k, v in dict(block=block, depths=depths, widths=widths, channels=channels).items() if v is not None}
    if name is not None:
        if given:
            raise ScalerError("give a preset name or --block/--depths/--widths, not both")
        base = get_spec(name)
    else:
        if not {"block", "depths"} <= given or not given & {"widths", "channels"}:
            raise ScalerError("give a preset name, or --block, --depths and --widths (or --channels)")
        if {"widths", "channels"} <= given:
            raise ScalerError("give --widths or --channels, not both")
        if "widths" in given and block in FAMILY_BLOCKS:
            raise ScalerError(f"the {block} block takes --channels (planes per stage), not --widths")
        stem, planes = _stem_and_planes(block, channels) if channels is not None else (16, widths_to_planes(widths))
        base = ArchSpec(block, depths, planes, stem=stem)
    return _normalized(get_spec(base, num_classes=classes, **changes), normalize, mean, std)


def _stem_and_planes(block: str, channels) -> tuple[int, tuple[int, ...]]:
    from scaler.spec import FAMILY_BLOCKS

    channels = tuple(channels)
    if block in FAMILY_BLOCKS:
        return 16, channels
    if len(channels) == 4:
        return channels[0], channels[1:]
    if len(channels) != 3:
        raise ScalerError(
            f"--channels takes stem,P1,P2,P3 (4 values, as count prints them) or P1,P2,P3 for residual blocks, "
            f"got {len(channels)} values"
        )
    return 16, channels


def _normalized(spec: ArchSpec, name: str | None, mean, std) -> ArchSpec:
    """`spec` with a named normalisation or mean/std applied (one of the two, both halves of the pair)."""
    from scaler.spec import NORMALIZATIONS

    if name is not None and (mean is not None or std is not None):
        raise ScalerError("give --normalize or --mean/--std, not both")
    if name is not None:
        if name not in NORMALIZATIONS:
            raise ScalerError(f"unknown normalisation {name!r}; choose one of {', '.join(NORMALIZATIONS)}")
        mean, std = NORMALIZATIONS[name] or (None, None)
        return replace(spec, mean=mean, std=std)
    if (mean is None) != (std is None):
        raise ScalerError("give both --mean and --std, or neither")
    return replace(spec, mean=mean, std=std) if mean is not None else spec


def count(model: str | ArchSpec | dict):
    """Exact params and fvcore FLOPs (`scaler.cost.Cost`) from the closed forms, without torch."""
    from scaler.cost import count as count_spec

    return count_spec(get_spec(model))


def solve(
    flops: int | float | str | None = None,
    params: int | float | str | None = None,
    *,
    rule: str = "robustscaling",
    max_params: int | float | str | None = None,
    max_flops: int | float | str | None = None,
    **options,
):
    """The architecture `rule` prescribes for a budget (`scaler.solver.Solution`). Budgets are
    numbers or strings such as '10G'; give one target and optionally a cap on the other metric.
    `options` are `scaler.solver.solve`'s: block, depths, round_to, num_classes, activation,
    resolution (FLOPs are counted there), arch (what the robustwrn rule reduces and scales:
    wrn34, vgg11, densenet121) and further spec knobs (norm='group', scales=4, ...)."""
    from scaler.solver import solve as solve_budget

    target, cap = budgets(flops, params, max_flops, max_params)
    return solve_budget(rule, target, cap=cap, **options)


def budgets(flops, params, max_flops=None, max_params=None):
    """(target, cap) Budgets from the four budget arguments, refusing contradictory combinations."""
    from scaler.solver import Budget

    if flops is not None and params is not None:
        raise ScalerError("give one target, --flops or --params (cap the other with --max-params/--max-flops)")
    if flops is None and params is None:
        raise ScalerError("give a budget: --flops 10G or --params 40M")
    if flops is not None:
        if max_flops is not None:
            raise ScalerError("--max-flops caps a --params target; with --flops give --max-params")
        target = Budget("flops", _budget(flops, "--flops"))
        cap = Budget("params", _budget(max_params, "--max-params")) if max_params is not None else None
    else:
        if max_params is not None:
            raise ScalerError("--max-params caps a --flops target; with --params give --max-flops")
        target = Budget("params", _budget(params, "--params"))
        cap = Budget("flops", _budget(max_flops, "--max-flops")) if max_flops is not None else None
    return target, cap


def _budget(value, what: str) -> int:
    from scaler.parsing import parse_budget

    return parse_budget(value if isinstance(value, str) else repr(value), what)


def emit(
    model: str | ArchSpec | dict,
    path: str | Path,
    *,
    force: bool = False,
    parents: bool = False,
    rule: str | None = None,
    budget: str | None = None,
) -> Path:
    """Write the standalone model file for `model`; refuses to overwrite unless `force`."""
    from scaler.codegen import Provenance
    from scaler.codegen import emit as emit_file

    provenance = Provenance(rule=rule, budget=budget) if rule or budget else None
    return emit_file(get_spec(model), path, provenance=provenance, force=force, parents=parents)


def create_model(model: str | ArchSpec | dict | Path, num_classes: int | None = None):
    """A freshly initialised torch model from a preset, a spec, or a model file (`*.py` defining
    `build_model`). `num_classes` defaults to the spec's (or the file's own default)."""
    if isinstance(model, Path) or (isinstance(model, str) and model.endswith(".py")):
        from scaler.builder import load_model_file

        return load_model_file(model, num_classes)
    from scaler.builder import build_model

    return build_model(get_spec(model), num_classes)
