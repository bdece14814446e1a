"""Design spaces: the architectures a study sweeps, each with an id and its exact cost.

A space is a built-in name or a YAML file of choices over spec fields:

    block: basic                                   # a scalar is fixed
    activation: [relu, silu]                       # a list is a choice
    depths: [[4, 5, 7], [4, 5, 7], 5]              # per stage: a choice list or a fixed value
    widths: [[8, 10], [8, 10], [8, 10]]            # or channels: planes per stage
    constraints: {flops: [null, 10G], params: [1M, 100M]}

Stage fields (depths, widths, channels, strides) take one entry per stage, or one scalar for all
three. Fields holding a tuple (mean, std) take a flat list as a fixed value and a list of lists as
choices. Every combination is costed exactly (`scaler.cost.count`: the cached closed forms, no
torch) and filtered by the constraints (bounds inclusive, null = open).

Ids: architectures are numbered 1..N in ascending exact FLOPs (= MACs), ties broken by ascending
params, then by (D1, W1, D2, W2, D3, W3) in ascending order, then by block and activation name,
so a space always numbers its architectures the same way (NARes's arch_id convention). The r_D
sweep (`rd-<budget>`) is numbered in ascending r_D instead, the axis it studies.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import re
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path

from scaler.cost import count
from scaler.errors import ScalerError
from scaler.parsing import parse_budget
from scaler.spec import KNOBS, ArchSpec, widths_to_planes

MAX_ARCHS = 1_000_000
"""Largest space a file may describe (before constraints): a guard against a typo's explosion."""

STAGE_FIELDS = ("depths", "widths", "channels", "strides")
SPEC_KEYS = tuple(f.name for f in fields(ArchSpec) if f.name not in ("planes", "name"))
SPACE_KEYS = ("name", "description", "constraints")
CONSTRAINT_KEYS = ("flops", "params")

NARES_DEPTHS = (4, 5, 7, 9, 11)
NARES_WIDTHS = (8, 10, 12, 14, 16)
RRN_DEPTHS = (2, 3, 4, 5, 7, 9, 11)
RRN_WIDTHS = (4, 6, 8, 10, 12, 14, 16, 20)
RRN_FIXED_DEPTHS = (5, 5, 5)
"""Seed 001 s4.2.1 fixes 'the baseline settings'; it prints none, so we fix WRN-34-10's."""
RRN_FIXED_WIDTHS = (10, 10, 10)
RD_STEPS = tuple(round(0.30 + 0.05 * i, 2) for i in range(14))
"""Seed 001 Fig. 8: r_D = sum D / (sum D + sum W) from 0.30 to 0.95."""
RD_RE = re.compile(r"^rd-([0-9.eE+]+[kKmMgGtT]?)(?:-(basic|robust))?$")
BUILTINS = {
    "nares": "NARes (seed 003): D_i in {4,5,7,9,11}, W_i in {8,10,12,14,16}, basic block: 15,625 WRNs",
    "rrn-depth": "seed 001 s4.2.1: D_i in {2,3,4,5,7,9,11} at widths 10-10-10 (343 networks)",
    "rrn-width": "seed 001 s4.2.1: W_i in {4,6,8,10,12,14,16,20} at depths 5-5-5 (512 networks)",
    "rd-<budget>": "seed 001 Fig. 8: one solved network per r_D in 0.30..0.95 (step 0.05) at a FLOPs budget",
}


@dataclass(frozen=True)
class Arch:
    """One architecture of a space: its id, spec, exact cost, and space-specific tags (r_D)."""

    arch_id: int
    spec: ArchSpec
    params: int
    flops: int
    tags: dict = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict:
        """The JSON view `scaler space --json` prints (spec fields + exact cost)."""
        s = self.spec
        return {
            "arch_id": self.arch_id,
            "block": s.block,
            "depths": list(s.depths),
            "widths": list(s.widths),
            "channels": list(s.channels),
            "activation": s.activation,
            "params": self.params,
            "flops": self.flops,
            **self.tags,
        }


