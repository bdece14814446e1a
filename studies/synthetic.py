"""A SYNTHETIC benchmark in NARes's record format, for tests and demos when the real file is absent.

Nothing here was measured. Every architecture of NARes's space (D_i in {4,5,7,9,11}, W_i in
{8,...,16}, pre-activation basic-block WRNs) gets exact MACs and params from the cost model and
invented metrics: validation PGD accuracy grows smoothly and saturating with log(params), peaks at a
depth share r_D near 0.42, prefers depth in the first two stages and width in the last, plus a
seeded per-architecture noise; validation metrics add a per-architecture error of 0.5 points (a
2,000-image validation set) that test metrics do not share, so the best validation architecture is
not always the best test one, as in the real data. Per-epoch
histories have a step-LR shape with robust overfitting after the first decay; the best epoch is
the argmax of the CW curve (NARes picks it by PGD-CW40) and scalar "val_*" metrics read that epoch.

Same `seed`, same file, byte for byte. arch_id runs 1..N in ascending exact MACs, ties broken by
the arch tuple (D1, W1, D2, W2, D3, W3) in ascending order.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from scaler.cost import cost_at
from scaler.errors import ScalerError
from scaler.fileio import atomic_write
from scaler.spec import ArchSpec, widths_to_planes

DEPTHS = (4, 5, 7, 9, 11)
WIDTHS = (8, 10, 12, 14, 16)
KEYS = ("D1", "W1", "D2", "W2", "D3", "W3")
WRN = ArchSpec("basic", (1, 1, 1), (16, 32, 64))
"""NARes's networks: pre-activation basic-block WRNs for CIFAR-10 (each arch sets depths and widths)."""
CORRUPTIONS = ("gaussian_noise", "fog", "contrast", "jpeg_compression")


def nares_archs(depths=DEPTHS, widths=WIDTHS) -> list[tuple[int, ...]]:
    """Every (D1, W1, D2, W2, D3, W3) of the grid, in ascending exact MACs (ties: tuple order)."""
    archs = list(itertools.product(depths, widths, depths, widths, depths, widths))
    cost = {a: wrn_cost(a) for a in archs}
    return sorted(archs, key=lambda a: (cost[a][1], a))


def wrn_spec(arch: tuple[int, ...]) -> ArchSpec:
    """The network of an arch tuple (D1, W1, D2, W2, D3, W3): `WRN` with planes 16*W1, 32*W2, 64*W3."""
    depths, planes = _depths_planes(arch)
    return replace(WRN, depths=depths, planes=planes)


def wrn_cost(arch: tuple[int, ...]) -> tuple[int, int]:
    """(params, MACs) of `wrn_spec(arch)`, `count`'s: `cost_at` of `WRN`, the same walk without a
    spec validated per arch (a grid holds 15,625, the measured rule's spaces up to millions)."""
    cost = cost_at(WRN, *_depths_planes(arch))
    return cost.params, cost.flops


