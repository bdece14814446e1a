"""Black-box architecture search on a tabular benchmark: NARes's four baselines (its section 5).

A search sees only an objective (a validation metric, higher better after the sign flip for
losses) through an `Oracle` that charges one query per architecture not queried before: asking
again for a seen architecture is free, as it is when a live search reads a measured architecture
from its study. Every algorithm stops when the budget is spent or the space is exhausted.

  random     sample without replacement
  local      from a random architecture evaluate all neighbours (one coordinate changed), move to
             the best improving one; at a local optimum restart from a random unqueried architecture
  evolution  regularized evolution: population 30, tournament 10, mutate one coordinate of the
             winner, the oldest dies
  bananas    ensemble of 5 MLPs on a one-hot encoding, independent Thompson sampling over
             candidates mutated from the best architectures found, 10 queries per round

Runs are independent: run r draws from `SeedSequence(seed).spawn(runs)[r]`, so results do not
depend on how many processes share the work.
"""

from __future__ import annotations

import math
import os
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from scaler.errors import ScalerError

ALGOS = ("random", "local", "evolution", "bananas")


@dataclass(frozen=True)
class Settings:
    """Reference settings (NARes section 5 / NASLib defaults); tests shrink the BANANAS ones."""

    population: int = 30
    tournament: int = 10
    bananas_init: int = 10
    bananas_batch: int = 10
    bananas_candidates: int = 100
    bananas_top: int = 10
    bananas_members: int = 5
    bananas_epochs: int = 200


@dataclass(frozen=True)
class Problem:
    """What a search needs, picklable and small: the grid of choices and one objective per row.

    coords[i] are row i's choice indices; grid maps choice indices to a row (-1: not measured)."""

    sizes: tuple[int, ...]
    coords: np.ndarray
    grid: np.ndarray
    values: np.ndarray

    @classmethod
    def from_benchmark(cls, bench, metric: str) -> Problem:
        from studies.benchmark import lower_is_better, objective_metric

        metric = objective_metric(metric)
        choices = bench.choices()
        coords = np.stack([np.searchsorted(c, bench.archs[:, j]) for j, c in enumerate(choices)], axis=1)
        raw = bench.metric(metric)
        values = -raw if lower_is_better(metric) else raw.copy()
        usable = np.isfinite(values)
        if not usable.any():
            raise ScalerError(f"{bench.source} has no {metric} values to search on")
        grid = np.full(tuple(len(c) for c in choices), -1, dtype=np.int64)
        rows = np.flatnonzero(usable)
        grid[tuple(coords[rows].T)] = rows
        return cls(tuple(len(c) for c in choices), coords, grid, values)

    @property
    def rows(self) -> np.ndarray:
        return self.grid[self.grid >= 0]

    def neighbours(self, row: int) -> list[int]:
        """Measured architectures that differ from `row` in exactly one coordinate."""
        out = []
        base = self.coords[row]
        for j, size in enumerate(self.sizes):
            for v in range(size):
                if v != base[j]:
                    c = base.copy()
                    c[j] = v
                    r = int(self.grid[tuple(c)])
                    if r >= 0:
                        out.append(r)
        return out

    def mutate(self, row: int, rng: np.random.Generator) -> int | None:
        """A random one-coordinate mutation of `row` that is in the benchmark (None if none is)."""
        base = self.coords[row]
        for _ in range(32):  # rejection sampling is exact and fast on a (nearly) full grid
            j = int(rng.integers(len(self.sizes)))
            if self.sizes[j] < 2:
                continue
            v = int(rng.integers(self.sizes[j] - 1))
            c = base.copy()
            c[j] = v + (v >= base[j])
            r = int(self.grid[tuple(c)])
            if r >= 0:
                return r
        options = self.neighbours(row)
        return int(options[rng.integers(len(options))]) if options else None


class Exhausted(Exception):
    """The query budget is spent or every architecture has been queried."""


@dataclass
class Oracle:
    problem: Problem
    budget: int
    seen: dict = field(default_factory=dict)
    order: list = field(default_factory=list)

    def __call__(self, row: int) -> float:
        row = int(row)
        if row not in self.seen:
            if len(self.seen) >= self.budget:
                raise Exhausted
            self.seen[row] = float(self.problem.values[row])
            self.order.append(row)
        return self.seen[row]

    def unseen(self, rng: np.random.Generator):
        """Unqueried rows in random order (a fresh permutation, filtered lazily)."""
        for r in rng.permutation(self.problem.rows):
            if int(r) not in self.seen:
                yield int(r)
        raise Exhausted

    def prefetch(self, rows) -> None:
        """A hint that `rows` are about to be queried (a live oracle trains them together)."""

    def check(self) -> None:
        if len(self.seen) >= min(self.budget, len(self.problem.rows)):
            raise Exhausted


