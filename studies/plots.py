"""The seeds' figures from measured architectures, with matplotlib's Agg backend (no display).

pareto     robust accuracy vs FLOPs and vs params: every architecture, the Pareto front, the
           best, and the rules' solutions (their nearest measured architecture) at each budget
curves     per-epoch train loss and validation clean/PGD/CW accuracy of a run or of a benchmark's
           best, median and worst architectures (or chosen ones)
rd         robust accuracy vs r_D with binned means and the quadratic fit (seed 001 Fig. 8)
stages     stage shares of depth and width, top vs bottom 10% at each total (seed 001 Fig. 7)
lipschitz  per-block Lipschitz of a trained run, one bar per residual block (seed 000 Fig. 5)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from scaler.errors import ScalerError
from scaler.fileio import atomic_write

FORMATS = ("png", "svg", "pdf")
KINDS = ("pareto", "curves", "rd", "stages", "lipschitz")
RULE_STYLE = {"robustscaling": ("^", "tab:blue"), "robustwrn": ("s", "tab:green"), "uniform": ("D", "tab:purple")}
STAGE_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def image_format(path: str | Path) -> str:
    fmt = Path(path).suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ScalerError(f"{path}: the image file must end in .png, .svg or .pdf")
    return fmt


def save(fig, path: str | Path, *, force: bool = False) -> Path:
    """Write the figure atomically in the format its suffix names; refuses to overwrite unless force."""
    fmt = image_format(path)
    plt = _pyplot()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=150, bbox_inches="tight"), force=force)
    finally:
        plt.close(fig)


def mark_synthetic(fig, bench) -> None:
    """A red line above everything when the benchmark's metrics are invented (`scaler synthetic`)."""
    if not bench.synthetic:
        return
    share = "" if bench.synthetic == len(bench) else f"{bench.synthetic:,} of {len(bench):,} records "
    text = f"SYNTHETIC data: {share}invented by `scaler synthetic`, not measured"
    style = dict(color="tab:red", fontsize=11, fontweight="bold")
    if fig._suptitle is None:
        fig.suptitle(text, **style)
    else:  # above the figure's own title
        fig.text(0.5, 1.0, text, ha="center", va="bottom", **style)


def is_run(source) -> bool:
    """Whether `source` is a run directory (it has metrics.jsonl), not a benchmark."""
    path = Path(source)
    return path.is_dir() and (path / "metrics.jsonl").is_file()


def _label(metric: str) -> str:
    names = {
        "test_aa_acc": "test AutoAttack accuracy (%)",
        "test_pgd_acc": "test PGD-20 accuracy (%)",
        "test_cw_acc": "test CW-40 accuracy (%)",
        "val_pgd_acc": "validation PGD-20 accuracy (%)",
        "val_cw_acc": "validation CW-40 accuracy (%)",
    }
    return names.get(metric, metric.replace("_", " "))


UNITS = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K"))


def _unit(values: np.ndarray) -> tuple[float, str]:
    """(scale, prefix) that shows `values` as plain numbers of at least 1: 12.7M, not 0.0127G."""
    top = float(np.nanmax(values)) if np.isfinite(values).any() else 1.0
    return next(((scale, prefix) for scale, prefix in UNITS if top >= scale), (1.0, ""))


def log_ticks(lo: float, hi: float, most: int = 7) -> list[float]:
    """Readable ticks for a log axis from `lo` to `hi`: the coarsest of 1-, 1-2-5-, 1-2-3-5- and
    finer decade patterns that gives at least 4 ticks (thinned to `most`), else the finest if it
    gives 3, else, on a range too narrow for them, evenly spaced round numbers."""
    from matplotlib.ticker import MaxNLocator

    if not (np.isfinite(lo) and np.isfinite(hi) and 0 < lo < hi):
        return []
    decades = range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
    ticks = []
    for mantissas in ((1,), (1, 2, 5), (1, 2, 3, 5), (1, 1.5, 2, 3, 4, 5, 6, 8)):
        ticks = [float(f"{m * 10.0**e:.6g}") for e in decades for m in mantissas if lo <= m * 10.0**e <= hi]
        if len(ticks) >= 4:
            break
    if len(ticks) >= 3:
        return ticks[:: math.ceil(len(ticks) / most)]
    linear = MaxNLocator(nbins=4, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)
    return [float(f"{t:.6g}") for t in linear if lo <= t <= hi]


