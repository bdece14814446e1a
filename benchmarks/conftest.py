"""Shared timing for the benchmarks that compare variants: their rounds alternate in one run, so
that the minutes-long drifts of a shared machine fall on every variant alike."""

import time

import pytest


def time_alternating(benchmark, runs: dict, rounds: int) -> dict[str, float]:
    """The median seconds of each of `runs` (name -> callable) over `rounds` rounds, each round one
    call of every run, in an order rotated by one per round (so none always runs first or after
    the same one), after one untimed warm-up call of each. pytest-benchmark times the rounds.
    Each run's median minor page faults per call go to extra_info and are printed (where the OS
    counts them): a run that allocates fresh large tensors pays for the OS zero-filling their
    pages, inside its time."""
    from trainers.bench import minor_page_faults

    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    faults: dict[str, list[int]] = {name: [] for name in names}
    for fn in runs.values():
        fn()
    rotation = iter(range(rounds))

    def one_round():
        r = next(rotation)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            before = minor_page_faults()
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
            if before is not None:
                faults[name].append(minor_page_faults() - before)

    benchmark.pedantic(one_round, rounds=rounds, iterations=1)
    medians = {name: sorted(f)[len(f) // 2] for name, f in faults.items() if f}
    if medians:
        benchmark.extra_info["page_faults_per_call"] = medians
        print("\npage faults per call (medians): " + ", ".join(f"{k} {v:,}" for k, v in medians.items()), end="")
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


@pytest.fixture
def alternating():
    return time_alternating