# ------------------------------------------------------------------------ algorithms
def random_search(oracle: Oracle, rng: np.random.Generator, s: Settings, info: dict) -> None:
    order = [int(r) for r in rng.permutation(oracle.problem.rows) if int(r) not in oracle.seen]
    oracle.prefetch(order[: oracle.budget - len(oracle.seen)])
    for row in order:
        oracle(row)
    raise Exhausted


def local_search(oracle: Oracle, rng: np.random.Generator, s: Settings, info: dict) -> None:
    info.update(restarts=0, local_optima=[])
    starts = oracle.unseen(rng)
    while True:
        current = next(starts)
        value = oracle(current)
        while True:
            nbrs = oracle.problem.neighbours(current)
            rng.shuffle(nbrs)
            oracle.prefetch(nbrs)
            scored = [(oracle(r), r) for r in nbrs]
            best_value, best = max(scored, default=(-math.inf, None))
            if best is None or best_value <= value:
                info["local_optima"].append(current)
                info["restarts"] += 1
                break
            current, value = best, best_value


def evolution(oracle: Oracle, rng: np.random.Generator, s: Settings, info: dict) -> None:
    population: deque = deque()
    starts = oracle.unseen(rng)
    first = _draw(starts, s.population)
    oracle.prefetch(first)
    for row in first:
        population.append((row, oracle(row)))
    stale = 0
    while True:
        oracle.check()
        picks = rng.choice(len(population), size=min(s.tournament, len(population)), replace=False)
        parent = max((population[i] for i in picks), key=lambda p: p[1])[0]
        child = oracle.problem.mutate(parent, rng)
        if child is None:
            child = next(starts)
        before = len(oracle.seen)
        population.append((child, oracle(child)))
        population.popleft()
        stale = 0 if len(oracle.seen) > before else stale + 1
        if stale > 200:  # every mutation near the population is queried: inject a random newcomer
            row = next(starts)
            population.append((row, oracle(row)))
            population.popleft()
            stale = 0


def bananas(oracle: Oracle, rng: np.random.Generator, s: Settings, info: dict) -> None:
    from studies import surrogate

    p = oracle.problem
    starts = oracle.unseen(rng)
    first = _draw(starts, s.bananas_init)
    oracle.prefetch(first)
    for row in first:
        oracle(row)
    rounds = 0
    while True:
        oracle.check()
        seen = np.array(oracle.order)
        y = np.array([oracle.seen[r] for r in oracle.order])
        model = surrogate.fit(
            surrogate.encode(p.coords[seen], p.sizes),
            y,
            members=s.bananas_members,
            epochs=s.bananas_epochs,
            seed=int(rng.integers(2**31)),
        )
        candidates = _candidates(oracle, rng, s, starts)
        with surrogate.torch_threads(1):  # as the fit: the same ranking on any machine
            preds = model.predict(surrogate.encode(p.coords[candidates], p.sizes))
        mu, sd = preds.mean(0), preds.std(0)
        its = rng.normal(mu, sd + 1e-9)  # independent Thompson sampling: one posterior draw each
        batch = [int(candidates[i]) for i in np.argsort(-its)[: s.bananas_batch]]
        oracle.prefetch(batch)
        for row in batch:
            oracle(row)
        rounds += 1
        info["rounds"] = rounds


def _draw(starts, n: int) -> list[int]:
    """Up to n rows from a generator of unqueried rows (fewer when the space runs out)."""
    out = []
    for _ in range(n):
        try:
            out.append(next(starts))
        except (Exhausted, StopIteration):
            break
    return out


def _candidates(oracle: Oracle, rng, s: Settings, starts) -> np.ndarray:
    """Unqueried mutations of the best architectures so far, topped up with random ones."""
    best = sorted(oracle.seen, key=oracle.seen.get, reverse=True)[: s.bananas_top]
    pool: set[int] = set()
    for _ in range(20):
        for row in best:
            child = oracle.problem.mutate(row, rng)
            if child is not None and child not in oracle.seen:
                pool.add(child)
        if len(pool) >= s.bananas_candidates:
            break
    while len(pool) < min(s.bananas_batch, s.bananas_candidates):
        pool.add(next(starts))
    out = np.array(sorted(pool))
    rng.shuffle(out)
    return out[: s.bananas_candidates]


ALGORITHMS = {"random": random_search, "local": local_search, "evolution": evolution, "bananas": bananas}


# ------------------------------------------------------------------------ running
def run_one(problem: Problem, algo: str, queries: int, seed_seq, settings: Settings = Settings()) -> dict:
    """One independent run on a table: its queried rows in order, best row and value, details."""
    return run_one_with(Oracle(problem, queries), algo, seed_seq, settings)


