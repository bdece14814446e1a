"""Scaling rules: each turns a real scale variable into a continuous architecture and lists the
integer configurations near it. The solver (`scaler.solver`) does the rest, the same for all.

A rule is a small object with one interface:
  - `continuous_at(t)`    real-valued (depths, planes) at scale t; the cost is a polynomial in t
  - `candidates(point, base)`  the integer neighbourhood of a continuous point, with its distance
  - `smallest(base)`           the cheapest configuration the rule can produce
`base` is a spec that carries the block knobs (and the family); its depths and planes are unused.
To add a rule, subclass `Rule`, implement those three and register it in `RULES`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from scaler.errors import ScalerError
from scaler.spec import BASE_WIDTH_UNIT, WIDTH_BASES, ArchSpec, min_planes

LAST_STAGE_WIDTH = 0.4
"""RobustWRN's reduction: the last stage's width is 0.4 of the first stages' (w 10-10-4)."""


@dataclass(frozen=True)
class Point:
    """A (possibly real-valued) architecture: stage depths and widening factors (planes per
    `bases` channels: 16, 32, 64 for the residual family, 1 for VGG and DenseNet), and DenseNet's
    growth."""

    depths: tuple[float, ...]
    widths: tuple[float, ...]
    bases: tuple[int, ...] = WIDTH_BASES
    growth: float | None = None

    @property
    def planes(self) -> tuple[float, ...]:
        return tuple(w * b for w, b in zip(self.widths, self.bases))  # type: ignore[return-value]

    @property
    def r_d(self) -> float:
        return sum(self.depths) / (sum(self.depths) + sum(self.widths))


def _near(x: float, step: float, lowest: float, radius: int) -> list[float]:
    """Multiples of `step` around x: floor-radius+1 .. ceil+radius-1, none below `lowest`."""
    lo = math.floor(x / step) - (radius - 1)
    hi = math.ceil(x / step) + (radius - 1)
    values = sorted({max(k * step, lowest) for k in range(lo, hi + 1)})
    return [int(v) if float(v).is_integer() else v for v in values]


@dataclass(frozen=True)
class Rule:
    name: str
    summary: str
    default_block: str

    def continuous_at(self, t: float) -> Point:
        raise NotImplementedError

    def candidates(self, point: Point, base: ArchSpec) -> list[tuple[Point, float]]:
        """(configuration, distance to `point`) of every integer configuration near `point`."""
        raise NotImplementedError

    def smallest(self, base: ArchSpec) -> Point:
        raise NotImplementedError

    def check(self, base: ArchSpec) -> ArchSpec:
        """The base with this rule's architecture; refuses families the rule does not scale."""
        if base.family != "resnet":
            raise ScalerError(f"the {self.name} rule scales the residual blocks; {base.family} takes --rule robustwrn")
        return base

    def min_width(self, base: ArchSpec, stage: int) -> float:
        """Smallest widening factor the stage's block accepts (the robust block needs P >= 16)."""
        return min_planes(base.stage_knobs(stage)) / WIDTH_BASES[stage]


