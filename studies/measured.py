"""The measured rule: instead of a formula, the measurements. For a budget it returns the most
robust measured architecture within it and, beside it, the best prediction of a surrogate fitted on
those measurements for the architectures of the same space not measured yet.

The surrogate is the BANANAS ensemble (`studies.surrogate`); its quality is reported as Kendall's
tau between its predictions and the truth on a seeded 20% of the measurements held out of the fit,
so a user can tell a prediction worth training from noise. The space is the product of the values
each arch key takes in the source; unmeasured architectures are costed exactly (basic-block WRNs
with planes 16*W1, 32*W2, 64*W3) and only those within the budget are ranked.
"""

from __future__ import annotations

import itertools

import numpy as np

from scaler.errors import ScalerError

MIN_FIT = 10
MAX_SPACE = 2_000_000
DEFAULT_METRICS = ("val_pgd_acc", "val_cw_acc")
"""What the rule picks by unless told: validation robustness, as a search must (studies.benchmark
objectives); the chosen architecture's test accuracy is then reported, not used to choose."""
REPORTED_TEST = ("test_aa_acc", "test_pgd_acc", "test_cw_acc", "test_clean_acc")


def measured_metric(bench, metric: str | None) -> tuple[str, str | None]:
    """(metric, note): `metric`, else the first validation metric of DEFAULT_METRICS the source has.
    A test metric is taken when given, with a note that choosing by it peeks at the test set."""
    from studies.benchmark import METRICS, lower_is_better, objective_metric

    if metric is None:
        for m in DEFAULT_METRICS:
            if bench.has(m):
                return m, None
        raise ScalerError(
            f"{bench.source} has no validation robustness ({', '.join(DEFAULT_METRICS)}) to choose by; "
            "give --metric (a test metric picks on the test set)"
        )
    if metric not in METRICS or not metric.startswith("test_"):
        objective_metric(metric)  # unknown metrics and costs: refused as a search refuses them
    if lower_is_better(metric):
        raise ScalerError(f"the measured rule picks the highest accuracy; {metric} is lower-is-better")
    if not bench.has(metric):
        raise ScalerError(f"{bench.source} has no {metric} values")
    if metric.startswith("test_"):
        return metric, (
            f"{metric} is a test metric: choosing by it peeks at the test set, so the chosen architecture's "
            f"{metric} is an optimistic estimate (the default chooses by {DEFAULT_METRICS[0]}, as search must)"
        )
    return metric, None


def _within(cost_flops, cost_params, target, cap) -> np.ndarray:
    by = {"flops": np.asarray(cost_flops, float), "params": np.asarray(cost_params, float)}
    ok = by[target.metric] <= target.value
    if cap is not None:
        ok &= by[cap.metric] <= cap.value
    return ok


def solve_measured(
    source: str,
    flops=None,
    params=None,
    *,
    max_flops=None,
    max_params=None,
    metric: str | None = None,
    seed: int = 0,
    epochs: int = 300,
) -> dict:
    """The measured rule's answer for one budget (JSON-ready)."""
    from scaler.api import budgets
    from studies.benchmark import load

    target, cap = budgets(flops, params, max_flops, max_params)
    bench = load(source)
    metric, note = measured_metric(bench, metric)
    acc = bench.metric(metric)
    macs, prm = bench.metric("macs"), bench.metric("params")
    ok = _within(macs, prm, target, cap) & np.isfinite(acc)
    rows = np.flatnonzero(ok)
    if not len(rows):
        cheapest = np.nanmin(macs if target.metric == "flops" else prm)
        raise ScalerError(
            f"no measured architecture of {source} fits {target}"
            f"{f', cap {cap}' if cap else ''}; its cheapest has {cheapest:.4g} {target.metric}"
        )
    best = int(rows[np.argmax(acc[rows])])
    out = {
        "rule": "measured",
        "source": bench.source,
        "metric": metric,
        "target": str(target),
        "cap": str(cap) if cap else None,
        "measured": int(np.isfinite(acc).sum()),
        "measured_within": len(rows),
        "best_measured": {
            "arch": bench.arch(best),
            "arch_id": int(bench.arch_ids[best]),
            "flops": float(macs[best]),
            "params": float(prm[best]),
            metric: float(acc[best]),
            "test": {m: float(bench.metric(m)[best]) for m in REPORTED_TEST if np.isfinite(bench.metric(m)[best])},
        },
        "synthetic_records": bench.synthetic,
    }
    if note:
        out["metric_note"] = note
    out["surrogate"] = surrogate_pick(bench, acc, target, cap, seed=seed, epochs=epochs)
    return out


