"""Render a spec to standalone PyTorch source through the Jinja templates, and write it safely.

The templates in the top-level `templates/` folder are the project's only model implementation:
the cost-model tests, the trainer and `scaler emit` all use what `render` returns. Only validated
numbers and fixed identifiers reach the templates, so no spec can inject code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from scaler.cost import count
from scaler.errors import ScalerError
from scaler.fileio import write_text_atomic
from scaler.spec import (
    BASE_WIDTH_UNIT,
    DENSE_BOTTLENECK,
    GROUP_NORM_CHANNELS,
    INVERTED_EXPANSION,
    ROBUST_BASE_WIDTH,
    ROBUST_CARDINALITY,
    ROBUST_EXPANSION,
    ROBUST_SCALES,
    ROBUST_SE,
    ROBUST_SE_REDUCTION,
    ArchSpec,
)

BLOCK_TEMPLATES = {
    "basic": ("basic_block.py.j2", "BasicBlock"),
    "basic-post": ("basic_block.py.j2", "BasicBlock"),
    "robust": ("robust_block.py.j2", "RobustResBlock"),
    "robust-post": ("robust_block.py.j2", "RobustResBlock"),
    "inverted": ("inverted_block.py.j2", "InvertedBlock"),
}
ACTIVATIONS = {
    "relu": "nn.ReLU(inplace=True)",
    "silu": "nn.SiLU()",
    "gelu": "nn.GELU()",
    "softplus": "nn.Softplus()",
    "mish": "nn.Mish()",
    "elu": "nn.ELU()",
    "leaky_relu": "nn.LeakyReLU()",
    "prelu": "nn.PReLU()",
}
"""Module of each activation (PyTorch defaults: Softplus beta 1 threshold 20, LeakyReLU slope 0.01,
PReLU one slope initialised at 0.25)."""
NORMS = {
    "batch": "nn.BatchNorm2d(channels)",
    "group": f"nn.GroupNorm(channels // {GROUP_NORM_CHANNELS}, channels)",
    "layer": "ChannelLayerNorm(channels)",
    "instance": "nn.InstanceNorm2d(channels)",
}
"""Module of each norm, as `scaler.cost.NORM_UNITS` counts it (InstanceNorm: PyTorch's default,
no affine, no running statistics)."""

# Constructor defaults of the block classes: only knobs that differ are written out.
_KWARG_DEFAULTS = {
    "scales": ROBUST_SCALES,
    "base_width": ROBUST_BASE_WIDTH,
    "cardinality": ROBUST_CARDINALITY,
    "se": ROBUST_SE,
    "se_reduction": ROBUST_SE_REDUCTION,
    "kernel_size": 3,
    "act": "relu",
    "norm": "batch",
    "preact": True,
}

CONSTANTS = {
    **{k: v for k, v in _KWARG_DEFAULTS.items() if k not in ("act", "norm", "preact", "kernel_size")},
    "base_width_unit": BASE_WIDTH_UNIT,
    "expansion": ROBUST_EXPANSION,
    "inverted_expansion": INVERTED_EXPANSION,
    "dense_bottleneck": DENSE_BOTTLENECK,
}
"""The model constants the templates print, from `scaler.spec` (their one definition)."""


def templates_dir() -> Path:
    """`templates/` inside an installed wheel (scaler/templates) or at the source tree's root."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "templates", here.parent / "templates"):
        if (candidate / "resnet.py.j2").is_file():
            return candidate
    raise ScalerError(f"model templates not found next to {here} (broken install?)")


@lru_cache(maxsize=1)
def _environment():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        autoescape=False,
    )


@dataclass(frozen=True)
class Provenance:
    """Where a spec came from, for the emitted docstring."""

    rule: str = "manual"
    budget: str = "none"


def render(spec: ArchSpec, provenance: Provenance | None = None) -> str:
    """The complete source of a standalone model file for `spec`; deterministic."""
    from scaler import __version__

    provenance = provenance or Provenance(rule=f"preset {spec.name}" if spec.name else "manual")
    cost = count(spec)
    class_name, summary = _names(spec)
    title = f"{spec.name or class_name}: {spec.describe()}, {cost.params / 1e6:.2f}M params, "
    title += f"{cost.flops / 1e9:.3f}G FLOPs."
    knobs = spec.knobs
    acts = sorted({k.activation for k in knobs})
    norms = sorted({k.norm for k in knobs})
    context = dict(
        title=title,
        summary=summary,
        version=__version__,
        class_name=class_name,
        rule=provenance.rule,
        budget=provenance.budget,
        params=cost.params,
        flops=cost.flops,
        resolution=spec.resolution,
        spec_json=json.dumps(spec.to_dict(), sort_keys=True),
        acts=[(a, ACTIVATIONS[a]) for a in acts],
        norms=[(n, NORMS[n]) for n in norms],
        norm_names=norms,
        normalize=spec.mean is not None,
        padding=spec.padding,
        # Only the residual family has strided convs; VGG and DenseNet downsample by pooling, where
        # "same" and symmetric padding are one function (the header says so, no helper is emitted).
        same_padding=spec.padding == "same" and spec.family == "resnet",
        mean=list(spec.mean) if spec.mean else None,
        std=list(spec.std) if spec.std else None,
        out_channels=spec.out_channels,
        num_classes=spec.num_classes,
        head_norm=knobs[-1].norm,
        head_act=knobs[-1].activation,
        c=CONSTANTS,
    )
    if spec.family == "vgg":
        template = "vgg.py.j2"
        context["vgg_stages"] = _vgg_stages(spec)
    elif spec.family == "densenet":
        template = "densenet.py.j2"
        context.update(dense_stages=_dense_stages(spec), dense_stem=spec.planes[0])
    else:
        template = "resnet.py.j2"
        used = {BLOCK_TEMPLATES[k.block][0]: None for k in knobs}
        context.update(block_templates=list(used), stem=spec.stem, stages=_resnet_stages(spec))
    context["network_template"] = template
    return _environment().get_template(template).render(**context)


