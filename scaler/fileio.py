"""Atomic file writes: a temp file in the target's directory, then one rename. A reader (or a
crash) sees the old file or the new one, never half of one. The one helper every writer uses."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from scaler.errors import ScalerError


def atomic_write(path: str | Path, write: Callable[[str], None], *, force: bool = True, parents: bool = False) -> Path:
    """Call `write(tmp_path)` then move the result onto `path`. Refuses an existing file unless
    `force`, a directory always, and a missing parent unless `parents`."""
    path = Path(path)
    if path.is_dir():
        raise ScalerError(f"{path} is a directory; give a file path")
    if path.exists() and not force:
        raise ScalerError(f"{path} exists; pass --force to overwrite it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        if parent.exists():
            raise ScalerError(f"{parent} is not a directory")
        if not parents:
            raise ScalerError(f"directory {parent} does not exist; create it or pass --parents")
        parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    except OSError as exc:  # a read-only or full directory: name the target, not a temporary file
        raise ScalerError(f"cannot write {path}: {exc.strerror or exc}") from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if not isinstance(exc, OSError):
            raise
        reason = exc.strerror or str(exc)
        kept = "; the previous file is kept" if path.exists() else ""
        raise ScalerError(f"cannot write {path}: {reason}{kept}") from None
    return path


def write_text_atomic(path: str | Path, text: str, *, force: bool = True, parents: bool = False) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), force=force, parents=parents)