def surrogate_pick(bench, acc, target, cap, *, seed: int = 0, epochs: int = 300) -> dict:
    """Held-out rank correlation of the ensemble, then its best unmeasured architecture in budget."""
    from studies import surrogate
    from studies.analysis import kendall_tau

    measured = np.flatnonzero(np.isfinite(acc))
    if len(measured) < MIN_FIT:
        return {"note": f"{len(measured)} measured architectures: too few to fit a surrogate (needs {MIN_FIT})"}
    choices = bench.choices()
    sizes = tuple(len(c) for c in choices)
    coords = np.stack([np.searchsorted(c, bench.archs[:, j]) for j, c in enumerate(choices)], axis=1)
    rng = np.random.default_rng(seed)
    held = rng.permutation(measured)
    n_test = max(2, len(held) // 5)
    test, train = held[:n_test], held[n_test:]
    fit = surrogate.fit(surrogate.encode(coords[train], sizes), acc[train], epochs=epochs, seed=seed, threads=None)
    tau = kendall_tau(fit.predict(surrogate.encode(coords[test], sizes)).mean(0), acc[test])
    report = {
        "model": "ensemble of 5 MLPs (one-hot + ordinal encoding)",
        "held_out_kendall_tau": tau,
        "held_out": int(n_test),
        "fitted_on": int(len(measured)),
    }
    candidates = _unmeasured(bench, choices, sizes)
    if candidates is None:
        report["note"] = "space too large to enumerate"
        return report
    if not len(candidates):
        report["note"] = "every architecture of the space is measured"
        return report
    cost = _costs(bench.keys, [tuple(choices[j][i] for j, i in enumerate(c)) for c in candidates])
    if cost is None:
        report["note"] = "the space is not a D1..D3/W1..W3 WRN space: unmeasured costs unknown"
        return report
    ok = _within(cost[:, 1], cost[:, 0], target, cap)
    report["unmeasured"] = int(len(candidates))
    report["unmeasured_within"] = int(ok.sum())
    if not ok.any():
        report["note"] = "no unmeasured architecture fits the budget"
        return report
    final = surrogate.fit(
        surrogate.encode(coords[measured], sizes), acc[measured], epochs=epochs, seed=seed + 1, threads=None
    )
    inside = candidates[ok]
    preds = final.predict(surrogate.encode(inside, sizes))
    mean, std = preds.mean(0), preds.std(0)
    pick = int(np.argmax(mean))
    arch = {k: choices[j][inside[pick][j]] for j, k in enumerate(bench.keys)}
    report["best_predicted"] = {
        "arch": arch,
        "flops": float(cost[ok][pick, 1]),
        "params": float(cost[ok][pick, 0]),
        "predicted": float(mean[pick]),
        "predicted_std": float(std[pick]),
    }
    return report


def _unmeasured(bench, choices, sizes) -> np.ndarray | None:
    """Choice-index coordinates of every architecture of the product space not in the source."""
    if int(np.prod(sizes)) > MAX_SPACE:
        return None
    measured = {tuple(float(v) for v in a) for a in bench.archs.tolist()}
    out = [
        idx
        for idx in itertools.product(*(range(s) for s in sizes))
        if tuple(float(choices[j][i]) for j, i in enumerate(idx)) not in measured
    ]
    return np.array(out, dtype=np.int64).reshape(-1, len(sizes))


def _costs(keys, archs) -> np.ndarray | None:
    """(params, flops) of WRN archs given as value tuples in `keys` order; None for other spaces."""
    from studies.synthetic import KEYS, wrn_cost

    if set(keys) != set(KEYS):
        return None
    order = [keys.index(k) for k in KEYS]
    try:
        return np.array([wrn_cost(tuple(a[i] for i in order)) for a in archs], dtype=float)
    except ScalerError:  # widths that give fractional channels: not a grid the cost model can price
        return None
