"""Other codebases' state-dict names for our networks, detection from keys, and what each implies.

The published robust checkpoints come from four public implementations of the networks our
templates emit: RobustBench's WideResNet (Zagoruyko & Komodakis' layout), DeepMind's WideResNet as
RobustBench ships it (DMWideResNet: Gowal et al. 2020, Rebuffi et al. 2021), RobustBench's
RobustWideResNet (Huang et al., NeurIPS 2021; RobustWRN's RobustWideResNet34 uses the same names)
and robust-residual-network's PreActResNet (Huang et al., CVPR 2023; RobustBench's
Huang2022Revisiting entries add persistent `mu`/`sigma`). With the right names every tensor maps 1:1
by shape, in module order.

Renaming is one function, `Layout.upstream_key` (our key -> theirs); import inverts it over the
model's own keys and export applies it, so both directions come from the one table below. What a
state dict cannot show (padding, normalisation, activation) is declared per layout and checked
against the spec by `check_spec`, which refuses rather than guesses. No torch here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from scaler.errors import ScalerError
from scaler.spec import ArchSpec, normalization_name

NORM_BUFFERS = ("mu", "sigma")
"""Persistent input mean/std buffers of RobustBench's robust_resnet.py models (shape 3x1x1)."""

IDENTITY_NORM = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))

_STAGE_KEY = re.compile(r"^stage([123])\.(\d+)\.([^.]+)(\..+)$")


@dataclass(frozen=True)
class Layout:
    """One codebase's names for our modules, and what its class computes beyond its tensors.

    `normalization`: "none" (inputs used as given), "inside" (normalises with mean/std its
    checkpoints do not store: the spec must say which), "buffers" (stores them as `mu`/`sigma`, or
    has none) or "any" (our own layout: nothing to check)."""

    name: str
    upstream: str
    stem: str
    stage: str  # format of a block's prefix: {s} 1-based stage, {i} 0-based stage, {b} block
    head_bn: str
    head_fc: str
    modules: Mapping[str, str] = field(default_factory=dict)  # our block module -> theirs
    blocks: tuple[str, ...] = ("basic",)
    activations: tuple[str, ...] = ("relu", "silu")
    padding: str | None = "symmetric"  # None: any
    normalization: str = "none"
    unused: tuple[str, ...] = ()  # key prefixes the upstream class holds but never uses
    fixed_strides: bool = True

    def signature(self) -> tuple[str, str, str]:
        """Keys every checkpoint of this layout holds (stem, head BN, classifier): its detection rule."""
        return (f"{self.stem}.weight", f"{self.head_bn}.weight", f"{self.head_fc}.weight")

    def upstream_key(self, key: str) -> str:
        """Our state-dict key in this layout's names, e.g. stage2.0.shortcut.weight ->
        block2.layer.0.convShortcut.weight."""
        m = _STAGE_KEY.match(key)
        if m:
            s, b, module, rest = int(m.group(1)), m.group(2), m.group(3), m.group(4)
            return f"{self.stage.format(s=s, i=s - 1, b=b)}.{self.modules.get(module, module)}{rest}"
        head, _, rest = key.partition(".")
        top = {"stem": self.stem, "bn": self.head_bn, "fc": self.head_fc}
        return f"{top[head]}.{rest}" if head in top and rest else key

    def is_unused(self, key: str) -> bool:
        return any(key.startswith(prefix) for prefix in self.unused)


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout(
            "wideresnet",
            "RobustBench WideResNet (wide_resnet.py)",
            stem="conv1",
            stage="block{s}.layer.{b}",
            head_bn="bn1",
            head_fc="fc",
            modules={"shortcut": "convShortcut"},
            activations=("relu",),
            unused=("sub_block1.",),
        ),
        Layout(
            "dmwideresnet",
            "RobustBench DMWideResNet (dm_wide_resnet.py, DeepMind)",
            stem="init_conv",
            stage="layer.{i}.block.{b}",
            head_bn="batchnorm",
            head_fc="logits",
            modules={"bn1": "batchnorm_0", "conv1": "conv_0", "bn2": "batchnorm_1", "conv2": "conv_1"},
            padding="same",
            normalization="inside",
        ),
        Layout(
            "robustwideresnet",
            "RobustBench RobustWideResNet (robust_wide_resnet.py) / RobustWRN RobustWideResNet34",
            stem="stem_conv",
            stage="blocks.{i}.layer.{b}",
            head_bn="bn1",
            head_fc="fc",
            modules={"shortcut": "convShortcut"},
        ),
        Layout(
            "preactresnet",
            "robust-residual-network PreActResNet (RobustBench robust_resnet.py, Huang2022Revisiting)",
            stem="stem_conv",
            stage="blocks.{i}.layer.{b}",
            head_bn="norm1",
            head_fc="fc",
            modules={
                "convs": "conv2",
                "bns": "bn3",
                "se_fc1": "se.fc.0",
                "se_fc2": "se.fc.2",
                "shortcut": "shortcut.0",
            },
            blocks=("basic", "robust"),
            normalization="buffers",
        ),
        Layout(
            "scaler",
            "scaler's emitted models",
            stem="stem",
            stage="stage{s}.{b}",
            head_bn="bn",
            head_fc="fc",
            blocks=("basic", "robust"),
            padding=None,
            normalization="any",
            fixed_strides=False,
        ),
    )
}
FORMATS = tuple(LAYOUTS)


