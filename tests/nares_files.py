"""Small NARes-format benchmark files with known answers, written by the tests themselves."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np

KEYS = ("D1", "W1", "D2", "W2", "D3", "W3")
DEPTHS = (4, 5, 7)
WIDTHS = (8, 10, 12, 14)
OPTIMUM = (7, 10, 5, 12, 4, 14)


def record(arch: dict, val: float, *, test: float | None = None, macs: float = 1e9, params: float = 1e6, **extra):
    """A minimal NARes record: histories of two epochs, best epoch 1, the value at index 1."""
    test = val + 15 if test is None else test
    train = {"seed": 0, "best_epoch": 1, "training_time": 0.1, "pgd": [val - 5, val], "cw": [val - 6, val - 1]}
    train.update({k: [0.0, v] for k, v in extra.items()})
    return {
        "arch_id": 0,
        "arch": dict(arch),
        "MACs": macs,
        "Params": params,
        "train": [train],
        "test_best": [{"Linf_pgd_acc": test, "Linf_aa_acc": test - 3, "test_clean_acc": test + 30}],
    }


def grid_values(seed: int = 0, noise: float = 0.3) -> dict[tuple, float]:
    """Objective over a 1,728-architecture grid: a bowl around OPTIMUM (coordinates as choice
    indices) plus seeded noise that makes local optima, with the optimum pinned 1.0 above the rest."""
    rng = np.random.default_rng(seed)
    choices = [DEPTHS, WIDTHS] * 3
    opt_idx = [c.index(v) for c, v in zip(choices, OPTIMUM)]
    out = {}
    for arch in itertools.product(*choices):
        idx = [c.index(v) for c, v in zip(choices, arch)]
        out[arch] = 40.0 - 0.5 * sum((i - o) ** 2 for i, o in zip(idx, opt_idx)) + rng.normal(0, noise)
    top = max(v for a, v in out.items() if a != OPTIMUM)
    out[OPTIMUM] = top + 1.0
    return out


def write_grid(path: Path, seed: int = 0, noise: float = 0.3, skip: set | None = None) -> Path:
    lines = []
    for i, (arch, v) in enumerate(sorted(grid_values(seed, noise).items())):
        if skip and arch in skip:
            continue
        rec = record(dict(zip(KEYS, arch)), round(v, 3))
        rec["arch_id"] = i + 1
        lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n")
    return path
