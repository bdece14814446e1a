"""The architecture spec: an immutable, validated, JSON-round-trippable description of a CIFAR CNN.

Three families share the spec. The residual family (every block but `vgg` and `dense`) has one
skeleton (the WRN skeleton of Zagoruyko & Komodakis, as both Huang et al. papers use it): a 3x3
stem, three stages with strides (1, 2, 2) and a norm-act-pool-linear head; planes are the ground
truth and widening factors the derived view P1/16, P2/32, P3/64. VGG (`block="vgg"`, five stages
of 3x3 conv-norm-act layers, each stage closed by a 2x2 max-pool) and DenseNet-BC
(`block="dense"`, four dense stages, `planes` the channels entering each stage: the stem's output,
then each transition's) are the two other architectures of Huang et al. (NeurIPS 2021, section 5).

Block knobs (Huang et al., CVPR 2023, section 4.1) may differ per stage: each is one value for all
stages or a tuple with one value per stage. A uniform tuple is stored as its single value, so a
spec compares and serialises the same however it was written, and old spec JSON (without the
knobs) loads as the published models it described. Every family also takes the classes, the input
resolution, an optional input normalisation and the padding of strided convolutions.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property, lru_cache

from scaler.errors import ScalerError

RESIDUAL_BLOCKS = ("basic", "basic-post", "robust", "robust-post", "inverted")
BOTTLENECK_BLOCKS = ("robust", "robust-post")
FAMILY_BLOCKS = ("vgg", "dense")
BLOCKS = RESIDUAL_BLOCKS + FAMILY_BLOCKS
ACTIVATIONS = ("relu", "silu", "gelu", "softplus", "mish", "elu", "leaky_relu", "prelu")
NORMS = ("batch", "group", "layer", "instance")
SE_KINDS = ("none", "standard", "residual", "identity", "conv3x3")
KERNEL_SIZES = (1, 3, 5, 7)
WIDTH_BASES = (16, 32, 64)
"""Planes per unit widening factor in stages 1..3 (P_i = base_i * W_i)."""

# RobustResBlock hyper-parameters (Huang et al., CVPR 2023, Sec. 4.1): the defaults of the
# bottleneck knobs. Other values build other models (the reference code's own defaults S 4, bw 64,
# G 8, r 16 build a 144M-parameter "A1").
ROBUST_SCALES = 8
ROBUST_BASE_WIDTH = 10
ROBUST_CARDINALITY = 4
ROBUST_SE = "residual"
ROBUST_SE_REDUCTION = 64
ROBUST_EXPANSION = 4
BASE_WIDTH_UNIT = 160
"""Split width w = floor(P * base_width / BASE_WIDTH_UNIT) * cardinality (Res2NeXt convention)."""
INVERTED_EXPANSION = 4
"""Hidden channels of the inverted bottleneck: 4 * planes (its output is planes)."""
GROUP_NORM_CHANNELS = 8
"""GroupNorm uses C // 8 groups (the reference code's choice): it needs C >= 8 and 8-ish groups."""

DENSE_GROWTH = 32
DENSE_BOTTLENECK = 4
"""DenseNet-BC: each dense layer's 1x1 conv emits 4 * growth channels."""
FAMILY_STAGES = {"vgg": 5, "dense": 4}
MAX_DEPTH = 1_000
MAX_CHANNELS = 1_000_000
"""The largest stage scaler builds: blocks (VGG/DenseNet: layers) per stage and channels per stage
(stem and growth included). One limit, the solver's (`scaler.solver` refuses a budget that needs
more), for every spec a user gives: `check_size` runs in `scaler.api.get_spec`, which every spec
from flags, names or dicts goes through (count, emit, train, eval, create_model)."""

KNOBS = ("block", "activation", "norm", "kernel_size", "scales", "base_width", "cardinality", "se", "se_reduction")
"""Spec fields that may take one value per stage."""
BOTTLENECK_KNOBS = ("scales", "base_width", "cardinality", "se", "se_reduction")

