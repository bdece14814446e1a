"""Scaling rules: each turns a real scale variable into a continuous architecture and lists the
integer configurations near it. The solver (`scaler.solver`) does the rest, the same for all.

A rule is a small object with one interface:
  - `continuous_at(t)`    real-valued (depths, planes) at scale t; the cost is a polynomial in t
  - `candidates(point)`   the integer neighbourhood of a continuous point, with its distance
  - `smallest()`          the cheapest configuration the rule can produce
To add a rule, subclass `Rule`, implement those three and register it in `RULES`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from scaler.spec import WIDTH_BASES


@dataclass(frozen=True)
class Point:
    """A (possibly real-valued) architecture: stage depths and widening factors."""

    depths: tuple[float, float, float]
    widths: tuple[float, float, float]

    @property
    def planes(self) -> tuple[float, float, float]:
        return tuple(w * b for w, b in zip(self.widths, WIDTH_BASES))  # type: ignore[return-value]

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

    def candidates(self, point: Point, block: str) -> list[tuple[tuple, tuple, float]]:
        """(depths, widths, distance to `point`) of every integer configuration near `point`."""
        raise NotImplementedError

    def smallest(self, block: str) -> Point:
        raise NotImplementedError

    def min_width(self, block: str, stage: int) -> float:
        """Smallest widening factor a block accepts (the robust block needs P >= 16)."""
        return 16 / WIDTH_BASES[stage] if block == "robust" else 1 / WIDTH_BASES[stage]


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

    def _width_floor(self, block: str, stage: int) -> float:
        step = self.width_step
        return max(step, math.ceil(self.min_width(block, stage) / step - 1e-9) * step)

    def candidates(self, point: Point, block: str) -> list[tuple[tuple, tuple, float]]:
        if self.uniform:
            # One depth n and one width k for all stages. Integer n moves the cost in big steps
            # at small depths, so for each n the widths searched sit around k* sqrt(n*/n), the
            # width that keeps n k^2 (the dominant cost term) at its continuous value.
            lowest = max(self._width_floor(block, s) for s in range(3))
            n_star, k_star = point.depths[0], point.widths[0]
            grid = (
                ((d, d, d), (w, w, w))
                for d in _near(n_star, 1, 1, self.radius)
                for w in _near(k_star * math.sqrt(n_star / d), self.width_step, lowest, self.radius)
            )
        else:
            d_opts = [_near(x, 1, 1, self.radius) for x in point.depths]
            w_opts = [
                _near(x, self.width_step, self._width_floor(block, s), self.radius) for s, x in enumerate(point.widths)
            ]
            grid = ((d, w) for d in itertools.product(*d_opts) for w in itertools.product(*w_opts))
        ref = point.depths + point.widths
        return [(d, w, math.dist(d + w, ref)) for d, w in grid]

    def smallest(self, block: str) -> Point:
        widths = tuple(self._width_floor(block, s) for s in range(3))
        if self.uniform:
            widths = (max(widths),) * 3
        return Point((1, 1, 1), widths)  # type: ignore[arg-type]


@dataclass(frozen=True)
class GammaRule(Rule):
    """RobustWRN (Huang et al., NeurIPS 2021): fixed depths, planes = gamma * base planes (w 10-10-4 by default).

    Scale variable t = gamma. Channels round to the nearest multiple of `round_to`; the integer
    neighbourhood is the floor/ceil multiple of every stage's channels."""

    depths: tuple[int, int, int] = (5, 5, 5)
    base_planes: tuple[int, int, int] = (160, 320, 256)
    round_to: int = 1

    def continuous_at(self, t: float) -> Point:
        widths = tuple(t * p / b for p, b in zip(self.base_planes, WIDTH_BASES))
        return Point(tuple(float(d) for d in self.depths), widths)  # type: ignore[arg-type]

    def _channel_floor(self, block: str) -> int:
        lowest = 16 if block == "robust" else 1
        return math.ceil(lowest / self.round_to) * self.round_to

    def candidates(self, point: Point, block: str) -> list[tuple[tuple, tuple, float]]:
        q, lowest = self.round_to, self._channel_floor(block)
        opts = [sorted({max(lowest, math.floor(p / q) * q), max(lowest, math.ceil(p / q) * q)}) for p in point.planes]
        out = []
        for planes in itertools.product(*opts):
            widths = tuple(p / b for p, b in zip(planes, WIDTH_BASES))
            out.append((self.depths, widths, math.dist(planes, point.planes)))
        return out

    def smallest(self, block: str) -> Point:
        low = self._channel_floor(block)
        return Point(self.depths, tuple(low / b for b in WIDTH_BASES))  # type: ignore[arg-type]


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
    summary="RobustWRN (Huang et al., NeurIPS 2021): WRN-34 depths, width config w 10-10-4 scaled by gamma",
    default_block="basic",
)

RULES: dict[str, Rule] = {r.name: r for r in (ROBUSTSCALING, ROBUSTWRN, UNIFORM)}
