"""Live search: the NARes algorithms where a query trains and tests an architecture through the
study engine (`studies.sweep`) instead of reading a table.

The study directory is the search's memory. A query of an architecture the study already holds
reads its record and trains nothing; a new one runs as a sweep trial (Ray, retries, resume from
last.pt). Algorithms announce the queries they are about to make (`prefetch`: all neighbours in
local search, a BANANAS batch, the random sample), so those train in parallel. Because every
algorithm is deterministic given its seed and the objective values, rerunning an interrupted search
with the same command replays the measured part from the study in seconds and continues where it
stopped. A trial that fails (after its retries) scores -inf and the search goes on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from scaler.errors import ScalerError
from studies.search import Oracle, Problem, Settings, run_one_with

KEYS = ("D1", "W1", "D2", "W2", "D3", "W3")


def problem_of_space(space) -> tuple[Problem, list[dict]]:
    """A search problem over a space's archs (keys D1..W3) with unknown values, and each row's arch."""
    varying = {
        f for f in ("block", "activation", "stem", "strides") if len({getattr(a.spec, f) for a in space.archs}) > 1
    }
    if varying:
        raise ScalerError(
            f"live search needs a space over depths and widths only; {space.name} also varies {', '.join(sorted(varying))}"
        )
    archs = [dict(zip(KEYS, _flat(a.spec))) for a in space.archs]
    values = np.array([[a[k] for k in KEYS] for a in archs], dtype=float)
    if len({tuple(r) for r in values.tolist()}) != len(values):
        raise ScalerError(f"space {space.name} holds two architectures with the same depths and widths")
    choices = [np.unique(values[:, j]) for j in range(len(KEYS))]
    coords = np.stack([np.searchsorted(c, values[:, j]) for j, c in enumerate(choices)], axis=1)
    grid = np.full(tuple(len(c) for c in choices), -1, dtype=np.int64)
    grid[tuple(coords.T)] = np.arange(len(values))
    problem = Problem(tuple(len(c) for c in choices), coords, grid, np.full(len(values), np.nan))
    return problem, archs


def _flat(spec) -> tuple:
    d, w = spec.depths, spec.widths
    return (d[0], w[0], d[1], w[1], d[2], w[2])


@dataclass
class Study:
    """Trains what is asked through the sweep engine and reads values back from the study."""

    space: object
    study_dir: str
    config: object
    options: object
    metric: str
    announce: object = None
    known: dict = field(default_factory=dict)  # row -> objective value (higher is better)
    trained: int = 0
    failed: list = field(default_factory=list)

    def refresh(self) -> None:
        """Objective values of every complete trial in the study, by space row."""
        from pathlib import Path

        from studies.benchmark import get_metric, lower_is_better

        if not (Path(self.study_dir) / "results.sqlite").exists():
            return
        from studies.results import load_records

        row_of = {a.arch_id: i for i, a in enumerate(self.space.archs)}
        sign = -1.0 if lower_is_better(self.metric) else 1.0
        for rec in load_records(self.study_dir):
            row = row_of.get(rec["arch_id"])
            if row is not None:
                v = get_metric(rec, self.metric)
                self.known[row] = sign * v if math.isfinite(v) else -math.inf

    def measure(self, rows: list[int]) -> None:
        """Train and test the rows not measured yet, as one sweep (trials run in parallel)."""
        from studies.sweep import sweep

        todo = sorted({int(r) for r in rows} - set(self.known))
        if not todo:
            return
        ids = [self.space.archs[r].arch_id for r in todo]
        summary = sweep(self.space, self.study_dir, self.config, self.options, arch_ids=ids, announce=self.announce)
        self.trained += summary.complete
        if summary.pending:
            raise KeyboardInterrupt  # the sweep was interrupted; the study keeps what finished
        self.refresh()
        for r in todo:
            if r not in self.known:  # recorded as failed after its retries
                self.known[r] = -math.inf
                self.failed.append(self.space.archs[r].arch_id)


class LiveOracle(Oracle):
    """The tabular oracle's budget rules, with values measured on demand."""

    def __init__(self, problem: Problem, budget: int, study: Study):
        super().__init__(problem, budget)
        self.study = study

    def __call__(self, row: int) -> float:
        row = int(row)
        if row not in self.seen and len(self.seen) < self.budget and row not in self.study.known:
            self.study.measure([row])
        if row in self.study.known:
            self.problem.values[row] = self.study.known[row]
        return super().__call__(row)

    def prefetch(self, rows) -> None:
        """Measure, together, the new rows among `rows` that the budget still allows."""
        room = self.budget - len(self.seen)
        new = [int(r) for r in rows if int(r) not in self.seen][: max(room, 0)]
        self.study.measure(new)


def live_search(
    space,
    study_dir: str,
    config,
    options,
    *,
    algo: str,
    queries: int,
    runs: int,
    seed: int,
    metric: str = "val_pgd_acc",
    settings: Settings = Settings(),
    announce=None,
) -> tuple[list[dict], Study, list[dict]]:
    """Run `runs` searches in turn on one study (later runs reuse what earlier ones measured).
    Returns the runs' results (rows of the space), the study, and the space's archs by row."""
    from studies.benchmark import objective_metric
    from studies.sweep import _ray_session, preflight

    metric = objective_metric(metric)
    preflight(config, options)  # bad settings (the dataset's too) before Ray starts
    problem, archs = problem_of_space(space)
    study = Study(space, str(study_dir), config, options, metric, announce)
    study.refresh()
    seqs = np.random.SeedSequence(seed).spawn(runs)
    results = []
    with _ray_session(options.address, announce):
        for sq in seqs:
            results.append(run_one_with(LiveOracle(problem, queries, study), algo, sq, settings))
    return results, study, archs


def remap(results: list[dict], archs: list[dict], bench) -> list[dict]:
    """Results in space rows -> results in the study benchmark's rows (what `summarize` reads)."""

    def row(r: int) -> int:
        return bench.row(archs[r])

    out = []
    for res in results:
        res = dict(
            res, best_row=row(res["best_row"]), order=[row(r) for r in res["order"] if _measured(bench, archs[r])]
        )
        if "local_optima" in res:
            res["local_optima"] = [row(r) for r in res["local_optima"]]
        out.append(res)
    return out


def _measured(bench, arch: dict) -> bool:
    return bench.contains(arch)
