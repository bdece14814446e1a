"""Exact cost model: parameters and fvcore FLOPs of a spec, from the sympy-derived closed forms.

FLOPs follow fvcore (one multiply-add = one flop; eval-mode norms and adaptive pooling counted;
activations and other elementwise ops not), so `count(spec).flops` equals
`FlopCountAnalysis(model.eval(), torch.rand(1, 3, R, R)).total()` of the rendered model and
`count(spec).params` equals the sum of `numel` over its parameters, to the integer.
Input normalisation (elementwise) and "same" padding (same output sizes) change neither, so the
spec's `mean`/`std`/`padding` do not enter here.

A residual stage costs its first block plus (depth - 1) identical identity blocks, so a network is
six block evaluations, each stage cached: microseconds, with neither torch nor sympy imported.
`count(spec)` is the one exact path: the solver, the spaces, sweeps and the synthetic benchmark
call it, or `cost_at`, which it is made of, at other depths and planes of a spec. The continuous
relaxation the solver needs (`cost_at(..., smooth=True)`, `continuous_cost`) is the same walk of
the same closed forms at real-valued depths and planes, floors dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from operator import add

from scaler import _closed_forms as cf
from scaler.spec import (
    BASE_WIDTH_UNIT,
    INVERTED_EXPANSION,
    ROBUST_EXPANSION,
    ArchSpec,
    StageKnobs,
    block_out_channels,
    split_width,
)

KINDS = ("conv", "linear", "norm", "pool")
NORM_UNITS = {"batch": (2, 2), "group": (2, 5), "layer": (2, 5), "instance": (0, 4)}
"""(parameters per channel, fvcore flops per element) of each norm as the templates build it:
affine BatchNorm (eval: a scale and a shift), affine GroupNorm and channel LayerNorm (fvcore's
estimate 5), InstanceNorm without affine (4)."""
ACT_PARAMS = {"prelu": 1}
"""Parameters of one activation module (PReLU: one shared slope); the others have none."""


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


ZERO = Cost(0, 0, 0, 0, 0)


def out_resolution(res: int | float, stride: int) -> int | float:
    """Output side of an odd k x k conv with padding k // 2 (or a 1x1): ceil(res / stride)."""
    if isinstance(res, int):
        return (res - 1) // stride + 1
    return res / stride


def _units(knobs: StageKnobs) -> tuple[int, int, int, int]:
    """(k, np, nf, ap): the kernel size and the unit costs of the stage's norm and activation."""
    np_, nf = NORM_UNITS[knobs.norm]
    return knobs.kernel_size, np_, nf, ACT_PARAMS.get(knobs.activation, 0)


def bottleneck_sizes(knobs: StageKnobs, planes, smooth: bool = False) -> tuple:
    """(w, w per group, number of k x k convs, C_mid, C_out) of a bottleneck: S = 1 is one conv on
    the whole width; S > 1 the hierarchical split (S - 1 convs, the last split passed through)."""
    if smooth:
        w = planes * knobs.base_width / BASE_WIDTH_UNIT * knobs.cardinality
    else:
        w = split_width(planes, knobs.base_width, knobs.cardinality)
    wg = w / knobs.cardinality if smooth else w // knobs.cardinality
    nconv = knobs.scales - 1 if knobs.scales > 1 else 1
    return w, wg, nconv, w * knobs.scales, planes * ROBUST_EXPANSION


def se_cost(knobs: StageKnobs, cin, mid, cout, res, ho, smooth: bool = False) -> Cost:
    """The SE of a bottleneck, by placement (Hu et al.'s variants and the residual SE):
    standard/residual act on the block output, conv3x3 on the k x k convs' output (C_mid),
    identity on the skip branch's input (C_in, before any shortcut conv)."""
    if knobs.se == "none":
        return ZERO
    channels, at = {"conv3x3": (mid, ho), "identity": (cin, res)}.get(knobs.se, (cout, ho))
    hidden = channels / knobs.se_reduction if smooth else channels // knobs.se_reduction
    _, np_, nf, _ = _units(knobs)
    return Cost(*cf.se_unit(channels, hidden, at, 1 if knobs.se == "residual" else 0, np_, nf))