@dataclass(frozen=True)
class Space:
    """An ordered set of architectures; ids are stable for a given definition."""

    name: str
    archs: tuple[Arch, ...]
    description: str = ""

    def __len__(self) -> int:
        return len(self.archs)

    @cached_property
    def _index(self) -> dict[int, Arch]:
        return {a.arch_id: a for a in self.archs}

    def by_id(self, arch_id: int) -> Arch:
        try:
            return self._index[arch_id]
        except KeyError:
            raise ScalerError(f"space {self.name} has no architecture {arch_id}") from None

    def fingerprint(self) -> str:
        """A hash of every (id, spec): a study refuses a space that numbers architectures otherwise."""
        h = hashlib.sha256()
        for a in self.archs:
            h.update(f"{a.arch_id}:{identity(a.spec)!r}\n".encode())
        return h.hexdigest()[:16]

    def sample(self, n: int, seed: int = 0) -> Space:
        """A seeded subset of `n` architectures, keeping their ids (in id order)."""
        if n < 1:
            raise ScalerError("--sample must be >= 1")
        if n > len(self.archs):
            raise ScalerError(f"--sample {n} exceeds the {len(self.archs)} architectures of {self.name}")
        chosen = random.Random(seed).sample(range(len(self.archs)), n)
        return replace(self, archs=tuple(self.archs[i] for i in sorted(chosen)))


# --------------------------------------------------------------------------- numbering
def cost_of(spec: ArchSpec) -> tuple[int, int]:
    """(params, FLOPs) of `spec`: `count(spec)`'s, as `scaler count` gives them."""
    cost = count(spec)
    return cost.params, cost.flops


_IDENTITY_FIELDS = tuple(f.name for f in fields(ArchSpec) if f.compare)


def identity(spec: ArchSpec) -> tuple:
    """Every field that makes two specs different networks (not the name), cheaply (no asdict)."""
    return tuple(getattr(spec, k) for k in _IDENTITY_FIELDS)


def _order_key(spec: ArchSpec, params: int, flops: int) -> tuple:
    dw = tuple(itertools.chain.from_iterable(zip(spec.depths, spec.planes)))
    rest = (spec.stem, spec.strides, spec.resolution, spec.num_classes, repr((spec.mean, spec.std)))
    return (flops, params, dw, spec.block, spec.activation, rest)


def numbered(specs, *, tags=None, costs=None) -> tuple[Arch, ...]:
    """Arch ids 1..N by ascending (FLOPs, params, D1, W1, D2, W2, D3, W3, block, activation);
    `costs` maps specs already costed to their (params, FLOPs)."""
    costed = []
    for i, s in enumerate(specs):
        p, f = costs[s] if costs else cost_of(s)
        costed.append((_order_key(s, p, f), s, p, f, (tags[i] if tags else {})))
    costed.sort(key=lambda c: c[0])
    return tuple(Arch(i + 1, s, p, f, t) for i, (_, s, p, f, t) in enumerate(costed))


# --------------------------------------------------------------------------- built-ins
def _grid(depth_choices, width_choices, block: str = "basic") -> list[ArchSpec]:
    out = []
    for d in itertools.product(*depth_choices):
        for w in itertools.product(*width_choices):
            out.append(ArchSpec(block, d, (16 * w[0], 32 * w[1], 64 * w[2])))
    return out


def nares() -> Space:
    """NARes's 15,625 WRNs (reference section 3), ids by ascending MACs."""
    specs = _grid([NARES_DEPTHS] * 3, [NARES_WIDTHS] * 3)
    return Space("nares", numbered(specs), BUILTINS["nares"])


def rrn_depth() -> Space:
    specs = _grid([RRN_DEPTHS] * 3, [(w,) for w in RRN_FIXED_WIDTHS])
    return Space("rrn-depth", numbered(specs), BUILTINS["rrn-depth"])


def rrn_width() -> Space:
    specs = _grid([(d,) for d in RRN_FIXED_DEPTHS], [RRN_WIDTHS] * 3)
    return Space("rrn-width", numbered(specs), BUILTINS["rrn-width"])