def _plain_ticks(ax) -> None:
    """Log-axis ticks as plain numbers (5, 10, 20), not 5x10^0, and few enough not to overlap."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    lo, hi = ax.get_xlim()
    ax.xaxis.set_major_locator(FixedLocator(log_ticks(lo, hi)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(lo, hi)


# ---------------------------------------------------------------------- pareto
def pareto(bench, metric: str | None = None, budgets=None):
    from studies.analysis import pareto_front, robust_metric, rule_check

    plt = _pyplot()
    metric = robust_metric(bench, metric)
    acc = bench.metric(metric)
    checks = rule_check(bench, acc, budgets)
    n = int(np.isfinite(acc).sum())
    # many points: small and faint, so the front stands out; a few: each one plainly visible
    size, shade, alpha = (4, "0.7", 0.5) if n > 2000 else (12, "0.55", 0.7) if n > 200 else (40, "0.4", 1.0)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2), sharey=True)
    fronts = []
    flops_scale, flops_prefix = _unit(bench.metric("macs"))
    for ax, key, (scale, prefix), unit in (
        (axes[0], "macs", (flops_scale, flops_prefix), "FLOPs ({}, multiply-adds)"),
        (axes[1], "params", _unit(bench.metric("params")), "parameters ({})"),
    ):
        cost = bench.metric(key) / scale
        ax.scatter(
            cost, acc, s=size, c=shade, alpha=alpha, linewidths=0, label=f"all {n} architectures", rasterized=n > 2000
        )
        front = pareto_front(cost, acc)
        ax.step(cost[front], acc[front], where="post", c="tab:red", lw=1.5)
        ax.scatter(
            cost[front], acc[front], s=max(22, size), c="tab:red", zorder=3, label=f"Pareto front ({len(front)})"
        )
        best = int(np.nanargmax(acc))
        ax.scatter(cost[best], acc[best], marker="*", s=220, c="gold", edgecolors="k", zorder=5, label="best")
        _draw_rule_checks(ax, bench, checks, cost, acc, scale, prefix, budgets=key == "macs")
        ax.set_xscale("log")
        _plain_ticks(ax)
        ax.set_xlabel(unit.format(prefix or "count"))
        ax.grid(alpha=0.3, which="major")
        fronts.append(len(front))
    axes[0].set_ylabel(_label(metric))
    budgets_drawn = "; dotted: rule-check budgets" if checks else ""
    axes[0].set_title(f"robust accuracy vs FLOPs (front: {fronts[0]}{budgets_drawn})")
    axes[1].set_title(f"robust accuracy vs parameters (front: {fronts[1]})")
    _shared_legend(fig, axes)
    fig.suptitle(f"{Path(bench.source).name}: {n} architectures")
    mark_synthetic(fig, bench)
    return fig


def _draw_rule_checks(ax, bench, checks, cost, acc, scale: float, prefix: str, budgets: bool) -> None:
    """Each rule check's budget as a dotted line (on the FLOPs panel) and each rule's nearest
    measured architecture as an open marker, labelled once per rule."""
    shown = set()
    for check in checks:
        if budgets:
            ax.axvline(check["budget"] / scale, ls=":", c="0.4", lw=0.8)
            where = (check["budget"] / scale, 0.01)
            label = f"{check['budget'] / scale:g}{prefix}"
            ax.annotate(label, where, xycoords=("data", "axes fraction"), fontsize=8, color="0.3", ha="left")
        for s in check["rules"]:
            if "error" in s:
                continue
            marker, color = RULE_STYLE[s["rule"]]
            row = bench.row(s["measured"]["arch"])
            lbl = None if s["rule"] in shown else f"{s['rule']} (nearest measured)"
            shown.add(s["rule"])
            ax.scatter(
                cost[row],
                acc[row],
                marker=marker,
                s=70,
                facecolors="none",
                edgecolors=color,
                lw=1.8,
                zorder=4,
                label=lbl,
            )


def _shared_legend(fig, axes) -> None:
    """One key for both panels, below them: it names only what is drawn, and hides no point or label."""
    keys = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            keys.setdefault(label.split(" (")[0] if label.startswith("Pareto") else label, handle)
    fig.legend(
        keys.values(),
        keys.keys(),
        loc="upper center",
        bbox_to_anchor=(0.5, 0.02),
        ncol=min(len(keys), 6),
        fontsize=8,
        frameon=False,
    )


# ---------------------------------------------------------------------- curves
def _run_history(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not rows:
        raise ScalerError(f"{run_dir / 'metrics.jsonl'} has no epochs yet")
    val = [r for r in rows if "val_clean" in r]
    return {
        "label": run_dir.name,
        "epochs": [r["epoch"] for r in rows],
        "train_loss": [r["train_loss"] for r in rows],
        "val_epochs": [r["epoch"] for r in val],
        "val_acc": [r["val_clean"] for r in val],
        "pgd": [r["val_pgd20"] for r in val],
        "cw": [r["val_cw40"] for r in val],
        "best_epoch": run_best_epoch(run_dir, rows),
    }


def run_best_epoch(run_dir: Path, rows: list[dict]) -> int | None:
    """The epoch best.pt holds, by the trainer's rule (trainers.loop): the first validated epoch
    from `best_from` of the run on with the highest val_{best_metric}; None before any."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        config = {}
    metric = f"val_{config.get('best_metric') or 'pgd20'}"
    start = round((config.get("best_from") or 0.5) * (config.get("epochs") or 0))
    best, epoch = -1.0, None
    for r in rows:
        score = r.get(metric)
        if score is not None and r["epoch"] >= start and score > best:
            best, epoch = score, r["epoch"]
    return epoch


