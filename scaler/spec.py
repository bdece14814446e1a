"""The architecture spec: an immutable, validated, JSON-round-trippable description of a CIFAR CNN.

Every model in scaler shares one skeleton (the WRN skeleton of Zagoruyko & Komodakis, as both Huang et al. papers use it): a 3x3 stem, three stages with
strides (1, 2, 2) and a BN-act-pool-linear head. A spec fixes what varies: the block type, the
per-stage depths and planes, the stem width, the activation, the classes, the input resolution, an
optional input normalisation and the padding of strided 3x3 convolutions. Planes are the ground
truth; widening factors are the derived view P1/16, P2/32, P3/64.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field

from scaler.errors import ScalerError

BLOCKS = ("basic", "robust")
ACTIVATIONS = ("relu", "silu")
WIDTH_BASES = (16, 32, 64)
"""Planes per unit widening factor in stages 1..3 (P_i = base_i * W_i)."""

# RobustResBlock hyper-parameters (Huang et al., CVPR 2023, Sec. 4.1): other values build other models.
ROBUST_SCALES = 8
ROBUST_BASE_WIDTH = 10
ROBUST_CARDINALITY = 4
ROBUST_SE_REDUCTION = 64
ROBUST_EXPANSION = 4

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

OPTIONAL_FIELDS = {"padding": "symmetric"}
"""Fields added after the first spec format: `to_dict` writes them only when they differ from this
default, so older specs, and the files and runs that embed them, stay byte-identical."""

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def robust_split_width(planes: int) -> int:
    """Channels of one hierarchical split: floor(P * base_width / 160) * cardinality."""
    return (planes * ROBUST_BASE_WIDTH // 160) * ROBUST_CARDINALITY


def block_out_channels(block: str, planes: int) -> int:
    """Channels a block emits: P for the basic block, 4P for the (bottleneck) RobustResBlock."""
    return planes * ROBUST_EXPANSION if block == "robust" else planes


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

    block: str
    depths: tuple[int, int, int]
    planes: tuple[int, int, int]
    stem: int = 16
    strides: tuple[int, int, int] = (1, 2, 2)
    activation: str = "relu"
    num_classes: int = 10
    resolution: int = 32
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    padding: str = "symmetric"
    name: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        # Normalise sequences to tuples so specs built from JSON/lists compare and hash equal.
        for attr in ("depths", "planes", "strides", "mean", "std"):
            value = getattr(self, attr)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, attr, tuple(value))
        self.validate()

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        if self.block not in BLOCKS:
            raise ScalerError(f"unknown block {self.block!r}; choose one of {', '.join(BLOCKS)}")
        if self.activation not in ACTIVATIONS:
            raise ScalerError(f"unknown activation {self.activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        for label, values in (("depths", self.depths), ("channels", self.planes), ("strides", self.strides)):
            if len(values) != 3:
                raise ScalerError(f"{label} needs 3 values (one per stage), got {len(values)}")
            for v in values:
                if isinstance(v, bool) or not isinstance(v, int):
                    raise ScalerError(f"{label} must be whole numbers, got {v!r}")
        if min(self.depths) < 1:
            raise ScalerError(f"every stage needs depth >= 1, got depths {list(self.depths)}")
        if min(self.planes) < 1:
            raise ScalerError(f"every stage needs channels >= 1, got {list(self.planes)}")
        if any(s not in (1, 2) for s in self.strides):
            raise ScalerError(f"strides must be 1 or 2, got {list(self.strides)}")
        for label, v in (("stem", self.stem), ("num_classes", self.num_classes), ("resolution", self.resolution)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ScalerError(f"{label} must be a positive whole number, got {v!r}")
        if self.padding not in PADDINGS:
            raise ScalerError(f"unknown padding {self.padding!r}; choose one of {', '.join(PADDINGS)}")
        if self.num_classes < 2:
            raise ScalerError(f"num_classes must be >= 2, got {self.num_classes}")
        if self.block == "robust":
            for i, p in enumerate(self.planes):
                if robust_split_width(p) < 1:
                    raise ScalerError(
                        f"robust block needs planes >= 16 (split width floor(P*10/160)*4 >= 1); "
                        f"stage {i + 1} has P{i + 1}={p}"
                    )
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

    # ----------------------------------------------------------------- derived views
    @property
    def widths(self) -> tuple[float, float, float]:
        """Widening factors (P1/16, P2/32, P3/64); ints where exact."""
        out = []
        for p, base in zip(self.planes, WIDTH_BASES):
            w = p / base
            out.append(int(w) if w.is_integer() else w)
        return tuple(out)  # type: ignore[return-value]

    @property
    def channels(self) -> tuple[int, int, int, int]:
        """[stem, P1, P2, P3]: the planes view used in tables and JSON."""
        return (self.stem, *self.planes)

    @property
    def out_channels(self) -> int:
        """Channels entering the head (4*P3 for the robust block)."""
        return block_out_channels(self.block, self.planes[2])

    @property
    def total_depth(self) -> int:
        return sum(self.depths)

    def stage_plan(self) -> list[list[tuple[int, int, int]]]:
        """Per stage, the (in_channels, planes, stride) of every block, in order."""
        plan, cin = [], self.stem
        for depth, planes, stride in zip(self.depths, self.planes, self.strides):
            blocks = [(cin, planes, stride)]
            cout = block_out_channels(self.block, planes)
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
        w = "-".join(f"{x:g}" for x in self.widths)
        return f"{self.block} d{'-'.join(map(str, self.depths))} w{w}"

    # ----------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("depths", "planes", "strides", "mean", "std"):
            if d[key] is not None:
                d[key] = list(d[key])
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