def rd_sweep(budget: str, block: str = "basic") -> Space:
    """One integer architecture per r_D step at a FLOPs budget, found by the solver with
    RobustScaling's stage ratios (D 2:2:1, W 2:2.5:1) and that r_D; steps that land on the same
    network keep the first. Ids follow r_D."""
    from scaler.rules import ROBUSTSCALING
    from scaler.solver import Budget, solve

    target = Budget("flops", parse_budget(budget, "rd-<budget>"))
    seen, archs = set(), []
    for r_d in RD_STEPS:
        rule = replace(ROBUSTSCALING, name=f"robustscaling-rd{r_d:.2f}", r_d=r_d)
        sol = solve(rule, target, block=block)
        key = (sol.spec.depths, sol.spec.planes)
        if key in seen:
            continue
        seen.add(key)
        archs.append(
            Arch(len(archs) + 1, sol.spec, sol.cost.params, sol.cost.flops, {"r_d_target": r_d, "r_d": sol.r_d})
        )
    name = f"rd-{budget}" + ("" if block == "basic" else f"-{block}")
    return Space(name, tuple(archs), f"r_D sweep at {budget} FLOPs ({block} block)")


def builtin(name: str) -> Space | None:
    if name == "nares":
        return nares()
    if name == "rrn-depth":
        return rrn_depth()
    if name == "rrn-width":
        return rrn_width()
    m = RD_RE.match(name)
    if m:
        return rd_sweep(m.group(1), m.group(2) or "basic")
    return None