def get_layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise ScalerError(f"unknown checkpoint format {name!r}; choose one of {', '.join(FORMATS)}")
    return LAYOUTS[name]


def detect(keys: Iterable[str]) -> Layout:
    """The layout whose signature keys (stem, head BN and classifier weights) the checkpoint holds."""
    keys = set(keys)
    found = [layout for layout in LAYOUTS.values() if set(layout.signature()) <= keys]
    if len(found) == 1:
        return found[0]
    if not found:
        first = ", ".join(sorted(keys)[:4]) or "none"
        raise ScalerError(
            f"unknown checkpoint layout (keys {first}, ...): none of {', '.join(FORMATS)} matches; "
            "if it is one of them renamed, give --from FORMAT"
        )
    raise ScalerError(f"checkpoint matches several layouts ({', '.join(x.name for x in found)}); give --from FORMAT")


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _norm_flag(mean, std) -> str:
    name = normalization_name(mean, std)
    if name in ("none", "custom"):
        return f"--mean {','.join(f'{v:g}' for v in mean)} --std {','.join(f'{v:g}' for v in std)}"
    return f"--normalize {name}"


def check_spec(layout: Layout, spec: ArchSpec | None, stored: tuple | None = None) -> None:
    """Refuse a spec that would compute another function than `layout`'s class with the same
    tensors: block type, activation, strides, padding and input normalisation. `stored` is the
    checkpoint's (mu, sigma) as float triples, or None where it holds none."""
    if layout.normalization == "any":
        return
    if spec is None:
        raise ScalerError(
            f"the model file carries no scaler spec, so its padding and normalisation cannot be checked "
            f"against {layout.upstream}; use a preset or spec flags (or a file written by scaler emit)"
        )
    up = layout.upstream
    blocks = spec.blocks
    if not set(blocks) <= set(layout.blocks):
        raise ScalerError(
            f"{up} has {' or '.join(layout.blocks)} blocks, the model has {'/'.join(dict.fromkeys(blocks))} blocks"
        )
    acts = sorted({k.activation for k in spec.knobs})
    if len(acts) > 1 or acts[0] not in layout.activations:
        raise ScalerError(f"{up} uses {'/'.join(layout.activations)} throughout, the model {'/'.join(acts)}")
    # Block knobs its class does not take (the tensors would often fit, the function not).
    for k in spec.knobs:
        if k.norm != "batch" or k.kernel_size != 3:
            raise ScalerError(f"{up} uses BatchNorm and 3x3 convs: drop --norm/--kernel-size")
        if k.bottleneck and k.se != "residual":
            raise ScalerError(f"{up} has the residual SE branch in its robust blocks, the model --se {k.se}")
    if layout.fixed_strides and tuple(spec.strides) != (1, 2, 2):
        raise ScalerError(f"{up} strides its stages (1, 2, 2), the model {tuple(spec.strides)}")
    if layout.padding is not None and spec.padding != layout.padding:
        how = "(0, 1, 0, 1), TensorFlow's 'same'" if layout.padding == "same" else "1 on every side"
        raise ScalerError(f"{up} pads its strided 3x3 convs {how}: give --padding {layout.padding}")
    has = spec.mean is not None
    if layout.normalization == "none" and has:
        raise ScalerError(f"{up} takes inputs in [0, 1] without normalising: drop --normalize/--mean/--std")
    if layout.normalization == "inside" and not has:
        raise ScalerError(
            f"{up} normalises inside the model with a mean/std its checkpoints do not store (RobustBench "
            "builds it with CIFAR-10's or CIFAR-100's): give --normalize cifar10|cifar100 or --mean/--std"
        )
    if layout.normalization == "buffers":
        if stored is not None and _same(stored, IDENTITY_NORM):
            stored = None  # mu 0, sigma 1: no normalisation
        if stored is None and has:
            raise ScalerError(
                f"the checkpoint holds no mu/sigma, so {up} does not normalise: drop --normalize/--mean/--std"
            )
        if stored is not None and not (has and _same(stored, (spec.mean, spec.std))):
            now = f"the model's {_fmt(spec.mean)}/{_fmt(spec.std)}" if has else "none in the model"
            raise ScalerError(
                f"the checkpoint normalises inputs with mu {_fmt(stored[0])}, sigma {_fmt(stored[1])} "
                f"({now}): give {_norm_flag(*stored)}"
            )