def block_cost(knobs: StageKnobs, cin, planes, stride: int, res, *, smooth: bool = False, first: bool = False) -> Cost:
    """Cost of one residual block. With `smooth`, floors are dropped (w = P bw / 160 G,
    hidden = C / r) and the first block of a stage always has its projection, so the cost is a
    polynomial in real-valued planes: the form the continuous solver needs."""
    cout = block_out_channels(knobs, planes)
    ho = res / stride if smooth else out_resolution(res, stride)
    proj = 1 if (stride != 1 or cin != cout or (smooth and first)) else 0
    units = _units(knobs)
    block = knobs.block
    if block == "basic":
        return Cost(*cf.basic_block(cin, cout, res, ho, proj, *units))
    if block == "basic-post":
        return Cost(*cf.basic_post_block(cin, cout, res, ho, proj, *units))
    if block == "inverted":
        return Cost(*cf.inverted_block(cin, planes * INVERTED_EXPANSION, cout, res, ho, proj, *units))
    w, wg, nconv, mid, _ = bottleneck_sizes(knobs, planes, smooth)
    closed = cf.bottleneck_block if block == "robust" else cf.bottleneck_post_block
    core = Cost(*closed(cin, w, wg, nconv, mid, cout, res, ho, proj, *units))
    return core + se_cost(knobs, cin, mid, cout, res, ho, smooth)


def count(spec: ArchSpec) -> Cost:
    """Exact params and fvcore FLOPs of the model the templates render for `spec`: the one exact
    cost path (the CLI, the solver, the studies' spaces, sweeps and benchmarks all come here)."""
    return cost_at(spec, spec.depths, spec.planes, spec.growth)


def cost_at(base: ArchSpec, depths, planes, growth=None, *, smooth: bool = False) -> Cost:
    """The cost of `base`'s network at these depths and planes (and DenseNet growth, default the
    base's); every other field (knobs, stem, strides, resolution, classes) is the base's, and
    nothing is validated. Exact: `count` of that spec (`count` is this at the spec's own depths and
    planes), for the solver's inner loop, which checks its candidates with `check_stages` rather
    than building thousands of specs. `smooth`: the continuous relaxation at real-valued depths and
    planes (see `continuous_cost`), the same walk of the same closed forms."""
    growth = base.growth if growth is None else growth
    return _network(
        base.knobs, depths, planes, growth, base.stem, base.strides, base.resolution, base.num_classes, smooth
    )


def continuous_cost(
    knobs,
    depths: tuple[float, ...],
    planes: tuple[float, ...],
    *,
    stem: int = 16,
    strides: tuple[int, ...] = (1, 2, 2),
    resolution: int = 32,
    num_classes: int = 10,
    growth: float | None = None,
) -> Cost:
    """The cost polynomial at real-valued depths and planes (floors dropped; in residual stages
    every block after the first is an identity block, the first always has its projection).
    Agrees with `count` on published configs up to the SE floor and stage-1 projections. `knobs`
    is a block name, one StageKnobs or one per stage; VGG and DenseNet (the family is the block's)
    take their own stage counts, DenseNet also a growth. The solver calls `cost_at(base, ...,
    smooth=True)`, which takes every other field from its base spec."""
    per_stage = tuple(_stage_knobs(knobs, i) for i in range(len(depths)))
    return _network(per_stage, depths, planes, growth, stem, strides, resolution, num_classes, True)


def _network(knobs, depths, planes, growth, stem, strides, resolution, num_classes, smooth: bool) -> Cost:
    """The one walk of each family: exact (integers; residual stages and heads cached) or `smooth`."""
    res = float(resolution) if smooth else resolution
    if knobs[0].block == "vgg":
        return _vgg(knobs, depths, planes, res, num_classes)
    if knobs[0].block == "dense":
        return _densenet(knobs, depths, planes, growth, res, num_classes)
    # Summed kind by kind in network order (a float sum's last bits depend on it), spelled out: the
    # solver and the spaces cost thousands of networks, and zip and sum take twice as long.
    params, conv, linear, norm, pool = cf.stem_layer(stem, res)
    cin, h = stem, res
    for kn, depth, p, stride in zip(knobs, depths, planes, strides):
        stage = _stage(kn, cin, p, stride, h, depth, True) if smooth else _exact_stage(kn, cin, p, stride, h, depth)
        parts, cin, h = stage
        for dp, dc, dl, dn, dq in parts:
            params += dp
            conv += dc
            linear += dl
            norm += dn
            pool += dq
    dp, dc, dl, dn, dq = (_head if smooth else _exact_head)(knobs[-1], cin, h, num_classes)
    return Cost(params + dp, conv + dc, linear + dl, norm + dn, pool + dq)


