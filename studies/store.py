"""The results store: STUDY_DIR/results.sqlite, one row per architecture tried.

The sweep driver is the only writer (workers return their results to it). On a local disk the
database runs in WAL mode, so `scaler results` reads while a sweep writes. WAL is unsafe on network
filesystems (NFS, Lustre, GPFS, CIFS, ...: it needs memory shared by every process that opens the
database, and its readers write too), so a study there keeps a rollback journal instead: only the
driver's host writes the database, readers on any node take the filesystem's read locks
(`filesystem_type` reads /proc/mounts).
`meta` holds the schema version, the space and the training/test settings the study was started
with: a rerun with other settings is refused rather than mixing recipes in one table.

A trial's row is `pending` until it completes (`complete`: history, test metrics, cost) or runs
out of attempts (`failed`: its last error line). Attempts and compute time add up across runs.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from scaler.errors import ScalerError

SCHEMA_VERSION = 1
DB_NAME = "results.sqlite"
MOUNTS = Path("/proc/mounts")
NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "lustre",
        "gpfs",
        "beegfs",
        "ceph",
        "fuse.ceph",
        "fuse.cephfs",
        "glusterfs",
        "fuse.glusterfs",
        "fuse.sshfs",
        "afs",
        "ocfs2",
        "gfs2",
        "panfs",
        "wekafs",
    }
)
"""Filesystems where processes on several hosts open one file: SQLite's WAL mode is unsafe there."""
STATUSES = ("pending", "complete", "failed")
STUDY_ENTRIES = (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", "trials", "errors", ".lock")
"""What a study directory holds; a directory with anything else is not taken for a new study."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS trials (
    arch_id     INTEGER PRIMARY KEY,
    spec        TEXT NOT NULL,              -- ArchSpec JSON
    params      INTEGER NOT NULL,
    flops       INTEGER NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('pending', 'complete', 'failed')),
    attempts    INTEGER NOT NULL DEFAULT 0,
    error       TEXT,
    seconds     REAL NOT NULL DEFAULT 0,    -- wall seconds of every attempt
    gpu_hours   REAL NOT NULL DEFAULT 0,    -- seconds x GPUs per trial, over every attempt
    cpu_hours   REAL NOT NULL DEFAULT 0,
    device      TEXT,                       -- GPU name, or 'cpu'
    host        TEXT,
    finished    TEXT,                       -- ISO time the trial completed
    best_epoch  INTEGER,                    -- 1-based epoch of the evaluated checkpoint
    history     TEXT,                       -- JSON list: the run's metrics.jsonl
    test        TEXT,                       -- JSON: {attack: {accuracy, stable, lip, loss, n}}
    updated     REAL NOT NULL
);
"""


@dataclass
class TrialRow:
    """One row of `trials`, JSON columns decoded."""

    arch_id: int
    spec: dict
    params: int
    flops: int
    status: str
    attempts: int = 0
    error: str | None = None
    seconds: float = 0.0
    gpu_hours: float = 0.0
    cpu_hours: float = 0.0
    device: str | None = None
    host: str | None = None
    finished: str | None = None
    best_epoch: int | None = None
    history: list | None = None
    test: dict | None = None


class Store:
    """results.sqlite of one study. Open with `Store.create` (the sweep) or `Store.open` (readers)."""

    def __init__(self, conn: sqlite3.Connection, path: Path):
        self.conn = conn
        self.path = path

    # ----------------------------------------------------------------- opening
    @classmethod
    def create(cls, study_dir: str | Path) -> Store:
        """Open for writing, creating the directory and the schema when new."""
        study = Path(study_dir)
        if study.exists() and not study.is_dir():
            raise ScalerError(f"--out {study} is a file, not a study directory")
        if study.is_dir() and not (study / DB_NAME).exists():
            foreign = sorted(p.name for p in study.iterdir() if p.name not in STUDY_ENTRIES)
            if foreign:
                raise ScalerError(
                    f"--out {study} holds other files ({', '.join(foreign[:3])}) and no {DB_NAME}: "
                    "give a new or empty directory for the study"
                )
        study.mkdir(parents=True, exist_ok=True)
        path = study / DB_NAME
        conn = _connect(path)
        conn.execute(f"PRAGMA journal_mode={journal_mode(study)}")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise ScalerError(f"{path} has schema version {version}; this scaler reads version {SCHEMA_VERSION}")
        with conn:
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        return cls(conn, path)

    @classmethod
    def open(cls, study_dir: str | Path) -> Store:
        """Open an existing study for reading."""
        study = Path(study_dir)
        path = study / DB_NAME
        if not path.is_file():
            what = "does not exist" if not study.exists() else f"holds no {DB_NAME}"
            raise ScalerError(f"{study} {what}: not a study directory (run `scaler sweep ... --out {study}`)")
        conn = _connect(path)
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            raise ScalerError(f"{path} has schema version {version}; this scaler reads version {SCHEMA_VERSION}")
        return cls(conn, path)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----------------------------------------------------------------- meta
    def meta(self) -> dict:
        return {k: json.loads(v) for k, v in self.conn.execute("SELECT key, value FROM meta")}

    def bind(self, settings: dict, label=None) -> None:
        """Record the study's settings, or refuse ones that differ from those recorded. The message
        names each difference by `label(key, field)` (field None for a setting that is no dict), as
        the user gives it (the sweep: its flags); by default by the settings' own names."""
        known = self.meta()
        differ = sorted(k for k, v in settings.items() if k in known and known[k] != v)
        if differ:
            detail = "; ".join(_difference(k, known[k], settings[k], label or _own_name) for k in differ)
            raise ScalerError(
                f"{self.path.parent} was swept with other settings ({detail}); "
                "rerun with the same ones or choose a new --out"
            )
        with self.conn:
            for k, v in settings.items():
                if k not in known:
                    self.conn.execute("INSERT INTO meta VALUES (?, ?)", (k, json.dumps(v, sort_keys=True)))

    # ----------------------------------------------------------------- trials
    def add(self, arch_id: int, spec: dict, params: int, flops: int) -> TrialRow:
        """The row of `arch_id`, inserted as pending when new; refuses a different spec under that id."""
        return self.add_many([(arch_id, spec, params, flops)])[arch_id]

    def add_many(self, items: list[tuple[int, dict, int, int]]) -> dict[int, TrialRow]:
        """`add` for many (arch_id, spec, params, flops) at once, in one transaction (15,625 rows
        of NARes take a fraction of a second)."""
        known = {r.arch_id: r for r in self.trials()}
        for arch_id, spec, _, _ in items:
            if arch_id in known and known[arch_id].spec != spec:
                raise ScalerError(
                    f"{self.path.parent}: architecture {arch_id} was another network in this study; "
                    "the space changed, choose a new --out"
                )
        new = [
            (arch_id, json.dumps(spec, sort_keys=True), params, flops, "pending", time.time())
            for arch_id, spec, params, flops in items
            if arch_id not in known
        ]
        if new:
            with self.conn:
                self.conn.executemany(
                    "INSERT INTO trials (arch_id, spec, params, flops, status, updated) VALUES (?, ?, ?, ?, ?, ?)", new
                )
            known = {r.arch_id: r for r in self.trials()}
        return {arch_id: known[arch_id] for arch_id, *_ in items}

    def get(self, arch_id: int) -> TrialRow | None:
        cur = self.conn.execute("SELECT * FROM trials WHERE arch_id = ?", (arch_id,))
        rows = _rows(cur)
        return rows[0] if rows else None

    def trials(self, status: str | None = None) -> list[TrialRow]:
        if status is None:
            return _rows(self.conn.execute("SELECT * FROM trials ORDER BY arch_id"))
        return _rows(self.conn.execute("SELECT * FROM trials WHERE status = ? ORDER BY arch_id", (status,)))

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
        out.update(self.conn.execute("SELECT status, COUNT(*) FROM trials GROUP BY status"))
        return out

    def record_attempt(self, arch_id: int, seconds: float, gpus: float, cpus: float) -> None:
        """Count one attempt and its compute, whatever its outcome."""
        with self.conn:
            self.conn.execute(
                "UPDATE trials SET attempts = attempts + 1, seconds = seconds + ?, gpu_hours = gpu_hours + ?, "
                "cpu_hours = cpu_hours + ?, updated = ? WHERE arch_id = ?",
                (seconds, seconds * gpus / 3600, seconds * cpus / 3600, time.time(), arch_id),
            )

    def complete(self, arch_id: int, result: dict) -> None:
        with self.conn:
            self.conn.execute(
                "UPDATE trials SET status = 'complete', error = NULL, device = ?, host = ?, finished = ?, "
                "best_epoch = ?, history = ?, test = ?, updated = ? WHERE arch_id = ?",
                (
                    result["device"],
                    result["host"],
                    result["finished"],
                    result["best_epoch"],
                    json.dumps(result["history"]),
                    json.dumps(result["test"]),
                    time.time(),
                    arch_id,
                ),
            )

    def fail(self, arch_id: int, error: str) -> None:
        with self.conn:
            self.conn.execute(
                "UPDATE trials SET status = 'failed', error = ?, updated = ? WHERE arch_id = ?",
                (error, time.time(), arch_id),
            )

    def reopen(self, arch_id: int) -> None:
        """A failed trial becomes pending again (a rerun gives it a fresh set of retries)."""
        with self.conn:
            self.conn.execute(
                "UPDATE trials SET status = 'pending', updated = ? WHERE arch_id = ?", (time.time(), arch_id)
            )


def journal_mode(study_dir: str | Path) -> str:
    """WAL on a local disk; DELETE (a rollback journal) on a network filesystem, where WAL is unsafe."""
    return "DELETE" if on_network_filesystem(study_dir) else "WAL"


def on_network_filesystem(path: str | Path) -> bool:
    fs = filesystem_type(path)
    return fs is not None and (fs in NETWORK_FILESYSTEMS or fs.startswith("nfs"))


def filesystem_type(path: str | Path) -> str | None:
    """The type of the filesystem `path` (or its nearest existing parent) lives on, from MOUNTS
    (the mount point that holds it longest, the last one mounted there); None where unknown."""
    try:
        lines = MOUNTS.read_text().splitlines()
    except OSError:  # not Linux, or /proc not mounted
        return None
    where = Path(path).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    where = where.resolve()
    best, fs = -1, None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = Path(_unescape(fields[1]))
        if (mount == where or mount in where.parents) and len(mount.parts) >= best:
            best, fs = len(mount.parts), fields[2]
    return fs


def _unescape(field: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash in paths as octal escapes (\\040)."""
    import re

    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _connect(path: Path) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(path, timeout=30)
        conn.execute("PRAGMA foreign_keys=ON")
        return conn
    except sqlite3.DatabaseError as exc:
        raise ScalerError(f"cannot open {path}: {exc}") from None


def _rows(cur: sqlite3.Cursor) -> list[TrialRow]:
    names = [d[0] for d in cur.description]
    out = []
    try:
        for values in cur.fetchall():
            d = dict(zip(names, values))
            d.pop("updated", None)
            for key in ("spec", "history", "test"):
                if d[key] is not None:
                    d[key] = json.loads(d[key])
            out.append(TrialRow(**d))
    except sqlite3.DatabaseError as exc:
        raise ScalerError(f"cannot read the results store: {exc}") from None
    return out


def _difference(key: str, then, now, label) -> str:
    if isinstance(then, dict) and isinstance(now, dict):
        keys = sorted(k for k in set(then) | set(now) if then.get(k) != now.get(k))
        return "; ".join(f"{label(key, k)}: {_short(then.get(k))} then, {_short(now.get(k))} now" for k in keys)
    return f"{label(key, None)}: {_short(then)} then, {_short(now)} now"


def _own_name(key: str, field: str | None) -> str:
    return key if field is None else field


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."