def _same(a: tuple, b: tuple, tol: float = 1e-6) -> bool:
    return all(abs(x - y) <= tol for x, y in zip((*a[0], *a[1]), (*b[0], *b[1])))


@dataclass(frozen=True)
class ExportTarget:
    """Where a model goes on export: the layout, whether to write mu/sigma, how to build the class."""

    layout: Layout
    norm_buffers: bool
    constructor: str


def _uniform_wrn(spec: ArchSpec) -> tuple[int, int] | None:
    """(depth, widen factor) of a WRN-d-k spec (equal depths, planes 16k, 32k, 64k, stem 16)."""
    d, p = spec.depths, spec.planes
    k = p[0] // 16
    if spec.stem == 16 and d[0] == d[1] == d[2] and k >= 1 and p == (16 * k, 32 * k, 64 * k):
        return 6 * d[0] + 4, k
    return None


def export_target(spec: ArchSpec, to: str) -> ExportTarget:
    """The layout `to` names ('robustbench': the RobustBench class that computes this model), checked
    against the spec like an import, with how to build the class that loads it."""
    if to == "robustbench":
        layout, buffers = _robustbench(spec)
    else:
        layout = get_layout(to)
        buffers = layout.normalization == "buffers" and spec.mean is not None
    stored = None
    if buffers:
        stored = (spec.mean, spec.std) if spec.mean is not None else IDENTITY_NORM
    check_spec(layout, spec, stored)
    wrn = _uniform_wrn(spec)
    if layout.name in ("wideresnet", "dmwideresnet") and wrn is None:
        raise ScalerError(f"{layout.upstream} builds WRN-d-k only (equal depths, planes 16k-32k-64k, stem 16)")
    return ExportTarget(layout, buffers, _constructor(layout, spec, wrn, stored))


def _robustbench(spec: ArchSpec) -> tuple[Layout, bool]:
    """RobustBench's class for `spec`: DMWideResNet where it pads 'same'; robust_resnet.py's
    PreActResNet (mu/sigma always, identity without normalisation) for robust blocks, SiLU or
    normalisation; else WideResNet for WRN-d-k and RobustWideResNet for other widths."""
    if spec.padding == "same":
        return LAYOUTS["dmwideresnet"], False
    if "robust" in spec.blocks or spec.activation != "relu" or spec.mean is not None:
        return LAYOUTS["preactresnet"], True
    return (LAYOUTS["wideresnet"] if _uniform_wrn(spec) else LAYOUTS["robustwideresnet"]), False