@dataclass(frozen=True)
class RatioRule(Rule):
    """Fixed stage ratios for depth and width plus a depth share r_D = sum D / (sum D + sum W).

    Scale variable t = sum of widening factors; then sum D = t * r_D / (1 - r_D). Integer configs:
    each depth and each widening factor (in multiples of `width_step`) ranges over the `radius`
    nearest values on either side of its continuous value.
    """

    depth_ratios: tuple[float, float, float] = (1, 1, 1)
    width_ratios: tuple[float, float, float] = (1, 1, 1)
    r_d: float = 0.5
    width_step: float = 1.0
    radius: int = 2
    uniform: bool = False
    notes: tuple[str, ...] = field(default=())

    def continuous_at(self, t: float) -> Point:
        sum_d = t * self.r_d / (1 - self.r_d)
        d = tuple(sum_d * r / sum(self.depth_ratios) for r in self.depth_ratios)
        w = tuple(t * r / sum(self.width_ratios) for r in self.width_ratios)
        return Point(d, w)  # type: ignore[arg-type]

    def _width_floor(self, base: ArchSpec, stage: int) -> float:
        step = self.width_step
        return max(step, math.ceil(self.min_width(base, stage) / step - 1e-9) * step)

    def candidates(self, point: Point, base: ArchSpec) -> list[tuple[Point, float]]:
        if self.uniform:
            # One depth n and one width k for all stages. Integer n moves the cost in big steps
            # at small depths, so for each n the widths searched sit around k* sqrt(n*/n), the
            # width that keeps n k^2 (the dominant cost term) at its continuous value.
            lowest = max(self._width_floor(base, s) for s in range(3))
            n_star, k_star = point.depths[0], point.widths[0]
            grid = (
                ((d, d, d), (w, w, w))
                for d in _near(n_star, 1, 1, self.radius)
                for w in _near(k_star * math.sqrt(n_star / d), self.width_step, lowest, self.radius)
            )
        else:
            d_opts = [_near(x, 1, 1, self.radius) for x in point.depths]
            w_opts = [
                _near(x, self.width_step, self._width_floor(base, s), self.radius) for s, x in enumerate(point.widths)
            ]
            grid = ((d, w) for d in itertools.product(*d_opts) for w in itertools.product(*w_opts))
        ref = point.depths + point.widths
        return [(Point(d, w), math.dist(d + w, ref)) for d, w in grid]

    def smallest(self, base: ArchSpec) -> Point:
        widths = tuple(self._width_floor(base, s) for s in range(3))
        if self.uniform:
            widths = (max(widths),) * 3
        return Point((1, 1, 1), widths)  # type: ignore[arg-type]


@dataclass(frozen=True)
class GammaArch:
    """An architecture the RobustWRN rule reduces and scales: its depths, its standard planes
    (channels per stage), DenseNet's growth, and the block it is built from (None: any residual
    block)."""

    name: str
    block: str | None
    depths: tuple[int, ...]
    planes: tuple[int, ...]
    growth: int | None = None
    summary: str = ""

    @property
    def reduced(self) -> tuple[float, ...]:
        """Planes after the last-stage reduction: the last stage at 0.4 of its width."""
        return (*self.planes[:-1], self.planes[-1] * LAST_STAGE_WIDTH)


GAMMA_ARCHS = {
    a.name: a
    for a in (
        GammaArch("wrn34", None, (5, 5, 5), (160, 320, 640), summary="WRN-34-10 (w 10-10-10 -> 10-10-4)"),
        GammaArch("vgg11", "vgg", (1, 1, 2, 2, 2), (64, 128, 256, 512, 512), summary="VGG-11 (CIFAR)"),
        GammaArch("densenet121", "dense", (6, 12, 24, 16), (64, 128, 256, 512), 32, summary="DenseNet-121 (BC)"),
    )
}