PADDINGS = ("symmetric", "same")
"""Padding of strided 3x3 convs: 1 on every side, or TensorFlow "same" (total max((ceil(R/s)-1)s+3-R, 0),
the extra pixel right/bottom). Both give ceil(R/s) outputs, so costs do not depend on it; "same" is
what DeepMind's WideResNets (RobustBench's DMWideResNet) use: (0, 1, 0, 1) on even inputs."""

NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]] | None] = {
    "none": None,
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
"""Named per-channel (mean, std) of the inputs, as DeepMind's and RobustBench's models normalise
inside the model (inputs stay in [0, 1])."""

OPTIONAL_FIELDS = {
    "padding": "symmetric",
    "norm": "batch",
    "kernel_size": 3,
    "scales": ROBUST_SCALES,
    "base_width": ROBUST_BASE_WIDTH,
    "cardinality": ROBUST_CARDINALITY,
    "se": ROBUST_SE,
    "se_reduction": ROBUST_SE_REDUCTION,
    "growth": DENSE_GROWTH,
}
"""Fields added after the first spec format: `to_dict` writes them only when they differ from this
default, so older specs, and the files and runs that embed them, stay byte-identical."""

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class StageKnobs:
    """The block knobs of one stage: hashable, so per-stage costs can be cached on it."""

    block: str
    activation: str = "relu"
    norm: str = "batch"
    kernel_size: int = 3
    scales: int = ROBUST_SCALES
    base_width: int = ROBUST_BASE_WIDTH
    cardinality: int = ROBUST_CARDINALITY
    se: str = ROBUST_SE
    se_reduction: int = ROBUST_SE_REDUCTION

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash(tuple(getattr(self, k) for k in KNOBS)))

    def __hash__(self) -> int:  # cached: per-stage cost caches hash a StageKnobs on every lookup
        return self._hash

    @property
    def bottleneck(self) -> bool:
        return self.block in BOTTLENECK_BLOCKS


