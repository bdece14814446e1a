"""Reading a study: NARes-format records, flat rows, a pandas DataFrame, exports.

    load_records("study")   -> [NARes record, ...]   (complete trials, by arch_id)
    dataframe("study")      -> pandas.DataFrame       (one flat row per trial, failed ones too)
    export("study", "x.jsonl" | "x.csv" | "x.parquet")

Only reads results.sqlite (never trial directories), so a study can be copied off a cluster as
that one file. Readers may run while a sweep writes (WAL; on a network filesystem, between its
transactions: see studies.store).
"""

from __future__ import annotations

import json
from pathlib import Path

from scaler.errors import ScalerError
from scaler.fileio import atomic_write
from studies.records import flat_row, to_nares_record
from studies.store import Store, TrialRow

EXPORT_FORMATS = (".jsonl", ".csv", ".parquet")


def load_rows(study_dir: str | Path, status: str | None = None) -> tuple[list[TrialRow], dict]:
    """(rows, meta) of a study."""
    with Store.open(study_dir) as store:
        return store.trials(status), store.meta()


def record_of(row: TrialRow, meta: dict) -> dict:
    """The NARes record of one complete trial."""
    days = row.gpu_hours / 24 if row.gpu_hours > 0 else row.seconds / 86400
    return to_nares_record(
        arch_id=row.arch_id,
        spec=row.spec,
        params=row.params,
        flops=row.flops,
        history=row.history or [],
        best_epoch=row.best_epoch,
        test=row.test or {},
        seed=meta.get("train", {}).get("seed", 0),
        device=row.device or "unknown",
        finished=row.finished or "",
        training_days=days,
    )


def load_records(study_dir: str | Path) -> list[dict]:
    """NARes-format records of a study's complete trials, in arch_id order (what --export x.jsonl writes)."""
    rows, meta = load_rows(study_dir, "complete")
    return [record_of(r, meta) for r in rows]


def flat_rows(study_dir: str | Path) -> list[dict]:
    """One flat dict per trial (pending and failed included, with their status)."""
    rows, _ = load_rows(study_dir)
    return [flat_row(r) for r in rows]


INTEGER_COLUMNS = ("arch_id", "params", "flops", "best_epoch", "epochs", "test_n", "attempts")


def dataframe(study_dir: str | Path):
    """A pandas DataFrame of `flat_rows`, one row per trial. Whole-number columns stay whole where
    some rows have none (a failed trial's best epoch): pandas' nullable Int64, not float."""
    import pandas as pd

    df = pd.DataFrame(flat_rows(study_dir))
    whole = [c for c in df.columns if c in INTEGER_COLUMNS or (c[:1] == "D" and c[1:].isdigit())]
    for column in whole:
        values = df[column].dropna()
        if len(values) == len(df[column]) and values.map(lambda v: isinstance(v, int)).all():
            continue  # already int64
        if values.map(lambda v: float(v).is_integer()).all():
            df[column] = df[column].astype("Int64")
    return df


def select(df, *, where: str | None = None, by: str | None = None, top: int | None = None):
    """Filter with a pandas query (`--where 'params < 1e6 and test_pgd20 > 40'`), sort by a column
    (accuracies high first; params, flops, lip, time, loss low first), keep the first `top`."""
    if where:
        try:
            df = df.query(where)
        except Exception as exc:  # pandas raises many types for a bad expression
            raise ScalerError(f"--where {where!r}: {' '.join(str(exc).split())}") from None
    if by:
        if by not in df.columns:
            raise ScalerError(f"--by {by!r} is not a column; choose from {', '.join(df.columns)}")
        df = df.sort_values(by, ascending=lower_is_better(by), na_position="last", kind="stable")
    if top is not None:
        if top < 1:
            raise ScalerError("--top must be >= 1")
        df = df.head(top)
    return df


def lower_is_better(column: str) -> bool:
    return column in ("arch_id", "params", "flops", "seconds", "gpu_hours", "cpu_hours", "attempts") or column.endswith(
        ("_lip", "_loss")
    )


def export(study_dir: str | Path, path: str | Path, *, force: bool = False) -> int:
    """Write the study to `path` by its suffix: .jsonl (NARes records of complete trials), .csv or
    .parquet (flat rows of every trial). Atomic; refuses an existing file unless `force`.
    Returns the number of records written."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in EXPORT_FORMATS:
        raise ScalerError(f"--export {path}: give a file ending in {', '.join(EXPORT_FORMATS)}")
    if suffix == ".jsonl":
        records = load_records(study_dir)
        text = "".join(json.dumps(r) + "\n" for r in records)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text), force=force)
        return len(records)
    df = dataframe(study_dir)
    if suffix == ".csv":
        atomic_write(path, lambda tmp: df.to_csv(tmp, index=False), force=force)
    else:
        atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False), force=force)
    return len(df)
