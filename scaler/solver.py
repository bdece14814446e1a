"""Budget solver: from a FLOPs or params budget to the concrete architecture a rule prescribes.

Two steps, the same for every rule:
1. Continuous. The rule maps a scale variable t to real-valued depths and widths; the exact cost of
   that continuous network is a polynomial in t (cubic for ratio rules: depth x width^2; quadratic
   for gamma rules). Its coefficients are recovered exactly by interpolating the closed-form cost
   at four points, and the unique positive root of poly(t) = target is found by bisection
   (`tests/test_solver.py` checks both against sympy's symbolic solve).
2. Integer. Every configuration in the rule's neighbourhood of the continuous point is costed
   exactly and the minimum of this objective is chosen, compared in order:
     a. excess = max(0, |cost/target - 1| - TOLERANCE)   (distance to the budget, beyond TOLERANCE, 2.5%)
     b. Euclidean distance to the continuous point        (distance to the rule's ratios/scale)
     c. |cost/target - 1|                                   (tie-break: closest to the budget)
   so the rule's shape wins among configurations within 2.5% of the budget, and the budget wins
   otherwise. Configurations over a cap (`--max-params`, `--max-flops`) are never chosen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from scaler.cost import Cost, cost_at, count, payload
from scaler.errors import ScalerError
from scaler.parsing import format_count
from scaler.presets import PRESETS
from scaler.rules import GAMMA_ARCHS, RULES, GammaRule, Point, Rule
from scaler.spec import BOTTLENECK_KNOBS, FAMILY_BLOCKS, ArchSpec, check_stages, refuse_bottleneck_knobs

TOLERANCE = 0.025
METRICS = ("flops", "params")
MAX_DEPTH = 1_000
MAX_CHANNELS = 1_000_000
PLACEHOLDER_PLANES = (256, 512, 1024)
"""Planes of the knob-carrying base spec (wide enough for any sensible knobs: 1024 // r >= 1)."""


@dataclass(frozen=True)
class Budget:
    metric: str  # "flops" or "params"
    value: int

    def of(self, cost: Cost) -> int:
        return cost.flops if self.metric == "flops" else cost.params

    def __str__(self) -> str:
        return f"{format_count(self.value)} {self.metric}"


@dataclass(frozen=True)
class Solution:
    rule: str
    spec: ArchSpec
    cost: Cost
    target: Budget
    cap: Budget | None
    scale: float
    continuous: Point
    polynomial: tuple[float, ...]
    capped: bool
    objective: tuple[float, float, float]
    published: str | None
    candidates: int = field(default=0)

    @property
    def error(self) -> float:
        """Relative error of the exact cost against the target."""
        return self.target.of(self.cost) / self.target.value - 1

    @property
    def r_d(self) -> float:
        return sum(self.spec.depths) / (sum(self.spec.depths) + sum(self.spec.widths))

    def to_dict(self) -> dict:
        pub = PRESETS[self.published] if self.published else None
        return {
            "rule": self.rule,
            **payload(self.spec, self.cost),
            "target": {"metric": self.target.metric, "value": self.target.value},
            "cap": {"metric": self.cap.metric, "value": self.cap.value} if self.cap else None,
            "capped": self.capped,
            "error": self.error,
            "r_d": self.r_d,
            "stage_ratios": {"depth": _ratios(self.spec.depths), "width": _ratios(self.spec.widths)},
            "continuous": {
                "scale": self.scale,
                "depths": list(self.continuous.depths),
                "widths": list(self.continuous.widths),
                "r_d": self.continuous.r_d,
                "polynomial": list(self.polynomial),
            },
            "objective": list(self.objective),
            "published": self.published,
            "published_match": bool(pub and pub.spec == self.spec),
            "published_spec": _published_spec(pub),
            "spec": self.spec.to_dict(),
        }


def _published_spec(preset) -> dict | None:
    if preset is None:
        return None
    cost = count(preset.spec)
    return {
        "depths": list(preset.spec.depths),
        "widths": list(preset.spec.widths),
        "params": cost.params,
        "flops": cost.flops,
    }


def _ratios(values) -> list[float]:
    last = values[-1]
    return [round(v / last, 4) for v in values]


def get_rule(name: str | Rule) -> Rule:
    """A registered rule by name; a `Rule` object is used as it is (studies sweep variants of one)."""
    if isinstance(name, Rule):
        return name
    if name not in RULES:
        raise ScalerError(f"unknown rule {name!r}; choose one of {', '.join(RULES)}")
    return RULES[name]


def _poly_fit(f) -> tuple[float, ...]:
    """Exact coefficients (constant first) of a polynomial of degree <= 3 from 4 samples."""
    xs = [1.0, 2.0, 3.0, 4.0]
    ys = [f(x) for x in xs]
    # Newton divided differences, then expand to monomial coefficients.
    coef = list(ys)
    for j in range(1, 4):
        for i in range(3, j - 1, -1):
            coef[i] = (coef[i] - coef[i - 1]) / (xs[i] - xs[i - j])
    poly = [0.0] * 4
    for i in range(3, -1, -1):  # Horner on the Newton form
        shifted = [0.0] + poly[:3]
        poly = [s - xs[i] * p for s, p in zip(shifted, poly)]
        poly[0] += coef[i]
    return tuple(poly)


def _solve_scale(f, target: float) -> float:
    """The t > 0 with f(t) = target, f increasing; bisection to machine precision."""
    lo, hi = 0.0, 1.0
    while f(hi) < target:
        lo, hi = hi, hi * 2
        if hi > 1e9:
            raise ScalerError(f"budget {format_count(target)} is beyond what scaler can build")
    for _ in range(200):
        mid = (lo + hi) / 2
        if f(mid) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return (lo + hi) / 2


def _spec_for(point: Point, base: ArchSpec) -> ArchSpec:
    """The spec of an integer point (validated)."""
    planes = tuple(int(round(p)) for p in point.planes)
    changes = dict(depths=tuple(int(d) for d in point.depths), planes=planes)
    if point.growth is not None:
        changes["growth"] = int(point.growth)
    return replace(base, **changes)


def base_spec(
    rule: Rule, block: str | None, num_classes: int, activation, resolution: int, knobs: dict | None
) -> ArchSpec:
    """A spec carrying the block knobs the rule scales (its depths and planes are placeholders)."""
    fixed = rule.arch.block if isinstance(rule, GammaRule) else None
    if fixed is not None and block is not None and block != fixed:
        raise ScalerError(f"--arch {rule.arch.name} is built from the {fixed} block, not {block}")
    block = block or fixed or rule.default_block
    if fixed is None and block in FAMILY_BLOCKS:
        arch = {"vgg": "vgg11", "dense": "densenet121"}[block]
        raise ScalerError(f"the {block} block is scaled by --rule robustwrn --arch {arch}, not by the {rule.name} rule")
    knobs = {k: v for k, v in (knobs or {}).items() if v is not None}
    if fixed is not None:
        depths, planes = rule.arch.depths, rule.arch.planes
    else:
        depths, planes = (1, 1, 1), PLACEHOLDER_PLANES
    try:
        spec = ArchSpec(
            block, depths, planes, activation=activation, num_classes=num_classes, resolution=resolution, **knobs
        )
    except ScalerError as exc:
        if fixed is None and "stage" in str(exc):
            raise ScalerError(
                f"these knobs build no {rule.name} network even at planes {PLACEHOLDER_PLANES}: {exc}"
            ) from None
        raise
    refuse_bottleneck_knobs(spec, [k for k in BOTTLENECK_KNOBS if k in knobs])  # given, if at their defaults
    return rule.check(spec)


def solve(
    rule_name: str | Rule,
    target: Budget,
    *,
    cap: Budget | None = None,
    block: str | tuple[str, ...] | None = None,
    depths: tuple[int, int, int] | None = None,
    round_to: int = 1,
    num_classes: int = 10,
    activation: str | tuple[str, ...] = "relu",
    resolution: int = 32,
    arch: str | None = None,
    **knobs,
) -> Solution:
    """The architecture `rule_name` prescribes for `target` (exact costs; see module docstring).
    `knobs` are further block knobs (norm, kernel_size, scales, ...): the rule scales any block."""
    rule = _configured(get_rule(rule_name), depths, round_to, arch)
    if target.metric not in METRICS:
        raise ScalerError(f"unknown budget metric {target.metric!r}")
    if cap is not None and cap.metric == target.metric:
        raise ScalerError(f"a {target.metric} cap next to a {target.metric} target makes no sense; give one")
    base = base_spec(rule, block, num_classes, activation, resolution, knobs)

    def metric_at(budget: Budget, t: float, growth: int | None = None) -> float:
        p = rule.continuous_at(t)
        return budget.of(cost_at(base, p.depths, p.planes, p.growth if growth is None else growth, smooth=True))

    smallest = _smallest(rule, base, target, cap)
    goal, capped = target, False
    t = _solve_scale(lambda x: metric_at(target, x), target.value)
    if cap is not None:
        t_cap = _solve_scale(lambda x: metric_at(cap, x), cap.value)
        if t_cap < t:
            t, goal, capped = t_cap, cap, True
    point = rule.continuous_at(t)
    best, best_key, n = _nearest(
        rule, point, base, goal, cap, lambda g: _solve_scale(lambda x: metric_at(goal, x, g), goal.value)
    )
    spec = _spec_for(best, base)
    _refuse_unbuildable(rule, spec, target, goal, fits=smallest is not None or best_key[0] <= 0)
    return Solution(
        rule=rule.name,
        spec=spec,
        cost=count(spec),
        target=target,
        cap=cap,
        scale=t,
        continuous=point,
        polynomial=_poly_fit(lambda x: metric_at(goal, x)),
        capped=capped,
        objective=best_key,
        published=nearest_published(family_key(rule, base), target, base),
        candidates=n,
    )


def _refuse_unbuildable(rule: Rule, spec: ArchSpec, target: Budget, goal: Budget, fits: bool) -> None:
    """Refuse a pick over the goal (unless it is known to `fit`) or beyond the depths and widths
    scaler builds."""
    if not fits and target.of(count(spec)) > goal.value:
        raise ScalerError(
            f"budget {target} is too small for the {rule.name} rule with these knobs; the smallest network they "
            f"build near it costs {format_count(target.of(count(spec)))} {target.metric}"
        )
    if max(spec.depths) > MAX_DEPTH or max(spec.planes) > MAX_CHANNELS:
        raise ScalerError(
            f"budget {target} asks for stages deeper than {MAX_DEPTH} blocks or wider than "
            f"{MAX_CHANNELS} channels; that is beyond what scaler builds"
        )


def _configured(rule: Rule, depths, round_to: int, arch: str | None) -> Rule:
    """The rule with the robustwrn rule's own settings applied (refused for other rules)."""
    if not isinstance(rule, GammaRule):
        if depths is not None or round_to != 1 or arch is not None:
            raise ScalerError(f"--depths, --round-to and --arch apply to the robustwrn rule, not {rule.name}")
        return rule
    if arch is not None:
        if arch not in GAMMA_ARCHS:
            raise ScalerError(f"unknown --arch {arch!r}; choose one of {', '.join(GAMMA_ARCHS)}")
        rule = replace(rule, arch=GAMMA_ARCHS[arch])
    if depths is not None:
        rule = replace(rule, depths=depths)
    if round_to != 1:
        if round_to < 1:
            raise ScalerError("--round-to must be >= 1")
        rule = replace(rule, round_to=round_to)
    return rule


def _smallest(rule: Rule, base: ArchSpec, target: Budget, cap: Budget | None):
    """The cost of the rule's smallest network (None where the knobs refuse its planes); a target
    or cap below it is refused."""
    try:
        smallest = count(_spec_for(rule.smallest(base), base))
    except ScalerError:  # the knobs refuse the narrowest planes (a GroupNorm on 4 channels): no floor to state
        return None
    label = base.block if isinstance(base.block, str) else ",".join(base.block)
    if target.value < target.of(smallest) * (1 - TOLERANCE):
        raise ScalerError(
            f"budget {target} is too small for the {rule.name} rule with the {label} block; "
            f"its smallest network costs {format_count(target.of(smallest))} {target.metric}"
        )
    if cap is not None and cap.value < cap.of(smallest):
        raise ScalerError(
            f"cap {cap} is below the smallest {rule.name} network ({format_count(cap.of(smallest))} {cap.metric})"
        )
    return smallest


def _nearest(rule: Rule, point: Point, base: ArchSpec, goal: Budget, cap: Budget | None, scale_at_growth):
    """(best candidate, its objective key, candidates within the cap) of the integer networks
    around the continuous point: within tolerance of the goal first, then nearest the point."""
    best, best_key, n = None, None, 0
    goal_index, cap_index = METRICS.index(goal.metric), cap and METRICS.index(cap.metric)
    for cand, dist in _neighbourhood(rule, point, base, scale_at_growth):
        flops_params = _flops_params(base, cand)
        if flops_params is None or (cap is not None and flops_params[cap_index] > cap.value):
            continue
        n += 1
        rel = abs(flops_params[goal_index] / goal.value - 1)
        key = (max(0.0, rel - TOLERANCE), dist, rel)
        if best_key is None or key < best_key:
            best, best_key = cand, key
    if best is None:
        why = f"fits under the cap {cap}" if cap is not None else "can be built with these knobs"
        raise ScalerError(f"no {rule.name} network near the budget {why}")
    return best, best_key, n


def _neighbourhood(rule: Rule, point: Point, base: ArchSpec, scale_at_growth) -> list[tuple[Point, float]]:
    """The rule's integer candidates near `point`. DenseNet's growth is coarse (one unit moves every
    layer of every stage), so each integer growth next to the continuous one gets its own scale,
    solved with that growth fixed: the stage widths absorb the growth's rounding. Distances are
    to `point` either way."""
    if point.growth is None:
        return rule.candidates(point, base)
    ref = (*point.planes, point.growth)
    out = []
    for g in sorted({max(1, math.floor(point.growth)), max(1, math.ceil(point.growth))}):
        fixed = replace(rule.continuous_at(scale_at_growth(g)), growth=g)
        out += [(c, math.dist((*c.planes, c.growth), ref)) for c, _ in rule.candidates(fixed, base)]
    return out


def _flops_params(base: ArchSpec, point: Point) -> tuple[int, int] | None:
    """(flops, params) of a candidate, or None where its knobs cannot build it (a GroupNorm that
    does not divide, an SE without hidden units)."""
    planes = tuple(int(round(p)) for p in point.planes)
    if base.family != "resnet":
        try:
            return _pf(count(_spec_for(point, base)))
        except ScalerError:
            return None
    try:
        check_stages(base.knobs, base.stem, planes)
    except ScalerError:
        return None
    return _pf(cost_at(base, point.depths, planes))


def _pf(cost: Cost) -> tuple[int, int]:
    return cost.flops, cost.params


def family_key(rule: Rule, base: ArchSpec) -> str:
    """The preset family a rule and block scale: 'robustscaling:robust', 'robustwrn:vgg11', ..."""
    if isinstance(rule, GammaRule) and rule.arch.block is not None:
        return f"{rule.name}:{rule.arch.name}"
    return f"{rule.name}:{base.block if isinstance(base.block, str) else ','.join(base.block)}"


def nearest_published(family: str, target: Budget, base: ArchSpec | None = None) -> str | None:
    """The family preset closest to the budget (log scale), if within a factor of 1.5; presets
    counted at another resolution or class count than `base` are not comparable and never named."""
    names = [
        p.name
        for p in PRESETS.values()
        if p.family == family
        and (base is None or (p.spec.resolution, p.spec.num_classes) == (base.resolution, base.num_classes))
    ]
    scored = [(abs(math.log(target.of(count(PRESETS[n].spec)) / target.value)), n) for n in names]
    if not scored:
        return None
    gap, name = min(scored)
    return name if gap <= math.log(1.5) else None
