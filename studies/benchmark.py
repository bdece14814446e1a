"""A tabular benchmark: NARes-format records (a `.jsonl` file or a study directory) as columns.

Loading keeps only the scalar metrics (one float column per metric name) plus each record's byte
offset, so the 15,625-record file (about 140 MB of per-epoch histories) loads in seconds and a few
MB stay in memory; `query(arch)` re-reads one record when the histories are wanted.

Metric names follow the NARes API (`get_metric`): per-epoch metrics are read "at the best epoch"
(`train[0]['best_epoch']`), test metrics from `test_best[0]`. `objective()` refuses test metrics, so a
search cannot peek at the test set.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from scaler.errors import ScalerError

TOP_LEVEL = {"macs": "MACs", "params": "Params"}
TRAIN_SCALARS = {"best_epoch": "best_epoch", "training_time": "training_time"}
PER_EPOCH = {
    "train_acc": "train_acc",
    "train_loss": "train_loss",
    "val_loss": "val_loss",
    "val_clean_acc": "val_acc",
    "val_pgd_acc": "pgd",
    "val_pgd_stable": "pgd_stable",
    "val_pgd_lip": "pgd_lip",
    "val_pgd_loss": "pgd_loss",
    "val_cw_acc": "cw",
    "val_cw_stable": "cw_stable",
    "val_cw_lip": "cw_lip",
    "val_cw_loss": "cw_loss",
}
TEST = {
    "test_clean_acc": "test_clean_acc",
    "test_loss": "test_loss",
    "test_fgsm_acc": "Linf_fgsm_acc",
    "test_fgsm_stable": "Linf_fgsm_stable",
    "test_pgd_acc": "Linf_pgd_acc",
    "test_pgd_stable": "Linf_pgd_stable",
    "test_pgd_lip": "Linf_pgd_lip",
    "test_cw_acc": "Linf_cw_acc",
    "test_cw_stable": "Linf_cw_stable",
    "test_cw_lip": "Linf_cw_lip",
    "test_aa_acc": "Linf_aa_acc",
}
METRICS = (*TOP_LEVEL, *TRAIN_SCALARS, *PER_EPOCH, *TEST, "test_corrupt_acc")
HISTORIES = tuple(PER_EPOCH.values())
SYNTHETIC_GPU = "synthetic"
"""`train[0]['gpu_type']` of the records `scaler synthetic` invents (studies.synthetic): how a
synthetic benchmark is told from a measured one."""


def lower_is_better(metric: str) -> bool:
    """Losses, Lipschitz constants and costs are minimised; accuracies are maximised."""
    return metric.endswith(("_loss", "_lip")) or metric in ("macs", "params", "training_time")


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ScalerError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")


def get_metric(record: Mapping, metric: str) -> float:
    """One scalar metric of a NARes-format record (NaN where the record lacks it)."""
    _check_metric(metric)
    try:
        if metric in TOP_LEVEL:
            return float(record[TOP_LEVEL[metric]])
        train = record["train"][0] if record.get("train") else {}
        if metric in TRAIN_SCALARS:
            return float(train[TRAIN_SCALARS[metric]])
        if metric in PER_EPOCH:
            return float(train[PER_EPOCH[metric]][int(train["best_epoch"])])
        test = record["test_best"][0] if record.get("test_best") else {}
        if metric == "test_corrupt_acc":
            accs = [float(s["acc"]) for c in test["corruptions"].values() for s in c.values()]
            return sum(accs) / len(accs) if accs else math.nan
        return float(test[TEST[metric]])
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):  # absent or null in the record
        return math.nan


def _arch_of(record: Mapping, where: str) -> dict:
    arch = record.get("arch")
    if not isinstance(arch, Mapping) or not arch:
        raise ScalerError(f"{where}: a NARes record needs an 'arch' object such as {{'D1': 4, 'W1': 8, ...}}")
    return dict(arch)


@dataclass
class Benchmark:
    """Records as columns. `archs[i]` is row i's arch values in `keys` order."""

    source: str
    keys: tuple[str, ...]
    archs: np.ndarray
    columns: dict[str, np.ndarray]
    arch_ids: np.ndarray
    synthetic: int = 0  # records marked synthetic (invented metrics, not measured)
    _offsets: list[int] | None = field(default=None, repr=False)
    _records: list[dict] | None = field(default=None, repr=False)
    _index: dict[tuple, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._index = {tuple(float(v) for v in row): i for i, row in enumerate(self.archs)}

    def __len__(self) -> int:
        return len(self.archs)

    # ------------------------------------------------------------------ lookups
    def row(self, arch: Mapping | tuple | list) -> int:
        """Row of an architecture given as {'D1': 4, ...} or as a tuple in `keys` order."""
        if isinstance(arch, Mapping):
            missing, unknown = [k for k in self.keys if k not in arch], [k for k in arch if k not in self.keys]
            if missing or unknown:
                wrong = f"lacks {', '.join(missing)}" if missing else f"has no {', '.join(unknown)} here"
                shown = ",".join(f"{k}={v}" for k, v in arch.items())
                raise ScalerError(f"architecture {shown} {wrong}: give {', '.join(self.keys)} (in {self.source})")
            key = tuple(float(arch[k]) for k in self.keys)
        else:
            key = tuple(map(float, arch))
            if len(key) != len(self.keys):
                raise ScalerError(f"architecture {key} has {len(key)} values; {self.source} has {', '.join(self.keys)}")
        if key not in self._index:
            shown = ", ".join(f"{k}={_num(v)}" for k, v in zip(self.keys, key))
            raise ScalerError(f"architecture {shown} is not in {self.source}")
        return self._index[key]

    def contains(self, arch) -> bool:
        try:
            self.row(arch)
        except (ScalerError, KeyError, ValueError):
            return False
        return True

    def arch(self, row: int) -> dict:
        return {k: _num(v) for k, v in zip(self.keys, self.archs[row])}

    def query(self, arch) -> dict:
        """The full record (histories included) of one architecture."""
        return self.record(self.row(arch))

    def batch_query(self, archs) -> list[dict]:
        return [self.query(a) for a in archs]

    def record(self, row: int) -> dict:
        if self._records is not None:
            return self._records[row]
        with open(self.source, "rb") as fh:
            fh.seek(self._offsets[row])
            return json.loads(fh.readline())

    def metric(self, name: str) -> np.ndarray:
        """The column of a scalar metric (NaN where a record lacks it)."""
        _check_metric(name)
        return self.columns[name]

    @property
    def synthetic_note(self) -> str | None:
        """One line saying the metrics are invented, for benchmarks with synthetic records; else None."""
        if not self.synthetic:
            return None
        share = "" if self.synthetic == len(self) else f"{self.synthetic:,} of {len(self):,} records of "
        return (
            f"note: {share}{Path(self.source).name} is SYNTHETIC (written by `scaler synthetic`): "
            "exact costs, invented metrics, not measured"
        )

    def has(self, name: str) -> bool:
        return name in self.columns and bool(np.isfinite(self.columns[name]).any())

    def objective(self, arch, metric: str = "val_pgd_acc") -> float:
        """What a search may see of an architecture: never a test metric."""
        return float(self.metric(objective_metric(metric))[self.row(arch)])

    # ------------------------------------------------------------------ derived views
    def stage_values(self, prefix: str) -> np.ndarray:
        """(n, stages) array of the arch keys D1, D2, ... (prefix 'D') or W1, W2, ... ('W')."""
        cols = [i for i, k in enumerate(self.keys) if k[:1] == prefix and k[1:].isdigit()]
        if not cols:
            raise ScalerError(f"{self.source}: its archs have no {prefix}1, {prefix}2, ... keys")
        cols.sort(key=lambda i: int(self.keys[i][1:]))
        return self.archs[:, cols]

    @property
    def depths(self) -> np.ndarray:
        return self.stage_values("D")

    @property
    def widths(self) -> np.ndarray:
        return self.stage_values("W")

    def choices(self) -> list[tuple[int, ...]]:
        """Per key, the sorted values that occur."""
        return [tuple(_num(v) for v in np.unique(self.archs[:, j])) for j in range(len(self.keys))]


def _num(v) -> int | float:
    """An int where the value is whole (depths, most widths), else the float (W = 10.1875)."""
    v = float(v)
    return int(v) if v.is_integer() else v


def arch_text(arch: Mapping) -> str:
    """'d4-5-7 w8-10-16' for D1..W3 archs, 'key=value ...' otherwise."""
    d = [arch[k] for k in sorted(arch) if k[:1] == "D" and k[1:].isdigit()]
    w = [arch[k] for k in sorted(arch) if k[:1] == "W" and k[1:].isdigit()]
    if d and w and len(d) + len(w) == len(arch):
        return f"d{'-'.join(map(str, d))} w{'-'.join(map(str, w))}"
    return " ".join(f"{k}={v}" for k, v in arch.items())


NOT_OBJECTIVES = ("macs", "params", "best_epoch", "training_time")  # costs and bookkeeping, not accuracies


def objective_metric(metric: str) -> str:
    """`metric` if a search may optimise it; test metrics are refused with one line."""
    objectives = [m for m in METRICS if not m.startswith("test_") and m not in NOT_OBJECTIVES]
    if metric not in METRICS:
        raise ScalerError(f"unknown metric {metric!r}; a search optimises one of {', '.join(objectives)}")
    if metric.startswith("test_"):
        raise ScalerError(
            f"{metric} is a test metric; a search may only see validation and training metrics "
            "(e.g. val_pgd_acc, val_cw_acc, val_clean_acc)"
        )
    if metric in NOT_OBJECTIVES:
        raise ScalerError(f"{metric} is not an objective; optimise a validation metric such as val_pgd_acc")
    return metric


# ---------------------------------------------------------------------- loading
def load(source: str | Path) -> Benchmark:
    """A benchmark from a NARes-format `.jsonl` file or a study directory."""
    path = Path(source)
    if path.is_dir():
        return from_records(_study_records(path), str(path))
    if not path.is_file():
        raise ScalerError(f"{path} not found: give a NARes-format .jsonl file or a study directory")
    offsets, records, pos = [], [], 0
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            start, pos = pos, pos + len(line)
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ScalerError(f"{path}:{lineno}: not JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise ScalerError(f"{path}:{lineno}: each line must be one JSON object (a NARes record)")
            records.append(_scalars(rec, f"{path}:{lineno}"))
            offsets.append(start)
    return _build(records, str(path), offsets=offsets)


def from_records(records: list[dict], source: str = "records") -> Benchmark:
    """A benchmark over in-memory NARes-format records (kept, histories and all)."""
    scalars = [_scalars(r, f"{source}[{i}]") for i, r in enumerate(records)]
    return _build(scalars, source, records=list(records))


def _study_records(path: Path) -> list[dict]:
    try:
        from studies.results import load_records
    except ImportError:
        raise ScalerError(f"{path} is a directory, and reading studies needs studies.results (issue 12)") from None
    return load_records(path)


def _scalars(rec: dict, where: str) -> dict:
    out = {m: get_metric(rec, m) for m in METRICS}
    out["_arch"] = _arch_of(rec, where)
    out["_id"] = rec.get("arch_id")
    out["_synthetic"] = _is_synthetic(rec)
    return out


def _is_synthetic(rec: dict) -> bool:
    try:
        return rec["train"][0].get("gpu_type") == SYNTHETIC_GPU
    except (KeyError, IndexError, TypeError, AttributeError):
        return False


def _build(scalars: list[dict], source: str, *, offsets=None, records=None) -> Benchmark:
    if not scalars:
        raise ScalerError(f"{source} holds no records")
    first = scalars[0]["_arch"]
    keys = tuple(k for k, v in first.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    if not keys:
        raise ScalerError(f"{source}: the records' arch has no numeric keys (D1, W1, ...)")
    try:
        archs = np.array([[float(s["_arch"][k]) for k in keys] for s in scalars], dtype=float)
    except (KeyError, TypeError, ValueError):
        raise ScalerError(f"{source}: every record's arch needs the numeric keys {', '.join(keys)}") from None
    for k in set(first) - set(keys):  # a study's constant non-numeric keys (block, activation)
        if len({str(s["_arch"].get(k)) for s in scalars}) > 1:
            raise ScalerError(f"{source}: the records differ in arch key {k!r}; analyse one {k} at a time")
    if len({tuple(r) for r in archs.tolist()}) != len(archs):
        raise ScalerError(f"{source}: an architecture appears twice; keep one record per architecture")
    columns = {m: np.array([s[m] for s in scalars], dtype=float) for m in METRICS}
    ids = np.array([s["_id"] if isinstance(s["_id"], int) else i + 1 for i, s in enumerate(scalars)])
    synthetic = sum(bool(s["_synthetic"]) for s in scalars)
    return Benchmark(source, keys, archs, columns, ids, synthetic, _offsets=offsets, _records=records)