@dataclass(frozen=True)
class GammaRule(Rule):
    """RobustWRN (Huang et al., NeurIPS 2021): fixed depths, the last stage's width reduced to 0.4
    (w 10-10-4 on WRN-34; the same reduction on VGG-11 and DenseNet-121, the paper's section 5),
    then every width (and DenseNet's growth) scaled by gamma.

    Scale variable t = gamma. Channels round to multiples of `round_to`; the integer
    neighbourhood is the floor/ceil multiple of every stage's channels (and of the growth), and for
    bottleneck stages also the nearest channels where the split width steps."""

    arch: GammaArch = GAMMA_ARCHS["wrn34"]
    depths: tuple[int, ...] | None = None
    round_to: int = 1

    def _depths(self) -> tuple[int, ...]:
        return self.depths or self.arch.depths

    def _bases(self) -> tuple[int, ...]:
        return WIDTH_BASES if self.arch.block is None else (1,) * len(self.arch.planes)

    def check(self, base: ArchSpec) -> ArchSpec:
        want = self.arch.block
        if (want is None and base.family != "resnet") or (want is not None and base.blocks[0] != want):
            raise ScalerError(f"--arch {self.arch.name} is built from {want or 'a residual block'}, not {base.block}")
        if want is not None and self.depths is not None:
            raise ScalerError(f"--depths applies to --arch wrn34, not {self.arch.name}")
        return base

    def continuous_at(self, t: float) -> Point:
        planes = tuple(t * p for p in self.arch.reduced)
        widths = tuple(p / b for p, b in zip(planes, self._bases()))
        growth = t * self.arch.growth if self.arch.growth else None
        return Point(tuple(float(d) for d in self._depths()), widths, self._bases(), growth)  # type: ignore[arg-type]

    def _channel_floor(self, base: ArchSpec, stage: int) -> int:
        lowest = min_planes(base.stage_knobs(stage)) if base.family == "resnet" else 1
        return math.ceil(lowest / self.round_to) * self.round_to

    def candidates(self, point: Point, base: ArchSpec) -> list[tuple[Point, float]]:
        q = self.round_to
        floors = [self._channel_floor(base, s) for s in range(len(point.planes))]
        opts = []
        for s, (lo, p) in enumerate(zip(floors, point.planes)):
            steps = {q}
            if base.family == "resnet" and base.stage_knobs(s).bottleneck:
                # A bottleneck's split width steps every 160 / gcd(160, bw) channels: offer those too.
                bw = base.stage_knobs(s).base_width
                steps.add(math.lcm(q, BASE_WIDTH_UNIT // math.gcd(BASE_WIDTH_UNIT, bw)))
            opts.append(sorted({max(lo, f(p / m) * m) for m in steps for f in (math.floor, math.ceil)}))
        growths = (
            [None] if point.growth is None else sorted({max(1, math.floor(point.growth)), math.ceil(point.growth)})
        )
        ref = (*point.planes, *(() if point.growth is None else (point.growth,)))
        out = []
        for planes in itertools.product(*opts):
            widths = tuple(p / b for p, b in zip(planes, point.bases))
            for g in growths:
                here = (*planes, *(() if g is None else (g,)))
                out.append((Point(self._depths(), widths, point.bases, g), math.dist(here, ref)))
        return out

    def smallest(self, base: ArchSpec) -> Point:
        planes = [self._channel_floor(base, s) for s in range(len(self.arch.planes))]
        widths = tuple(p / b for p, b in zip(planes, self._bases()))
        return Point(self._depths(), widths, self._bases(), 1 if self.arch.growth else None)  # type: ignore[arg-type]


ROBUSTSCALING = RatioRule(
    name="robustscaling",
    summary="RobustScaling (Huang et al., CVPR 2023): D 2:2:1, W 2:2.5:1, r_D = 0.7, integer widening factors",
    default_block="robust",
    depth_ratios=(2, 2, 1),
    width_ratios=(2, 2.5, 1),
    r_d=0.7,
    width_step=1.0,
    radius=2,
)
UNIFORM = RatioRule(
    name="uniform",
    summary="standard WRN scaling: equal depth and width in all stages, n:k = 1:2 (as WRN-34-10, WRN-46-14)",
    default_block="basic",
    r_d=1 / 3,
    width_step=0.125,
    radius=3,
    uniform=True,
)
ROBUSTWRN = GammaRule(
    name="robustwrn",
    summary="RobustWRN (Huang et al., NeurIPS 2021): the last stage's width reduced to 0.4 (WRN-34: w 10-10-4), scaled by gamma",
    default_block="basic",
)

RULES: dict[str, Rule] = {r.name: r for r in (ROBUSTSCALING, ROBUSTWRN, UNIFORM)}