def _kwargs(knobs, names: tuple[str, ...]) -> list[str]:
    """'name=value' for every knob that differs from the block classes' defaults."""
    values = {"act": knobs.activation, "preact": not knobs.block.endswith("-post")}
    parts = []
    for name in names:
        value = values[name] if name in values else getattr(knobs, name)
        if value != _KWARG_DEFAULTS[name]:
            text = json.dumps(value) if isinstance(value, str) else repr(value)
            parts.append(f"{name}={text}")
    return parts


LINE_LENGTH = 120


def _call(prefix: str, args: list, indent: int, end: str = ",") -> str:
    """`prefix(args)` laid out as ruff formats it: one line if it fits, else the arguments on one
    indented line, else one per line (so emitted files are ruff-format clean)."""
    pad, inner = " " * indent, " " * (indent + 4)
    joined = ", ".join(map(str, args))
    if len(pad) + len(prefix) + len(joined) + 2 + len(end) <= LINE_LENGTH:
        return f"{pad}{prefix}({joined}){end}"
    if len(inner) + len(joined) <= LINE_LENGTH:
        return f"{pad}{prefix}(\n{inner}{joined}\n{pad}){end}"
    return f"{pad}{prefix}(\n" + "".join(f"{inner}{a},\n" for a in args) + f"{pad}){end}"


_COMMON = ("kernel_size", "act", "norm")
_BOTTLENECK = ("scales", "base_width", "cardinality", "se", "se_reduction", *_COMMON, "preact")


def _resnet_stages(spec: ArchSpec) -> list:
    out = []
    for knobs, blocks in zip(spec.knobs, spec.stage_plan()):
        names = _BOTTLENECK if knobs.bottleneck else (*_COMMON, "preact") if knobs.block != "inverted" else _COMMON
        name, extra = BLOCK_TEMPLATES[knobs.block][1], _kwargs(knobs, names)
        out.append([_call(name, [cin, planes, f"stride={stride}", *extra], 12) for cin, planes, stride in blocks])
    return out


def _vgg_stages(spec: ArchSpec) -> list:
    out, cin = [], 3
    for knobs, depth, planes in zip(spec.knobs, spec.depths, spec.planes):
        extra = _kwargs(knobs, _COMMON)
        layers = [(cin, planes)] + [(planes, planes)] * (depth - 1)
        out.append([_call("ConvNormAct", [a, b, *extra], 12) for a, b in layers])
        cin = planes
    return out


def _dense_stages(spec: ArchSpec) -> list:
    out = []
    for i, (knobs, depth, planes) in enumerate(zip(spec.knobs, spec.depths, spec.planes)):
        extra = _kwargs(knobs, _COMMON)
        calls = [_call("DenseLayer", [planes + j * spec.growth, spec.growth, *extra], 12) for j in range(depth)]
        transition = None
        if i + 1 < spec.n_stages:
            args = [planes + depth * spec.growth, spec.planes[i + 1], *_kwargs(knobs, ("act", "norm"))]
            transition = _call(f"self.trans{i + 1} = Transition", args, 8, end="")
        out.append((calls, transition))
    return out


def _names(spec: ArchSpec) -> tuple[str, str]:
    """(class name, one-line summary) of the network."""
    d, p = "-".join(map(str, spec.depths)), "-".join(map(str, spec.planes))
    if spec.family == "vgg":
        return "VGG", f"VGG (CIFAR): conv layers per stage {d}, channels {p}, a 2x2 max-pool after each stage."
    if spec.family == "densenet":
        return "DenseNet", f"DenseNet-BC (CIFAR): layers per stage {d}, stage input channels {p}, growth {spec.growth}."
    blocks = set(spec.blocks)
    if blocks == {"basic"}:
        name, kind = "WideResNet", "Pre-activation WideResNet"
    elif blocks == {"robust"}:
        name, kind = "RobustResNet", "RobustResNet"
    else:
        name, kind = "ResNet", f"ResNet ({', '.join(spec.blocks)} blocks)"
    return name, f"{kind}: depths {d}, planes {p}, stem {spec.stem}."


def write_atomic(path: Path, text: str, *, force: bool = False, parents: bool = False) -> Path:
    """Write `text` to `path` via a temp file + rename: the target is whole or untouched."""
    return write_text_atomic(path, text, force=force, parents=parents)


def emit(spec: ArchSpec, path: Path | str, *, provenance: Provenance | None = None, force=False, parents=False):
    """Render `spec` and write it to `path` atomically; refuses to overwrite unless `force`."""
    try:
        return write_atomic(Path(path), render(spec, provenance), force=force, parents=parents)
    except OSError as exc:
        raise ScalerError(f"cannot write {path}: {exc.strerror or exc}") from None


_SPEC_LINE = re.compile(r"^spec: (\{.*\})$", re.MULTILINE)


def embedded_spec(source: str) -> ArchSpec | None:
    """The spec a file rendered here records on its `spec:` line; None for other files."""
    m = _SPEC_LINE.search(source)
    if m is None:
        return None
    try:
        return ArchSpec.from_json(m.group(1))
    except ScalerError:
        return None