def run_one_with(oracle: Oracle, algo: str, seed_seq, settings: Settings = Settings()) -> dict:
    """One run of `algo` against any oracle (a table's, or a live study's)."""
    rng = np.random.default_rng(seed_seq)
    info: dict = {}
    try:
        ALGORITHMS[algo](oracle, rng, settings, info)
    except (Exhausted, StopIteration):
        pass
    order = oracle.order
    values = [oracle.seen[r] for r in order]
    best_at = int(np.argmax(values))
    return {
        "order": order,
        "best_row": order[best_at],
        "best_value": values[best_at],
        "found_at": best_at + 1,
        "queries": len(order),
        "trajectory": np.maximum.accumulate(values).tolist(),
        **info,
    }


_PROBLEM: Problem | None = None  # a worker process's copy, sent once by `_share`


def _share(problem: Problem) -> None:
    global _PROBLEM
    _PROBLEM = problem


def _job(args) -> dict:
    return run_one(_PROBLEM, *args)


def search(
    problem: Problem,
    algo: str,
    *,
    queries: int,
    runs: int,
    seed: int,
    workers: int | None = None,
    settings: Settings = Settings(),
    progress: bool = False,
) -> list[dict]:
    """`runs` independent runs of `algo`, spread over `workers` processes (default: CPU count);
    `progress` shows a bar over the runs on stderr. Each worker gets the problem once."""
    if algo not in ALGORITHMS:
        raise ScalerError(f"unknown search algorithm {algo!r}; choose one of {', '.join(ALGOS)}")
    if queries < 1 or runs < 1:
        raise ScalerError("--queries and --runs must be >= 1")
    if seed < 0:
        raise ScalerError("--seed must be >= 0")
    jobs = [(algo, queries, sq, settings) for sq in np.random.SeedSequence(seed).spawn(runs)]
    workers = min(runs, workers or os.cpu_count() or 1)
    if workers <= 1:
        with _bar(runs, algo, progress) as bar:
            return [_done(run_one(problem, *j), bar) for j in jobs]
    import multiprocessing as mp
    import sys
    from concurrent.futures import ProcessPoolExecutor

    # fork is cheap, but a parent whose torch thread pools already run must not be forked.
    context = mp.get_context("spawn" if "torch" in sys.modules else "fork")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_share, initargs=(problem,)) as pool:
        results = pool.map(_job, jobs)  # submits them all, so the workers fork before the bar's thread starts
        with _bar(runs, algo, progress) as bar:
            return [_done(r, bar) for r in results]


def _bar(runs: int, algo: str, progress: bool):
    import sys

    from tqdm import tqdm

    return tqdm(total=runs, desc=f"search {algo}", unit="run", leave=False, file=sys.stderr, disable=not progress)


def _done(result: dict, bar) -> dict:
    bar.update(1)
    return result


def summarize(bench, metric: str, algo: str, results: list[dict], *, queries: int, seed: int) -> dict:
    """The report of a search: per-run best architecture with its objective and test metrics, the
    mean and std over runs, and the benchmark's optimum of each metric for scale."""
    from studies.benchmark import METRICS, lower_is_better

    tests = [m for m in METRICS if m.startswith("test_") and bench.has(m)]
    vals = [m for m in METRICS if m.startswith("val_") and bench.has(m)]
    sign = -1.0 if lower_is_better(metric) else 1.0
    per_run = []
    for i, r in enumerate(results):
        row = r["best_row"]
        entry = {
            "run": i,
            "best_arch": bench.arch(row),
            "best_arch_id": int(bench.arch_ids[row]),
            "best_objective": sign * r["best_value"],
            "found_at": r["found_at"],
            "queries": r["queries"],
            "val": {m: float(bench.metric(m)[row]) for m in vals},
            "test": {m: float(bench.metric(m)[row]) for m in tests},
        }
        if "restarts" in r:
            entry["restarts"] = r["restarts"]
            entry["local_optima"] = [bench.arch(x) for x in r["local_optima"]]
        per_run.append(entry)
    best = np.array([e["best_objective"] for e in per_run])

    def optimum(m: str) -> float:
        col = bench.metric(m)
        return float(np.nanmin(col) if lower_is_better(m) else np.nanmax(col))

    return {
        "benchmark": bench.source,
        "records": len(bench),
        "algo": algo,
        "metric": metric,
        "queries": queries,
        "runs": len(results),
        "seed": seed,
        "mean_best_objective": float(best.mean()),
        "std_best_objective": float(best.std()),
        "optimum_objective": optimum(metric),
        "mean_found_at": float(np.mean([e["found_at"] for e in per_run])),
        "mean_val": {m: float(np.mean([e["val"][m] for e in per_run])) for m in vals},
        "mean_test": {m: float(np.mean([e["test"][m] for e in per_run])) for m in tests},
        "std_test": {m: float(np.std([e["test"][m] for e in per_run])) for m in tests},
        "optimum_test": {m: optimum(m) for m in tests},
        "per_run": per_run,
    }