def _constructor(layout: Layout, spec: ArchSpec, wrn: tuple[int, int] | None, stored: tuple | None) -> str:
    c = spec.num_classes
    if layout.name == "wideresnet":
        return f"WideResNet(depth={wrn[0]}, widen_factor={wrn[1]}, num_classes={c})"
    if layout.name == "dmwideresnet":
        act = "Swish" if spec.activation == "silu" else "nn.ReLU"
        return (
            f"DMWideResNet(num_classes={c}, depth={wrn[0]}, width={wrn[1]}, activation_fn={act}, "
            f"mean={_fmt(spec.mean)}, std={_fmt(spec.std)})"
        )
    if layout.name == "robustwideresnet":
        return f"RobustWideResNet(num_classes={c}, channel_configs={list(spec.channels)}, depth_configs={list(spec.depths)})"
    if layout.name == "preactresnet":
        norm = f", mu/sigma {_fmt(stored[0])}/{_fmt(stored[1])}" if stored else ""
        return (
            f"PreActResNet of robust-residual-network / RobustBench robust_resnet.py: {spec.block} blocks, "
            f"depths {list(spec.depths)}, channels {list(spec.channels)}, {spec.activation}, {c} classes{norm}"
        )
    return f"build_model() of `scaler emit` with this run's spec ({spec.describe()})"


@dataclass(frozen=True)
class ImportPlan:
    """Our key -> the checkpoint's key for every tensor the checkpoint gives, the checkpoint keys
    dropped (unused upstream modules, mu/sigma re-created by the model's normalisation) and our
    BatchNorm counters a checkpoint saved before PyTorch 0.4.1 lacks (to start at 0)."""

    mapping: dict[str, str]
    dropped: tuple[str, ...]
    counters: tuple[str, ...] = ()


COUNTER = ".num_batches_tracked"
"""BatchNorm's step counter: used only with momentum=None (ours is 0.1), so it changes no output;
PyTorch itself starts it at 0 when an old checkpoint lacks it."""


def plan_import(layout: Layout, source: Mapping[str, tuple], target: Mapping[str, tuple]) -> ImportPlan:
    """Match a checkpoint's shapes (`source`, its keys) to the model's (`target`, our keys, in module
    order) through `layout`. Refuses the first missing tensor or shape mismatch in module order, then
    the first checkpoint tensor left over, in one line that names key, expected and found shape.
    BatchNorm counters may be missing only all together (see COUNTER)."""
    mapping, problems, counters = {}, [], []
    no_counters = not any(k.endswith(COUNTER) for k in source)  # an old checkpoint: none at all
    for key, shape in target.items():
        theirs = layout.upstream_key(key)
        if theirs not in source and no_counters and key.endswith(COUNTER):
            counters.append(key)
        elif theirs not in source:
            problems.append(f"missing tensor {theirs} (our {key}, expected shape {list(shape)})")
        elif tuple(source[theirs]) != tuple(shape):
            found = tuple(source[theirs])
            hint = ""
            if key in ("fc.weight", "fc.bias") and found and shape and found[0] != shape[0]:
                hint = f"; the checkpoint has {found[0]} classes: give --classes {found[0]}"
            problems.append(f"{theirs} (our {key}): expected shape {list(shape)}, found {list(found)}{hint}")
        else:
            mapping[key] = theirs
    if problems:
        more = f" ({len(problems) - 1} more mismatches)" if len(problems) > 1 else ""
        raise ScalerError(f"checkpoint does not fit the model as {layout.name}: {problems[0]}{more}")
    used = set(mapping.values())
    buffers = NORM_BUFFERS if layout.normalization == "buffers" else ()
    dropped, extra = [], []
    for key in source:
        if key not in used:
            (dropped if layout.is_unused(key) or key in buffers else extra).append(key)
    if extra:
        raise ScalerError(
            f"checkpoint does not fit the model as {layout.name}: unexpected tensor {extra[0]} "
            f"(shape {list(source[extra[0]])}) has no place in the model"
            + (f" ({len(extra) - 1} more)" if len(extra) > 1 else "")
        )
    return ImportPlan(mapping, tuple(dropped), tuple(counters))