def split_width(planes: int, base_width: int = ROBUST_BASE_WIDTH, cardinality: int = ROBUST_CARDINALITY) -> int:
    """Channels of one split of a bottleneck: floor(P * base_width / 160) * cardinality."""
    return (planes * base_width // BASE_WIDTH_UNIT) * cardinality


def min_planes(knobs: StageKnobs) -> int:
    """The fewest planes a stage's block accepts: a bottleneck needs a split width >= 1, i.e.
    P * base_width >= 160 (P >= 16 for the RobustResBlock); every other block needs 1. The one
    home of this rule: the spec's validation, the solver's search floors and WAR's thin copy."""
    if knobs.bottleneck:
        return -(-BASE_WIDTH_UNIT // knobs.base_width)
    return 1


def block_out_channels(knobs: StageKnobs | str, planes: int) -> int:
    """Channels a block emits: 4P for the bottleneck family, P for every other block."""
    block = knobs if isinstance(knobs, str) else knobs.block
    return planes * ROBUST_EXPANSION if block in BOTTLENECK_BLOCKS else planes


def check_norm(norm: str, channels: int, where: str) -> None:
    """Refuse a GroupNorm that PyTorch cannot build on `channels` (groups = C // 8 must divide C)."""
    if norm != "group":
        return
    groups = channels // GROUP_NORM_CHANNELS
    if groups < 1 or channels % groups:
        raise ScalerError(
            f"--norm group uses C // {GROUP_NORM_CHANNELS} groups and needs C >= {GROUP_NORM_CHANNELS} "
            f"divisible by them; {where} normalises {channels} channels"
        )


def refuse_bottleneck_knobs(spec: ArchSpec, names: list[str]) -> None:
    """One line for bottleneck knobs given to a spec without a bottleneck stage (they would change nothing)."""
    if names and not any(k.bottleneck for k in spec.knobs):
        flags = ", ".join(f"--{a.replace('_', '-')}" for a in names)
        verb = "applies" if len(names) == 1 else "apply"
        raise ScalerError(f"{flags} {verb} to the bottleneck blocks (robust, robust-post); no stage has one")


def check_stages(knobs: tuple[StageKnobs, ...], stem: int, planes: tuple[int, ...]) -> None:
    """Refuse residual stages their knobs cannot build: planes under `min_planes`, an SE with no
    hidden unit, a GroupNorm that does not divide its channels. Cached per stage: the solver calls
    it on every candidate."""
    cin = stem
    for i, (k, p) in enumerate(zip(knobs, planes)):
        problem = _stage_problem(k, cin, p, i + 1)
        if problem:
            raise ScalerError(problem)
        cin = block_out_channels(k, p)
    check_norm(knobs[-1].norm, cin, "the head")


@lru_cache(maxsize=65536)
def _stage_problem(k: StageKnobs, cin: int, p: int, stage: int) -> str | None:
    try:
        where = f"stage {stage} (P{stage}={p})"
        if p < min_planes(k):
            return (
                f"the {k.block} block needs planes >= {min_planes(k)} (split width "
                f"floor(P*{k.base_width}/{BASE_WIDTH_UNIT})*{k.cardinality} >= 1); {where}"
            )
        if k.block in ("basic", "robust", "inverted"):
            check_norm(k.norm, cin, f"stage {stage}'s first block (input {cin} channels)")
        if not k.bottleneck:
            for c in (p, p * INVERTED_EXPANSION) if k.block == "inverted" else (p,):
                check_norm(k.norm, c, where)
            return None
        w = split_width(p, k.base_width, k.cardinality)
        if k.se != "none":
            for channels, what in ((w * k.scales if k.se == "conv3x3" else p * ROBUST_EXPANSION, where),):
                if channels < k.se_reduction:
                    return (
                        f"--se-reduction {k.se_reduction} leaves the {k.se} SE of {what} with no hidden unit "
                        f"({channels} channels // {k.se_reduction} = 0)"
                    )
            if k.se == "identity" and cin < k.se_reduction:
                return (
                    f"--se-reduction {k.se_reduction} leaves the identity SE of stage {stage}'s first block "
                    f"with no hidden unit (input {cin} channels)"
                )
        for c in (p * ROBUST_EXPANSION, w * k.scales, w):
            check_norm(k.norm, c, where)
    except ScalerError as exc:
        return str(exc)
    return None


def check_size(spec: ArchSpec) -> ArchSpec:
    """`spec`, or one line refusing a stage beyond MAX_DEPTH blocks or MAX_CHANNELS channels, the
    limit `solve` has. Not part of `validate`: the solver builds specs of any size while it searches
    and refuses its own over-limit answers with the budget in the message."""
    if max(spec.depths) > MAX_DEPTH:
        raise ScalerError(
            f"depths {','.join(map(str, spec.depths))}: stages deeper than {MAX_DEPTH} blocks are beyond what "
            "scaler builds (solve refuses them too)"
        )
    wide = max(spec.stem, spec.growth, *spec.planes)
    if wide > MAX_CHANNELS:
        raise ScalerError(
            f"{wide:,} channels: stages wider than {MAX_CHANNELS:,} channels are beyond what scaler builds "
            "(solve refuses them too)"
        )
    return spec


def widths_to_planes(widths: tuple[float, ...]) -> tuple[int, int, int]:
    """Planes from widening factors; refuses factors that do not give whole channels."""
    planes = []
    for i, (w, base) in enumerate(zip(widths, WIDTH_BASES)):
        p = w * base
        if not math.isfinite(p) or abs(p - round(p)) > 1e-9:
            raise ScalerError(
                f"widening factor W{i + 1}={w:g} gives {p:g} channels ({base}*W{i + 1}); "
                "choose a factor that gives whole channels or pass --channels"
            )
        planes.append(int(round(p)))
    return tuple(planes)  # type: ignore[return-value]


def normalization_name(mean, std) -> str:
    """The NORMALIZATIONS name of (mean, std) (equal to 1e-6), 'custom' for other values."""
    if mean is None:
        return "none"
    for name, pair in NORMALIZATIONS.items():
        if pair is not None and all(abs(a - b) <= 1e-6 for a, b in zip((*mean, *std), (*pair[0], *pair[1]))):
            return name
    return "custom"


@dataclass(frozen=True)
class ArchSpec:
    """One concrete network. Immutable; build variants with `dataclasses.replace`."""

    block: str | tuple[str, ...]
    depths: tuple[int, ...]
    planes: tuple[int, ...]
    stem: int = 16
    strides: tuple[int, int, int] = (1, 2, 2)
    activation: str | tuple[str, ...] = "relu"
    num_classes: int = 10
    resolution: int = 32
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    padding: str = "symmetric"
    name: str | None = field(default=None, compare=False)
    norm: str | tuple[str, ...] = "batch"
    kernel_size: int | tuple[int, ...] = 3
    scales: int | tuple[int, ...] = ROBUST_SCALES
    base_width: int | tuple[int, ...] = ROBUST_BASE_WIDTH
    cardinality: int | tuple[int, ...] = ROBUST_CARDINALITY
    se: str | tuple[str, ...] = ROBUST_SE
    se_reduction: int | tuple[int, ...] = ROBUST_SE_REDUCTION
    growth: int = DENSE_GROWTH

    def __post_init__(self) -> None:
        # Normalise sequences to tuples, and uniform per-stage tuples to one value, so specs built
        # from JSON/lists/flags compare and hash equal.
        for attr in ("depths", "planes", "strides", "mean", "std"):
            value = getattr(self, attr)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, attr, tuple(value))
        for attr in KNOBS:
            value = getattr(self, attr)
            if isinstance(value, (list, tuple)):
                value = tuple(value)
                if len(value) == 1 or (value and all(v == value[0] for v in value)):
                    value = value[0]
                object.__setattr__(self, attr, value)
        self.validate()

    # ----------------------------------------------------------------- per-stage views
    @property
    def family(self) -> str:
        """'resnet', 'vgg' or 'densenet' (from the block)."""
        block = self.block if isinstance(self.block, str) else self.block[0]
        return {"vgg": "vgg", "dense": "densenet"}.get(block, "resnet")

    @property
    def n_stages(self) -> int:
        return len(self.depths)

    def knob(self, name: str, stage: int):
        value = getattr(self, name)
        return value[stage] if isinstance(value, tuple) else value

    def stage_knobs(self, stage: int) -> StageKnobs:
        return StageKnobs(*(self.knob(k, stage) for k in KNOBS))

    @cached_property
    def knobs(self) -> tuple[StageKnobs, ...]:
        return tuple(self.stage_knobs(i) for i in range(self.n_stages))

    @property
    def blocks(self) -> tuple[str, ...]:
        return tuple(k.block for k in self.knobs)

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        for label, values in (("depths", self.depths), ("channels", self.planes), ("strides", self.strides)):
            for v in values:
                if isinstance(v, bool) or not isinstance(v, int):
                    raise ScalerError(f"{label} must be whole numbers, got {v!r}")
        blocks = self.block if isinstance(self.block, tuple) else (self.block,)
        for b in blocks:
            if b not in BLOCKS:
                raise ScalerError(f"unknown block {b!r}; choose one of {', '.join(BLOCKS)}")
        family_blocks = set(blocks) & set(FAMILY_BLOCKS)
        if family_blocks and len(blocks) > 1:
            raise ScalerError(f"the {family_blocks.pop()} architecture takes one --block for all stages")
        n = FAMILY_STAGES.get(blocks[0], 3)
        for label, values in (("depths", self.depths), ("channels", self.planes)):
            if len(values) != n:
                raise ScalerError(f"{label} needs {n} values (one per stage), got {len(values)}")
        if len(self.strides) != 3:
            raise ScalerError(f"strides needs 3 values (one per stage), got {len(self.strides)}")
        for attr in KNOBS:
            value = getattr(self, attr)
            if isinstance(value, tuple) and len(value) != n:
                raise ScalerError(f"--{attr.replace('_', '-')} needs 1 or {n} values (one per stage), got {len(value)}")
        if min(self.depths) < 1:
            raise ScalerError(f"every stage needs depth >= 1, got depths {list(self.depths)}")
        if min(self.planes) < 1:
            raise ScalerError(f"every stage needs channels >= 1, got {list(self.planes)}")
        if any(s not in (1, 2) for s in self.strides):
            raise ScalerError(f"strides must be 1 or 2, got {list(self.strides)}")
        for label, v in (
            ("stem", self.stem),
            ("num_classes", self.num_classes),
            ("resolution", self.resolution),
            ("growth", self.growth),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ScalerError(f"{label} must be a positive whole number, got {v!r}")
        if self.padding not in PADDINGS:
            raise ScalerError(f"unknown padding {self.padding!r}; choose one of {', '.join(PADDINGS)}")
        if self.num_classes < 2:
            raise ScalerError(f"num_classes must be >= 2, got {self.num_classes}")
        self._validate_knobs(n)
        self._validate_family()
        if (self.mean is None) != (self.std is None):
            raise ScalerError("give both mean and std for input normalisation, or neither")
        if self.mean is not None:
            for label, values in (("mean", self.mean), ("std", self.std)):
                if len(values) != 3 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                    raise ScalerError(f"{label} needs 3 finite numbers (one per RGB channel)")
            if min(self.std) <= 0:
                raise ScalerError("std values must be > 0")
        if self.name is not None and not _NAME_RE.match(self.name):
            raise ScalerError(f"name {self.name!r} may hold only letters, digits, '.', '_' and '-' (64 at most)")

    def _validate_knobs(self, n: int) -> None:
        choices = {"activation": ACTIVATIONS, "norm": NORMS, "se": SE_KINDS}
        for attr, allowed in choices.items():
            value = getattr(self, attr)
            for v in value if isinstance(value, tuple) else (value,):
                if v not in allowed:
                    raise ScalerError(f"unknown {attr.replace('_', '-')} {v!r}; choose one of {', '.join(allowed)}")
        for attr in ("kernel_size", "scales", "base_width", "cardinality", "se_reduction"):
            value = getattr(self, attr)
            for v in value if isinstance(value, tuple) else (value,):
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ScalerError(f"--{attr.replace('_', '-')} must be positive whole numbers, got {v!r}")
                if attr == "kernel_size" and v not in KERNEL_SIZES:
                    raise ScalerError(f"--kernel-size must be one of {', '.join(map(str, KERNEL_SIZES))}, got {v}")
        knobs = self.knobs
        refuse_bottleneck_knobs(self, [a for a in BOTTLENECK_KNOBS if getattr(self, a) != _DEFAULTS[a]])
        if self.family == "resnet":
            check_stages(knobs, self.stem, self.planes)

    def _validate_family(self) -> None:
        if self.family == "resnet":
            if self.growth != DENSE_GROWTH:
                raise ScalerError("growth applies to the dense block (DenseNet) only")
            return
        if self.stem != 16 or self.strides != (1, 2, 2):
            raise ScalerError(f"stem and strides apply to the residual blocks, not {self.family}")
        pools = self.n_stages if self.family == "vgg" else self.n_stages - 1
        if self.resolution >> pools < 1:
            raise ScalerError(f"{self.family} halves the resolution {pools} times; it needs >= {2**pools} pixels")
        for i, k in enumerate(self.knobs):
            if self.family == "vgg":
                check_norm(k.norm, self.planes[i], f"vgg stage {i + 1}")
            else:
                self._check_dense_stage(i, k)

    def _check_dense_stage(self, i: int, k: StageKnobs) -> None:
        c = self.planes[i]
        check_norm(k.norm, DENSE_BOTTLENECK * self.growth, "the dense layers' bottleneck")
        for layer in range(self.depths[i]):
            check_norm(k.norm, c + layer * self.growth, f"dense stage {i + 1}, layer {layer + 1}")
        check_norm(k.norm, c + self.depths[i] * self.growth, f"the end of dense stage {i + 1}")

    # ----------------------------------------------------------------- derived views
    @property
    def widths(self) -> tuple[float, ...]:
        """Widening factors (P1/16, P2/32, P3/64); ints where exact. Other families: planes."""
        if self.family != "resnet":
            return self.planes
        out = []
        for p, base in zip(self.planes, WIDTH_BASES):
            w = p / base
            out.append(int(w) if w.is_integer() else w)
        return tuple(out)  # type: ignore[return-value]

    @property
    def channels(self) -> tuple[int, ...]:
        """[stem, P1, P2, P3]: the planes view used in tables and JSON (other families: planes)."""
        return (self.stem, *self.planes) if self.family == "resnet" else self.planes

    @property
    def out_channels(self) -> int:
        """Channels entering the head (4*P3 for the bottleneck family)."""
        if self.family == "vgg":
            return self.planes[-1]
        if self.family == "densenet":
            return self.planes[-1] + self.depths[-1] * self.growth
        return block_out_channels(self.stage_knobs(2), self.planes[2])

    @property
    def total_depth(self) -> int:
        return sum(self.depths)

    def stage_plan(self) -> list[list[tuple[int, int, int]]]:
        """Per stage of the residual family, the (in_channels, planes, stride) of every block."""
        plan, cin = [], self.stem
        for knobs, depth, planes, stride in zip(self.knobs, self.depths, self.planes, self.strides):
            blocks = [(cin, planes, stride)]
            cout = block_out_channels(knobs, planes)
            blocks += [(cout, planes, 1)] * (depth - 1)
            plan.append(blocks)
            cin = cout
        return plan

    @property
    def normalization(self) -> str:
        """'none', the name of a known normalisation ('cifar10'), or 'custom'."""
        return normalization_name(self.mean, self.std)

    def describe(self) -> str:
        """A short human label, e.g. 'robust d14-14-7 w5-7-3'."""
        block = self.block if isinstance(self.block, str) else ",".join(self.block)
        if self.family != "resnet":
            extra = f" g{self.growth}" if self.family == "densenet" else ""
            return f"{block} d{'-'.join(map(str, self.depths))} c{'-'.join(map(str, self.planes))}{extra}"
        w = "-".join(f"{x:g}" for x in self.widths)
        return f"{block} d{'-'.join(map(str, self.depths))} w{w}"

    # ----------------------------------------------------------------- JSON
    def to_dict(self, omit_defaults: bool = True) -> dict:
        """The JSON object of the spec; fields of OPTIONAL_FIELDS at their default are left out
        (`omit_defaults=False`: every field, for views that list them all)."""
        d = asdict(self)
        for key in ("depths", "planes", "strides", "mean", "std", *KNOBS):
            if isinstance(d[key], tuple):
                d[key] = list(d[key])
        if omit_defaults:
            for key, default in OPTIONAL_FIELDS.items():
                if d[key] == default:
                    del d[key]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> ArchSpec:
        if not isinstance(data, dict):
            raise ScalerError("a spec must be a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ScalerError(f"unknown spec field(s): {', '.join(unknown)}")
        missing = [k for k in ("block", "depths", "planes") if k not in data]
        if missing:
            raise ScalerError(f"spec is missing field(s): {', '.join(missing)}")
        try:
            return cls(**data)
        except TypeError as exc:  # e.g. a number where a list belongs
            raise ScalerError(f"malformed spec: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> ArchSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ScalerError(f"spec is not valid JSON: {exc.msg} (line {exc.lineno})") from None
        return cls.from_dict(data)


_DEFAULTS = {f.name: f.default for f in fields(ArchSpec)}