def _depths_planes(arch: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    d1, w1, d2, w2, d3, w3 = arch
    return (int(d1), int(d2), int(d3)), widths_to_planes((w1, w2, w3))  # refuses fractional channels


def _scores(archs: np.ndarray, params: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The invented 'true' robustness (validation PGD accuracy at the best epoch, %)."""
    d = archs[:, [0, 2, 4]].astype(float)
    w = archs[:, [1, 3, 5]].astype(float)
    r_d = d.sum(1) / (d.sum(1) + w.sum(1))
    capacity = 5.0 * (1 - np.exp(-0.9 * np.log(params / params.min())))
    shape = -40.0 * (r_d - 0.42) ** 2 + 0.08 * (d[:, 0] + d[:, 1] - 2 * d[:, 2]) + 0.06 * (w[:, 2] - w[:, 0])
    return 33.0 + capacity + shape + rng.normal(0, 0.25, len(archs))


def accuracy(values: np.ndarray) -> np.ndarray:
    """Invented accuracies kept to percentages."""
    return np.clip(values, 0.0, 100.0)


def _curves(peak: np.ndarray, epochs: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """(n, epochs) histories with a step schedule at 75% and 90% and robust overfitting after it."""
    n = len(peak)
    e = np.arange(epochs, dtype=float)
    m1, m2 = round(0.75 * epochs), round(0.9 * epochs)
    warm = 1 - np.exp(-e / max(epochs / 12, 1))
    phase = np.where(e < m1, 0.0, np.where(e < m2, 1.0, 1.3))
    overfit = np.clip(e - m1, 0, None) / max(epochs - m1, 1)
    shape = (0.86 * warm + 0.14 * np.minimum(phase, 1.0))[None, :]  # 1.0 right after the first decay
    drift = rng.uniform(1.5, 3.5, (n, 1)) * overfit[None, :]
    cw = peak[:, None] * shape - drift - 1.2 + rng.normal(0, 0.25, (n, epochs))
    pgd = accuracy(cw + 1.2 + rng.normal(0, 0.15, (n, epochs)))
    clean = accuracy(2.0 * peak[:, None] * shape - 0.5 * drift + rng.normal(0, 0.3, (n, epochs)))
    cw = accuracy(cw)  # the first epochs start near 0, where the noise alone would go below
    train_acc = np.clip(clean + 10 + 25 * overfit[None, :] * rng.uniform(0.6, 1.0, (n, 1)), 0, 100)
    train_loss = 2.3 * (1 - train_acc / 100) + 0.05
    return {
        "train_loss": train_loss,
        "train_acc": train_acc,
        "val_loss": 1.8 - clean / 100 + 0.2 * overfit[None, :],
        "val_acc": clean,
        "pgd": pgd,
        "pgd_stable": accuracy(pgd - 2.0),
        "pgd_lip": 2.0 + 0.02 * (100 - pgd),
        "pgd_loss": 2.5 - pgd / 50,
        "cw": cw,
        "cw_stable": accuracy(cw - 2.0),
        "cw_lip": 2.1 + 0.02 * (100 - cw),
        "cw_loss": 2.6 - cw / 50,
    }


def generate(seed: int = 0, epochs: int = 100, depths=DEPTHS, widths=WIDTHS, limit: int | None = None) -> list[dict]:
    """NARes-format records of the whole grid (or its `limit` cheapest architectures)."""
    if epochs < 4:
        raise ScalerError("a synthetic benchmark needs at least 4 epochs")
    archs_list = nares_archs(depths, widths)[:limit]
    archs = np.array(archs_list)
    cost = np.array([wrn_cost(a) for a in archs_list], dtype=float)
    rng = np.random.default_rng(seed)
    peak = _scores(archs, cost[:, 0], rng)
    # the validation set is small (NARes: CIFAR-10.1, 2,000 images): each arch's validation numbers
    # carry one fixed error of ~0.5 points that its test numbers do not share
    val_error = rng.normal(0, 0.5, len(archs))
    hist = _curves(peak + val_error, epochs, rng)
    best = hist["cw"].argmax(1)
    rows = np.arange(len(archs))
    at = {k: v[rows, best] for k, v in hist.items()}
    test_noise = rng.normal(0, 0.3, (len(archs), 4))
    test_pgd = at["pgd"] - val_error + 18.0 + test_noise[:, 0]
    test_cw = test_pgd - 1.5 + 0.5 * test_noise[:, 1]
    test_aa = test_cw - 2.6 + 0.5 * test_noise[:, 2]
    test_clean = at["val_acc"] - 2.0 * val_error + 11.0 + test_noise[:, 3]
    test_fgsm = test_pgd + 5.0 + rng.normal(0, 0.2, len(archs))
    corrupt = test_clean[:, None, None] - rng.uniform(2, 18, (len(archs), len(CORRUPTIONS), 1)) * (
        np.arange(1, 6)[None, None, :] / 5
    )
    days = cost[:, 1] / 1e9 * 0.011
    return [
        _record(i, archs_list, cost, hist, best, at, test_clean, test_fgsm, test_pgd, test_cw, test_aa, corrupt, days)
        for i in range(len(archs_list))
    ]


def _r(x, nd=2):
    return round(float(x), nd)


def _record(i, archs, cost, hist, best, at, clean, fgsm, pgd, cw, aa, corrupt, days) -> dict:
    history = {k: np.round(v[i], 4 if "loss" in k or "lip" in k else 2).tolist() for k, v in hist.items()}
    train = {
        "seed": 0,
        "gpu_type": "synthetic",
        "timestamp": "2026-01-01",
        "training_time": _r(days[i], 4),
        "best_epoch": int(best[i]),
        **history,
    }
    corruptions = {
        name: {str(s + 1): {"acc": _r(corrupt[i, c, s]), "loss": _r(2.5 - corrupt[i, c, s] / 50, 4)} for s in range(5)}
        for c, name in enumerate(CORRUPTIONS)
    }
    test = {
        "test_clean_acc": _r(clean[i]),
        "test_loss": _r(1.5 - clean[i] / 100, 4),
        "Linf_fgsm_acc": _r(fgsm[i]),
        "Linf_fgsm_stable": _r(fgsm[i] - 2.0),
        "Linf_pgd_acc": _r(pgd[i]),
        "Linf_pgd_stable": _r(pgd[i] - 2.5),
        "Linf_pgd_lip": _r(at["pgd_lip"][i], 4),
        "Linf_cw_acc": _r(cw[i]),
        "Linf_cw_stable": _r(cw[i] - 2.5),
        "Linf_cw_lip": _r(at["cw_lip"][i], 4),
        "Linf_aa_acc": _r(aa[i]),
        "corruptions": corruptions,
    }
    return {
        "arch_id": i + 1,
        "arch": dict(zip(KEYS, map(int, archs[i]))),
        "MACs": float(cost[i, 1]),
        "Params": float(cost[i, 0]),
        "train": [train],
        "test_best": [test],
    }


def write(path: str | Path, records: list[dict], *, force: bool = False) -> Path:
    """Write records as JSON lines, atomically; refuses to overwrite unless `force`."""

    def dump(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            for rec in records:
                fh.write(json.dumps(rec, separators=(",", ":")) + "\n")

    return atomic_write(path, dump, force=force)
