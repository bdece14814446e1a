"""The seeds' analyses of a measured design space (seed 001 Fig. 7-8, NARes section 4).

Pure functions over arrays, then `analyze(bench)` that assembles them for one benchmark or study:
  - Pareto-efficient architectures: robust accuracy against FLOPs and against params
  - Kendall tau-b of total depth, total width, FLOPs and params against robust accuracy
  - stage distribution of depth and width among the top and bottom 10% at each total depth/width
  - robust accuracy against the depth share r_D = sum D / (sum D + sum W), with a quadratic fit
  - rule check: at each budget, the RobustScaling / RobustWRN / uniform solutions (measured when in
    the space, else their nearest measured neighbour) against the best measured within the budget
"""

from __future__ import annotations

import math

import numpy as np

from scaler.errors import ScalerError

ROBUST_DEFAULTS = ("test_aa_acc", "test_pgd_acc", "test_cw_acc", "val_pgd_acc")
RULE_NAMES = ("robustscaling", "robustwrn", "uniform")
DEFAULT_BUDGETS = (5e9, 10e9, 20e9, 40e9)  # seed 001's FLOPs budgets


# ---------------------------------------------------------------------- statistics
def kendall_tau(x, y) -> float:
    """Kendall's tau-b (ties in either variable accounted), O(n log n): 15,625 points in ~0.1 s."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ScalerError("kendall_tau needs two 1-d arrays of the same length")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = len(x)
    if n < 2:
        return math.nan
    order = np.lexsort((y, x))
    x, y = x[order], y[order]
    n0 = n * (n - 1) / 2
    n1 = _tied_pairs(x)
    n2 = _tied_pairs(np.sort(y))
    same_xy = np.r_[True, (x[1:] != x[:-1]) | (y[1:] != y[:-1])]
    n3 = _run_pairs(same_xy)
    if n0 == n1 or n0 == n2:
        return math.nan  # one variable is constant
    discordant = _strict_inversions(y)
    return float((n0 - n1 - n2 + n3 - 2 * discordant) / math.sqrt((n0 - n1) * (n0 - n2)))


def _tied_pairs(sorted_values: np.ndarray) -> float:
    return _run_pairs(np.r_[True, sorted_values[1:] != sorted_values[:-1]])


def _run_pairs(starts: np.ndarray) -> float:
    """Pairs inside runs, given a boolean 'a new run starts here' array."""
    lengths = np.diff(np.r_[np.flatnonzero(starts), len(starts)])
    return float((lengths * (lengths - 1) / 2).sum())


def _strict_inversions(y: np.ndarray) -> int:
    """Pairs i < j with y[i] > y[j], by a Fenwick tree over the ranks of y."""
    ranks = np.searchsorted(np.unique(y), y) + 1
    tree = [0] * (int(ranks.max()) + 1)
    inversions = 0
    for seen, r in enumerate(ranks.tolist()):
        i, not_greater = r, 0
        while i > 0:
            not_greater += tree[i]
            i -= i & -i
        inversions += seen - not_greater
        i = r
        while i < len(tree):
            tree[i] += 1
            i += i & -i
    return inversions


def pareto_front(cost, acc) -> np.ndarray:
    """Rows not dominated (no other row is at most as costly and strictly more accurate, or
    strictly cheaper and as accurate), in ascending cost."""
    cost, acc = np.asarray(cost, dtype=float), np.asarray(acc, dtype=float)
    rows = np.flatnonzero(np.isfinite(cost) & np.isfinite(acc))
    rows = rows[np.lexsort((-acc[rows], cost[rows]))]
    front, best = [], -math.inf
    for r in rows:
        if acc[r] > best:
            front.append(int(r))
            best = acc[r]
    return np.array(front, dtype=np.int64)


def stage_distribution(stages, acc, fraction: float = 0.1) -> list[dict]:
    """At each total (sum over stages), the mean share of each stage among the top and the bottom
    `fraction` by accuracy (at least one architecture each; totals with fewer than two are skipped)."""
    stages, acc = np.asarray(stages, dtype=float), np.asarray(acc, dtype=float)
    totals = stages.sum(1)
    out = []
    for total in np.unique(totals):
        rows = np.flatnonzero((totals == total) & np.isfinite(acc))
        if len(rows) < 2:
            continue
        k = max(1, int(math.floor(fraction * len(rows))))
        ranked = rows[np.argsort(acc[rows], kind="stable")]
        top, bottom = ranked[-k:], ranked[:k]
        out.append(
            {
                "total": float(total),
                "n": len(rows),
                "k": k,
                "top_share": (stages[top] / total).mean(0).tolist(),
                "bottom_share": (stages[bottom] / total).mean(0).tolist(),
                "top_mean": stages[top].mean(0).tolist(),
                "bottom_mean": stages[bottom].mean(0).tolist(),
                "top_acc": float(acc[top].mean()),
                "bottom_acc": float(acc[bottom].mean()),
            }
        )
    return out


def r_d_of(depths, widths) -> np.ndarray:
    """Depth share r_D = sum D / (sum D + sum W) per architecture (seed 001 section 4.2.2)."""
    d, w = np.asarray(depths, dtype=float).sum(1), np.asarray(widths, dtype=float).sum(1)
    return d / (d + w)


def rd_profile(r_d, acc, bins: int = 10) -> dict:
    """Robust accuracy against r_D: binned mean/max and a least-squares quadratic with its peak."""
    r_d, acc = np.asarray(r_d, dtype=float), np.asarray(acc, dtype=float)
    keep = np.isfinite(r_d) & np.isfinite(acc)
    r_d, acc = r_d[keep], acc[keep]
    edges = np.linspace(r_d.min(), r_d.max(), bins + 1) if len(r_d) else np.zeros(1)
    table = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (r_d >= lo) & ((r_d < hi) | (hi == edges[-1]))
        if inside.any():
            table.append(
                {
                    "lo": float(lo),
                    "hi": float(hi),
                    "n": int(inside.sum()),
                    "mean": float(acc[inside].mean()),
                    "max": float(acc[inside].max()),
                }
            )
    fit = None
    if len(np.unique(r_d)) >= 3:
        a, b, c = np.polyfit(r_d, acc, 2)
        peak = -b / (2 * a) if a < 0 else None
        fit = {"a": float(a), "b": float(b), "c": float(c), "peak_r_d": None if peak is None else float(peak)}
    return {"bins": table, "quadratic": fit, "best_r_d": float(r_d[np.argmax(acc)]) if len(acc) else None}


# ---------------------------------------------------------------------- the whole report
def robust_metric(bench, metric: str | None = None) -> str:
    """The metric the analyses call robust accuracy: `metric`, else the first one present of
    test AA, test PGD, test CW, validation PGD."""
    if metric:
        if not bench.has(metric):
            raise ScalerError(f"{bench.source} has no {metric} values")
        return metric
    for m in ROBUST_DEFAULTS:
        if bench.has(m):
            return m
    raise ScalerError(f"{bench.source} has none of {', '.join(ROBUST_DEFAULTS)}")


def _entry(bench, row: int, acc: np.ndarray) -> dict:
    return {
        "arch": bench.arch(row),
        "arch_id": int(bench.arch_ids[row]),
        "flops": float(bench.metric("macs")[row]),
        "params": float(bench.metric("params")[row]),
        "acc": float(acc[row]),
    }


def analyze(bench, metric: str | None = None, budgets=None, fraction: float = 0.1) -> dict:
    """Every analysis of the module on one benchmark or study, as one JSON-ready dict."""
    metric = robust_metric(bench, metric)
    acc = bench.metric(metric)
    depths, widths = bench.depths, bench.widths
    flops, params = bench.metric("macs"), bench.metric("params")
    rd = r_d_of(depths, widths)
    kendall = {
        "total_depth": kendall_tau(depths.sum(1), acc),
        "total_width": kendall_tau(widths.sum(1), acc),
        "flops": kendall_tau(flops, acc),
        "params": kendall_tau(params, acc),
    }
    return {
        "source": bench.source,
        "records": len(bench),
        "synthetic_records": bench.synthetic,
        "metric": metric,
        "best": _entry(bench, int(np.nanargmax(acc)), acc),
        "pareto_flops": [_entry(bench, r, acc) for r in pareto_front(flops, acc)],
        "pareto_params": [_entry(bench, r, acc) for r in pareto_front(params, acc)],
        "kendall": kendall,
        "stages": {
            "depth": stage_distribution(depths, acc, fraction),
            "width": stage_distribution(widths, acc, fraction),
            "fraction": fraction,
        },
        "r_d": rd_profile(rd, acc),
        "rules": rule_check(bench, acc, budgets),
        "budgets_unfit": unfit_budgets(bench, acc, budgets),
        "cheapest_flops": float(np.nanmin(np.where(np.isfinite(acc), flops, np.nan))),
    }


# ---------------------------------------------------------------------- rule check
def budgets_for(bench, budgets=None) -> list[float]:
    """`budgets`, else seed 001's 5G/10G/20G/40G that fall within the space's FLOPs range."""
    if budgets is not None:
        return [float(b) for b in budgets]
    flops = bench.metric("macs")
    lo, hi = np.nanmin(flops), np.nanmax(flops)
    return [b for b in DEFAULT_BUDGETS if lo <= b <= hi * 1.1]


def measured_within(bench, acc: np.ndarray, budget: float) -> np.ndarray:
    """Rows with a measured `acc` whose FLOPs fit `budget`."""
    return np.flatnonzero((bench.metric("macs") <= budget) & np.isfinite(acc))


def rule_checkable(bench) -> bool:
    """The rules build 3-stage networks: a space of other shapes gets no rule check."""
    return bench.depths.shape[1] == 3 and bench.widths.shape[1] == 3


def unfit_budgets(bench, acc: np.ndarray, budgets=None) -> list[float]:
    """The budgets `rule_check` leaves out because nothing measured fits them."""
    if not rule_checkable(bench):
        return []
    return [b for b in budgets_for(bench, budgets) if not len(measured_within(bench, acc, b))]


def rule_check(bench, acc: np.ndarray, budgets=None) -> list[dict]:
    """Per FLOPs budget: the best measured architecture within it, and each rule's solution with
    its measured accuracy when the space holds it, else its nearest measured neighbour's
    (`unfit_budgets` names the budgets nothing fits)."""
    import scaler

    if not rule_checkable(bench):
        return []
    depths, widths = bench.depths, bench.widths
    out = []
    for budget in budgets_for(bench, budgets):
        within = measured_within(bench, acc, budget)
        if not len(within):
            continue
        best = int(within[np.argmax(acc[within])])
        entry = {"budget": budget, "best": _entry(bench, best, acc), "measured_within": len(within), "rules": []}
        for name in RULE_NAMES:
            try:
                sol = scaler.solve(flops=int(budget), rule=name, block="basic")
            except ScalerError as exc:
                entry["rules"].append({"rule": name, "error": str(exc)})
                continue
            sd, sw = np.array(sol.spec.depths, float), np.array(sol.spec.widths, float)
            exact = np.flatnonzero((depths == sd).all(1) & (widths == sw).all(1))
            dist = np.abs(np.log(depths[within] / sd)).sum(1) + np.abs(np.log(widths[within] / sw)).sum(1)
            near = int(exact[0]) if len(exact) else int(within[np.argmin(dist)])
            entry["rules"].append(
                {
                    "rule": name,
                    "depths": list(sol.spec.depths),
                    "widths": list(sol.spec.widths),
                    "flops": sol.cost.flops,
                    "r_d": sol.r_d,
                    "in_space": bool(len(exact)),
                    "measured": _entry(bench, near, acc),
                    "gap": float(acc[best] - acc[near]),
                    "rank_within": int((acc[within] > acc[near]).sum()) + 1,
                }
            )
        out.append(entry)
    return out
