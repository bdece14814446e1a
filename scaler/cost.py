"""Exact cost model: parameters and fvcore FLOPs of a spec, from the sympy-derived closed forms.

FLOPs follow fvcore (one multiply-add = one flop; eval-mode BatchNorm and adaptive pooling
counted; elementwise ops not), so `count(spec).flops` equals
`FlopCountAnalysis(model.eval(), torch.rand(1, 3, R, R)).total()` of the rendered model and
`count(spec).params` equals the sum of `numel` over its parameters, to the integer.
Input normalisation (elementwise) and "same" padding (same output sizes) change neither, so the
spec's `mean`/`std`/`padding` do not enter here.

A stage costs its first block plus (depth - 1) identical identity blocks, so a whole network is six
block evaluations: microseconds, with neither torch nor sympy imported. `continuous_cost` evaluates
the same polynomials at real-valued depths and planes for the solver's continuous problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from scaler import _closed_forms as cf
from scaler.spec import (
    ROBUST_CARDINALITY,
    ROBUST_EXPANSION,
    ROBUST_SCALES,
    ROBUST_SE_REDUCTION,
    ArchSpec,
    block_out_channels,
    robust_split_width,
)

KINDS = ("conv", "linear", "norm", "pool")


@dataclass(frozen=True)
class Cost:
    """Parameter count and fvcore FLOPs split by operator kind."""

    params: int
    conv: int
    linear: int
    norm: int
    pool: int

    @property
    def flops(self) -> int:
        return self.conv + self.linear + self.norm + self.pool

    @property
    def breakdown(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in KINDS}

    def __add__(self, other: Cost) -> Cost:
        return Cost(*(a + b for a, b in zip(self._tuple(), other._tuple())))

    def scaled(self, n: float) -> Cost:
        return Cost(*(a * n for a in self._tuple()))

    def _tuple(self) -> tuple:
        return (self.params, self.conv, self.linear, self.norm, self.pool)


def out_resolution(res: int | float, stride: int) -> int | float:
    """Output side of a 3x3/pad-1 (or 1x1) conv: ceil(res / stride)."""
    if isinstance(res, int):
        return (res - 1) // stride + 1
    return res / stride


def block_cost(block: str, cin, planes, stride: int, res, *, smooth: bool = False, first: bool = False) -> Cost:
    """Cost of one block. With `smooth`, floors are dropped (w = P/4, se = 4P/64) and the first
    block of a stage always has its projection, so the cost is a polynomial in real-valued planes:
    the form the continuous solver needs."""
    cout = block_out_channels(block, planes) if not smooth else planes * (ROBUST_EXPANSION if block == "robust" else 1)
    ho = out_resolution(res, stride) if not smooth else res / stride
    proj = 1 if (stride != 1 or cin != cout or (smooth and first)) else 0
    if block == "basic":
        return Cost(*cf.basic_block(cin, cout, res, ho, proj))
    if smooth:
        w = planes * 10 / 160 * ROBUST_CARDINALITY
        se = cout / ROBUST_SE_REDUCTION
    else:
        w = robust_split_width(planes)
        se = cout // ROBUST_SE_REDUCTION
    wg = w / ROBUST_CARDINALITY if smooth else w // ROBUST_CARDINALITY
    return Cost(*cf.robust_block(cin, w, wg, ROBUST_SCALES, se, cout, res, ho, proj))


def count(spec: ArchSpec) -> Cost:
    """Exact params and fvcore FLOPs of the model the templates render for `spec`."""
    return count_config(
        spec.block,
        tuple(spec.depths),
        tuple(spec.planes),
        spec.stem,
        tuple(spec.strides),
        spec.resolution,
        spec.num_classes,
    )


def payload(spec: ArchSpec, cost: Cost | None = None) -> dict:
    """The JSON view of a spec and its exact cost, shared by `scaler count`, `solve` and studies."""
    cost = cost if cost is not None else count(spec)
    return {
        "name": spec.name,
        "block": spec.block,
        "depths": list(spec.depths),
        "widths": list(spec.widths),
        "channels": list(spec.channels),
        "activation": spec.activation,
        "normalize": spec.normalization,
        "padding": spec.padding,
        "num_classes": spec.num_classes,
        "params": cost.params,
        "flops": cost.flops,
        "breakdown": cost.breakdown,
    }


_exact_block = lru_cache(maxsize=65536)(block_cost)


def count_config(block, depths, planes, stem=16, strides=(1, 2, 2), resolution=32, num_classes=10) -> Cost:
    """`count` without building a spec (no validation). Block costs are cached."""
    total = Cost(*cf.stem_layer(stem, resolution))
    cin, res = stem, resolution
    for depth, p, stride in zip(depths, planes, strides):
        first = _exact_block(block, cin, p, stride, res)
        res = out_resolution(res, stride)
        cout = block_out_channels(block, p)
        total = total + first + _exact_block(block, cout, p, 1, res).scaled(depth - 1)
        cin = cout
    return total + Cost(*cf.head(cin, num_classes, res))


@lru_cache(maxsize=65536)
def _stage_pf(block, cin, planes, stride, res, depth) -> tuple[int, int]:
    first = _exact_block(block, cin, planes, stride, res)
    rest = _exact_block(block, block_out_channels(block, planes), planes, 1, out_resolution(res, stride))
    return (first.params + (depth - 1) * rest.params, first.flops + (depth - 1) * rest.flops)


@lru_cache(maxsize=4096)
def _ends_pf(block, stem, p3, res_out, num_classes, resolution) -> tuple[int, int]:
    s = Cost(*cf.stem_layer(stem, resolution)) + Cost(*cf.head(block_out_channels(block, p3), num_classes, res_out))
    return (s.params, s.flops)


def params_flops(block, depths, planes, stem=16, strides=(1, 2, 2), resolution=32, num_classes=10) -> tuple[int, int]:
    """(params, flops) only, from cached per-stage sums: the solver's inner loop, where thousands
    of neighbouring configurations share their stages."""
    cin, res, params, flops = stem, resolution, 0, 0
    for depth, p, stride in zip(depths, planes, strides):
        sp, sf = _stage_pf(block, cin, p, stride, res, depth)
        params, flops = params + sp, flops + sf
        cin, res = block_out_channels(block, p), out_resolution(res, stride)
    ep, ef = _ends_pf(block, stem, planes[2], res, num_classes, resolution)
    return params + ep, flops + ef


def continuous_cost(
    block: str,
    depths: tuple[float, float, float],
    planes: tuple[float, float, float],
    *,
    stem: int = 16,
    resolution: int = 32,
    num_classes: int = 10,
) -> Cost:
    """The cost polynomial at real-valued depths and planes (floors dropped; every block after the
    first of a stage treated as an identity block, the first always with its projection). Agrees
    with `count` on published configs up to the SE floor and stage-1 projections."""
    res = float(resolution)
    total, cin = Cost(*cf.stem_layer(stem, res)), stem
    for depth, p, stride in zip(depths, planes, (1, 2, 2)):
        first = block_cost(block, cin, p, stride, res, smooth=True, first=True)
        res = res / stride
        cout = p * (ROBUST_EXPANSION if block == "robust" else 1)
        total = total + first + block_cost(block, cout, p, 1, res, smooth=True).scaled(depth - 1)
        cin = cout
    return total + Cost(*cf.head(cin, num_classes, res))