def _stage(knobs: StageKnobs, cin, planes, stride: int, res, depth, smooth: bool) -> tuple:
    """((cost of the first block, of the depth - 1 identity blocks), channels out, resolution out)
    of a residual stage; with `smooth`, the first block always has its projection."""
    cout, ho = block_out_channels(knobs, planes), out_resolution(res, stride)
    if smooth:
        first = block_cost(knobs, cin, planes, stride, res, smooth=True, first=True)
        rest = block_cost(knobs, cout, planes, 1, ho, smooth=True)
    else:  # cached blocks: stages of other depths share them
        first, rest = _exact_block(knobs, cin, planes, stride, res), _exact_block(knobs, cout, planes, 1, ho)
    return (first._tuple(), rest.scaled(depth - 1)._tuple()), cout, ho


@lru_cache(maxsize=65536)
def _exact_stage(knobs: StageKnobs, cin: int, planes: int, stride: int, res: int, depth: int) -> tuple:
    """`_stage`, exact, as one cost; cached, as spaces and the solver's neighbourhoods share stages."""
    (first, rest), cout, ho = _stage(knobs, cin, planes, stride, res, depth, False)
    return (tuple(map(add, first, rest)),), cout, ho


def _head(knobs: StageKnobs, cin, res, num_classes: int) -> tuple:
    """The head's cost (its norm is the last stage's)."""
    return cf.head(cin, num_classes, res, *_units(knobs)[1:])


_exact_block = lru_cache(maxsize=65536)(block_cost)
_exact_head = lru_cache(maxsize=4096)(_head)


def _vgg(knobs, depths, planes, resolution, num_classes) -> Cost:
    total, cin, res = ZERO, 3, resolution
    for kn, depth, p in zip(knobs, depths, planes):
        units = _units(kn)
        total = (
            total + Cost(*cf.vgg_layer(cin, p, res, *units)) + Cost(*cf.vgg_layer(p, p, res, *units)).scaled(depth - 1)
        )
        cin, res = p, res // 2 if isinstance(res, int) else res / 2
    return total + Cost(*cf.vgg_head(cin, num_classes, res))


def _densenet(knobs, depths, planes, growth, resolution, num_classes) -> Cost:
    total, res = Cost(*cf.stem_layer(planes[0], resolution)), resolution
    for i, (kn, depth, p) in enumerate(zip(knobs, depths, planes)):
        units = _units(kn)
        total = total + Cost(*cf.dense_stage(p, growth, depth, depth * (depth - 1) // 2, res, *units))
        c = p + depth * growth
        if i + 1 < len(planes):
            total = total + Cost(*cf.transition(c, planes[i + 1], res, *units[1:]))
            res = res // 2 if isinstance(res, int) else res / 2
    return total + Cost(*cf.head(c, num_classes, res, *_units(knobs[-1])[1:]))


def payload(spec: ArchSpec, cost: Cost | None = None) -> dict:
    """The JSON view of a spec and its exact cost, shared by `scaler count`, `solve` and studies."""
    cost = cost if cost is not None else count(spec)
    d = spec.to_dict(omit_defaults=False)
    return {
        "name": spec.name,
        "block": d["block"],
        "depths": list(spec.depths),
        "widths": list(spec.widths),
        "channels": list(spec.channels),
        "activation": d["activation"],
        "normalize": spec.normalization,
        "padding": spec.padding,
        "num_classes": spec.num_classes,
        "resolution": spec.resolution,
        "knobs": {
            k: d[k] for k in ("norm", "kernel_size", "scales", "base_width", "cardinality", "se", "se_reduction")
        },
        "params": cost.params,
        "flops": cost.flops,
        "breakdown": cost.breakdown,
    }


def _stage_knobs(knobs, i: int) -> StageKnobs:
    """Stage i's knobs from one StageKnobs, one per stage, or a bare block name (its defaults)."""
    value = knobs[i] if isinstance(knobs, tuple) else knobs
    return StageKnobs(value) if isinstance(value, str) else value