def _record_history(rec: dict, label: str) -> dict:
    """A NARes record's histories: list index i is epoch i; a missing list is empty, a null is NaN."""
    t = rec["train"][0]

    def values(key: str) -> list[float]:
        return [np.nan if v is None else float(v) for v in t.get(key) or []]

    val = {key: values(key) for key in ("val_acc", "pgd", "cw")}
    return {
        "label": label,
        "epochs": list(range(len(values("train_loss")))),
        "train_loss": values("train_loss"),
        "val_epochs": list(range(max(map(len, val.values())))),
        **val,
        "best_epoch": t.get("best_epoch"),
    }


def histories(source, metric: str | None = None, archs=None) -> list[dict]:
    """Per-epoch histories: of a run directory (its metrics.jsonl), or of a benchmark's (a loaded
    Benchmark, a file or a study) chosen archs, else its best, median and worst by `metric`."""
    if not hasattr(source, "record") and is_run(source):
        return [_run_history(Path(source))]
    from studies.analysis import robust_metric
    from studies.benchmark import arch_text, load

    bench = source if hasattr(source, "record") else load(source)
    if archs:
        rows = [bench.row(a) for a in archs]
        names = ["chosen"] * len(rows)
    else:
        metric = robust_metric(bench, metric)
        acc = bench.metric(metric)
        order = np.argsort(np.where(np.isfinite(acc), acc, -np.inf))
        finite = order[np.isfinite(acc[order])]
        rows = [int(finite[-1]), int(finite[len(finite) // 2]), int(finite[0])]
        names = [f"best {metric}", "median", "worst"]
    return [_record_history(bench.record(r), f"{n}: {arch_text(bench.arch(r))}") for r, n in zip(rows, names)]


def curves(source, metric: str | None = None, archs=None):
    """Histories (see `histories`) of a run directory or of a benchmark (loaded, a file or a study),
    with each one's best epoch (the checkpoint kept) as a thin vertical line where it has one."""
    from matplotlib.ticker import MaxNLocator

    from studies.benchmark import load

    plt = _pyplot()
    if not hasattr(source, "record") and not is_run(source):
        source = load(source)
    runs = histories(source, metric, archs)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(13, 4.8))
    styles = {"val_acc": ("-", "clean"), "pgd": ("--", "PGD-20"), "cw": (":", "CW-40")}
    for i, h in enumerate(runs):
        color = f"C{i}"
        ax_loss.plot(h["epochs"], h["train_loss"], c=color, label=h["label"])
        for key, (ls, _name) in styles.items():
            if len(h[key]):
                ax_acc.plot(h["val_epochs"][: len(h[key])], h[key], ls=ls, c=color)
        if h["best_epoch"] is not None:
            ax_acc.axvline(h["best_epoch"], c=color, ls="-.", lw=1.5, alpha=0.9)
    marked = [h for h in runs if h["best_epoch"] is not None]
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_loss.set_title("training loss (colour: architecture or run)")
    ax_loss.legend(fontsize=8)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("validation accuracy (%)")
    if len(marked) == 1 == len(runs):
        ax_acc.set_title(f"validation accuracy (dash-dot line: best epoch, {marked[0]['best_epoch']})")
    else:
        ax_acc.set_title("validation accuracy" + (" (dash-dot vertical lines: best epochs)" if marked else ""))
    keys = [plt.Line2D([], [], c="k", ls=ls, label=name) for ls, name in styles.values()]
    if marked:
        keys.append(plt.Line2D([], [], c="0.4", ls="-.", lw=1.5, label="best epoch"))
    ax_acc.legend(handles=keys, fontsize=8, loc="lower right")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if hasattr(source, "record"):
        mark_synthetic(fig, source)
    return fig


# ---------------------------------------------------------------------- r_D
def rd(bench, metric: str | None = None):
    from studies.analysis import r_d_of, rd_profile, robust_metric

    plt = _pyplot()
    metric = robust_metric(bench, metric)
    acc = bench.metric(metric)
    r = r_d_of(bench.depths, bench.widths)
    prof = rd_profile(r, acc, bins=12)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    ax.scatter(r, acc, s=5, c="0.6", alpha=0.4, linewidths=0, label=f"{len(bench)} architectures", rasterized=True)
    mids = [(b["lo"] + b["hi"]) / 2 for b in prof["bins"]]
    ax.plot(mids, [b["mean"] for b in prof["bins"]], "o-", c="tab:blue", label="bin mean")
    ax.plot(mids, [b["max"] for b in prof["bins"]], "^-", c="tab:green", label="bin max")
    q = prof["quadratic"]
    if q:
        xs = np.linspace(np.nanmin(r), np.nanmax(r), 200)
        peak = f", peak r_D={q['peak_r_d']:.3f}" if q["peak_r_d"] is not None else ""
        ax.plot(xs, q["a"] * xs**2 + q["b"] * xs + q["c"], c="tab:red", lw=2, label=f"quadratic fit{peak}")
    best = int(np.nanargmax(acc))
    ax.scatter(r[best], acc[best], marker="*", s=220, c="gold", edgecolors="k", zorder=5, label="best")
    ax.set_xlabel("depth share r_D = sum D / (sum D + sum W)")
    ax.set_ylabel(_label(metric))
    ax.set_title("robust accuracy vs depth share")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    mark_synthetic(fig, bench)
    return fig


# ---------------------------------------------------------------------- stages
def stages(bench, metric: str | None = None, fraction: float = 0.1):
    from studies.analysis import robust_metric, stage_distribution

    plt = _pyplot()
    metric = robust_metric(bench, metric)
    acc = bench.metric(metric)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    pct = round(fraction * 100)
    for ax, values, kind, letter in ((axes[0], bench.depths, "depth", "D"), (axes[1], bench.widths, "width", "W")):
        dist = stage_distribution(values, acc, fraction)
        totals = [e["total"] for e in dist]
        for i in range(values.shape[1]):
            color = STAGE_COLORS[i % len(STAGE_COLORS)]
            ax.plot(totals, [e["top_share"][i] for e in dist], "o-", c=color, label=f"{letter}{i + 1}, top {pct}%")
            ax.plot(
                totals,
                [e["bottom_share"][i] for e in dist],
                "x--",
                c=color,
                alpha=0.7,
                label=f"{letter}{i + 1}, bottom {pct}%",
            )
        ax.axhline(1 / values.shape[1], c="0.5", lw=0.8, ls=":")
        ax.set_xlabel(f"total {kind} (sum of {letter}1..{letter}{values.shape[1]})")
        ax.set_title(f"where the {kind} goes: top vs bottom {pct}% by {metric}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
    axes[0].set_ylabel("share of the total (mean over the group)")
    mark_synthetic(fig, bench)
    return fig


# ---------------------------------------------------------------------- per-block Lipschitz
def block_lipschitz(
    source: str | Path, n: int = 256, device: str = "auto", progress: bool = False, announce=None
) -> tuple[dict, str]:
    """{block: LIP} from a `scaler eval --json --per-block-lipschitz` file, or measured on a run
    directory's best checkpoint with PGD-20 on `n` test points (`progress`: a bar on stderr;
    `announce(line)` hears which checkpoint is attacked first)."""
    path = Path(source)
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise ScalerError(
                f"{path}: not JSON; give `scaler eval --json --per-block-lipschitz` output or a run directory"
            ) from None
        for name, r in data.items():
            if isinstance(r, dict) and "per_block_lip" in r:
                return r["per_block_lip"], f"{path.name} ({name})"
        raise ScalerError(f"{path} has no per_block_lip; run `scaler eval RUN --per-block-lipschitz --json`")
    if not path.is_dir():
        raise ScalerError(f"{path} not found: give a run directory or an eval JSON file")
    import trainers

    results, info = trainers.evaluate(
        path, attacks=["pgd20"], n=n, per_block=True, device=device, progress=progress, announce=announce
    )
    return results["pgd20"][
        "per_block_lip"
    ], f"{path.name}, epoch {info['epoch']}, {info['n']} {info['dataset']} points"


def lipschitz(source, n: int = 256, device: str = "auto", progress: bool = False, announce=None):
    plt = _pyplot()
    lips, what = block_lipschitz(source, n, device, progress, announce)
    names = list(lips)
    stage_of = [int(k.split(".")[0].removeprefix("stage")) if k.startswith("stage") else 0 for k in names]
    fig, ax = plt.subplots(figsize=(max(7.0, 0.28 * len(names) + 2), 4.8))
    colors = [STAGE_COLORS[(s - 1) % len(STAGE_COLORS)] for s in stage_of]
    ax.bar(range(len(names)), list(lips.values()), color=colors)
    from matplotlib.patches import Patch

    handles = [
        Patch(color=STAGE_COLORS[(s - 1) % len(STAGE_COLORS)], label=f"stage {s}") for s in sorted(set(stage_of))
    ]
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_xlabel("residual block")
    ax.set_ylabel("LIP = mean ||phi(x) - phi(x')||_1 / ||x - x'||_inf")
    ax.set_title(f"per-block Lipschitz under PGD-20: {what}")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(handles=handles, fontsize=8)
    return fig