# --------------------------------------------------------------------------- YAML files
def load_space(ref: str | Path) -> Space:
    """A built-in space by name (nares, rrn-depth, rrn-width, rd-<budget>) or a YAML space file."""
    text = str(ref)
    space = builtin(text)
    if space is not None:
        return space
    path = Path(text)
    if not path.is_file():
        names = ", ".join(k for k in BUILTINS)
        raise ScalerError(f"no space {text!r}: give a YAML space file or a built-in ({names}, e.g. rd-10G)")
    return parse_space(_read_yaml(path), label=path.name, name=path.stem)


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ScalerError(f"{path.name}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise ScalerError(f"{path.name}: a space file is a mapping of spec fields to choices")
    return data


def parse_space(data: dict, *, label: str = "space", name: str = "space") -> Space:
    """A Space from a parsed YAML mapping; every problem is one line naming `label`."""
    unknown = sorted(set(data) - set(SPEC_KEYS) - set(STAGE_FIELDS) - set(SPACE_KEYS))
    if unknown:
        known = ", ".join(sorted(set(SPEC_KEYS) | set(STAGE_FIELDS) | set(SPACE_KEYS)))
        raise ScalerError(f"{label}: unknown key(s) {', '.join(unknown)}; known keys: {known}")
    if "depths" not in data or not ({"widths", "channels"} & set(data)):
        raise ScalerError(f"{label}: give depths and widths (or channels)")
    if {"widths", "channels"} <= set(data):
        raise ScalerError(f"{label}: give widths or channels, not both")
    if "planes" in data:
        raise ScalerError(f"{label}: write channels (planes per stage), not planes")
    axes: dict[str, list] = {}
    for key, value in data.items():
        if key in SPACE_KEYS:
            continue
        axes[key] = _stage_choices(key, value, label) if key in STAGE_FIELDS else _choices(key, value, label)
    total = math.prod(len(v) for v in axes.values())
    if total > MAX_ARCHS:
        raise ScalerError(f"{label}: {total:,} combinations; a space holds at most {MAX_ARCHS:,}")
    lo_hi = _constraints(data.get("constraints"), label)
    kept: dict[ArchSpec, tuple[int, int]] = {}  # (params, FLOPs) of each spec kept (the first of equal ones)
    keys = list(axes)
    for combo in itertools.product(*(axes[k] for k in keys)):
        spec = _spec(dict(zip(keys, combo)), label)
        p, f = cost_of(spec)
        if all(_within(v, lo_hi.get(k)) for k, v in (("flops", f), ("params", p))):
            kept.setdefault(spec, (p, f))
    if not kept:
        raise ScalerError(f"{label}: the constraints leave none of the {total:,} architectures")
    return Space(str(data.get("name") or name), numbered(kept.keys(), costs=kept), str(data.get("description") or ""))


VECTOR_FIELDS = ("mean", "std")
"""Fields whose one value is a list (per RGB channel): a flat list is one value, not a choice."""


def _choices(key: str, value, label: str) -> list:
    """Choices of a network field: a scalar is fixed, a list is a choice. For the block knobs
    (block, activation, norm, ...) a choice may itself be a per-stage list, e.g.
    `activation: [relu, [relu, relu, silu]]`."""
    if isinstance(value, dict):
        raise ScalerError(f"{label}: {key} must be a value or a list of choices, not a mapping")
    if key in VECTOR_FIELDS:
        if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
            return [tuple(v) for v in value]
        return [tuple(value) if isinstance(value, list) else value]
    if isinstance(value, list):
        if not value:
            raise ScalerError(f"{label}: {key} has an empty choice list")
        per_stage = key in KNOBS
        if any(isinstance(v, dict) or (isinstance(v, list) and not per_stage) for v in value):
            raise ScalerError(f"{label}: {key} choices must be single values")
        return list(dict.fromkeys(tuple(v) if isinstance(v, list) else v for v in value))
    return [value]


def _stage_choices(key: str, value, label: str) -> list[tuple]:
    """Per-stage choices: one entry per stage (a value or a choice list), or one value for all."""
    if not isinstance(value, list):
        value = [value] * 3
    if len(value) != 3:
        raise ScalerError(f"{label}: {key} needs one entry per stage (3), got {len(value)}")
    stages = []
    for i, v in enumerate(value):
        opts = v if isinstance(v, list) else [v]
        if not opts:
            raise ScalerError(f"{label}: {key} stage {i + 1} has an empty choice list")
        for o in opts:
            if isinstance(o, bool) or not isinstance(o, (int, float)):
                raise ScalerError(f"{label}: {key} stage {i + 1}: {o!r} is not a number")
        stages.append(list(dict.fromkeys(opts)))
    return list(itertools.product(*stages))


def _spec(values: dict, label: str) -> ArchSpec:
    values = dict(values)
    try:
        if "widths" in values:
            values["planes"] = widths_to_planes(values.pop("widths"))
        elif "channels" in values:
            values["planes"] = values.pop("channels")
        values.setdefault("block", "basic")
        return ArchSpec(**values)
    except ScalerError as exc:
        raise ScalerError(f"{label}: {exc}") from None
    except TypeError as exc:
        raise ScalerError(f"{label}: malformed value: {exc}") from None


def _constraints(value, label: str) -> dict[str, tuple[int | None, int | None]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ScalerError(f"{label}: constraints is a mapping, e.g. {{flops: [null, 10G], params: [null, 100M]}}")
    unknown = sorted(set(value) - set(CONSTRAINT_KEYS))
    if unknown:
        raise ScalerError(f"{label}: unknown constraint(s) {', '.join(unknown)}; use flops and params")
    out = {}
    for key, bounds in value.items():
        if not isinstance(bounds, list) or len(bounds) != 2:
            raise ScalerError(f"{label}: constraint {key} is [low, high] (null for open), e.g. [null, 10G]")
        lo, hi = (None if b is None else parse_budget(str(b), f"{label}: {key} bound") for b in bounds)
        if lo is not None and hi is not None and lo > hi:
            raise ScalerError(f"{label}: constraint {key} has low {bounds[0]} above high {bounds[1]}")
        out[key] = (lo, hi)
    return out


def _within(v: int, bounds) -> bool:
    if bounds is None:
        return True
    lo, hi = bounds
    return (lo is None or v >= lo) and (hi is None or v <= hi)


def space_payload(space: Space) -> dict:
    """`scaler space --json`: the space, its size, and every architecture with its exact cost."""
    return {
        "space": space.name,
        "description": space.description,
        "count": len(space),
        "archs": [a.to_dict() for a in space.archs],
    }


def dumps(space: Space) -> str:
    return json.dumps(space_payload(space), separators=(",", ":"))
