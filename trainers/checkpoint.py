"""The run directory and its checkpoint format: one `save`/`restore` pair for train, eval, resume.

    model.py        the model source (emitted from the templates, or the user's file)
    config.json     everything needed to reproduce the run
    metrics.jsonl   one object per epoch
    last.pt         written after every epoch; resuming continues from it bit-identically
    best.pt         best validation robustness (copy of a last.pt)
    epoch_N.pt      for each N in `save_epochs`
    .lock           held by the process that owns the run (see `RunLock`)

A checkpoint is a dict: version, model (state dict), optimizer, epoch, iteration, best, rng, war,
ema, lr and the model source, so one file is enough to rebuild and evaluate the model.

This module owns a run directory, writing and reading: `find_checkpoint` (best.pt, else last.pt,
or a file), `model_source` (one rule: the source the checkpoint carries, which its weights were
trained with, else the directory's model.py), `run_spec`, `load_weights` and `load_trained`.

An imported run (`scaler import`, trainers/interop.py) holds model.py, config.json (its
`extra.imported` says from where) and a best.pt with version, model, epoch 0, iteration 0, source
and `imported`: it evaluates and seeds fine-tuning (`--init-from`), it does not resume.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
from pathlib import Path

import torch

from scaler.builder import build_from_source
from scaler.codegen import embedded_spec
from scaler.errors import ScalerError
from scaler.fileio import atomic_write, write_text_atomic
from scaler.spec import ArchSpec
from trainers.data import NUM_CLASSES

CHECKPOINT_VERSION = 1
LOCK_NAME = ".lock"


def save(state: dict, path: Path) -> None:
    """Write a checkpoint atomically: a crash, a full disk or a refused write leaves the previous
    file, and the error is one line."""
    atomic_write(path, lambda tmp: _torch_save(state, tmp))


def _torch_save(state: dict, tmp: str) -> None:
    """torch.save as a file write: its writer reports a failed write (a full disk) as a many-line
    RuntimeError ("unexpected pos ..."); that becomes the OSError it stands for."""
    try:
        torch.save(state, tmp)
    except RuntimeError as exc:
        if shutil.disk_usage(Path(tmp).parent).free < max(Path(tmp).stat().st_size, 1 << 20):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None
        raise OSError(errno.EIO, f"torch.save failed: {first_sentence(exc)}") from None


def copy(src: Path, dst: Path) -> None:
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def restore(path: Path) -> dict:
    """A checkpoint read with weights_only=True; one-line errors for unreadable files."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's messages run to many lines: keep the first
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if unsafe:
            raise ScalerError(
                f"{path} holds a Python object ({unsafe.group(1)}) that weights_only=True will not unpickle; "
                "if you trust the file, re-save its state dict alone (torch.save(sd, 'clean.pt')) and use that"
            ) from None
        raise ScalerError(
            f"cannot read checkpoint {path} (not a torch checkpoint, or truncated?): "
            f"{type(exc).__name__}: {first_sentence(exc)}"
        ) from None
    return ckpt


def first_sentence(exc: BaseException) -> str:
    """The first sentence of an error's first line, whole: torch's load errors go on for lines, and
    their later sentences advise loading with weights_only=False, which a user should not do with
    a file they do not trust."""
    line = (str(exc).strip().splitlines() or [""])[0]
    return line.split(". ")[0].rstrip(".") or type(exc).__name__


def restore_model_state(path: Path) -> dict:
    """A scaler checkpoint's dict, refusing files that are not one."""
    ckpt = restore(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ScalerError(f"{path} is not a scaler checkpoint (no 'model' entry)")
    return ckpt


def last_epoch(out: Path) -> int | None:
    """The epoch a run directory's last.pt holds (None without a readable one): memory-mapped, so
    that only its small entries are read."""
    try:
        ckpt = torch.load(Path(out) / "last.pt", map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # missing, truncated or not a checkpoint: no answer
        return None
    epoch = ckpt.get("epoch") if isinstance(ckpt, dict) else None
    return epoch if isinstance(epoch, int) else None


def write_text(path: Path, text: str) -> None:
    write_text_atomic(path, text)


def append_metrics(out: Path, record: dict) -> None:
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")


def read_config(out: Path) -> dict:
    path = out / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ScalerError(f"{out} is not a run directory ({path} is missing)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ScalerError(f"cannot read {path}: {exc}") from None


def is_started(out: Path) -> bool:
    """A run directory that holds a run's config but no checkpoint yet (stopped before epoch 1)."""
    return (out / "config.json").is_file() and not (out / "last.pt").is_file()


class RunLock:
    """Exclusive ownership of a run directory: a second run or resume is refused while a live
    process holds it; a lock left by a crashed process (dead pid on this host) is taken over."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_NAME
        self.held = False

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self.check()  # a live owner: refused
                self.path.unlink(missing_ok=True)  # stale: its owner died
                continue
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self.held = True
            return
        raise ScalerError(f"cannot lock {self.path.parent}: another process keeps taking it")

    def check(self) -> None:
        """Refuse (without taking the lock) a directory a live process owns; a missing, unreadable
        or stale lock passes."""
        owner = self._owner()
        if owner is not None and self._alive(owner):
            raise ScalerError(
                f"{self.path.parent} is in use by process {owner.get('pid')} on {owner.get('host')}; "
                f"wait for it to finish (or remove {self.path} if that process is gone)"
            ) from None  # one line even when raised while handling the lock file's FileExistsError

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # half-written or unreadable: treated as stale

    @staticmethod
    def _alive(owner: dict) -> bool:
        if owner.get("host") != socket.gethostname():
            return True  # another machine's process: cannot check, assume alive
        pid = owner.get("pid")
        if not isinstance(pid, int) or pid <= 0:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


# --------------------------------------------------------------------------- reading a run
def find_checkpoint(target: str | Path) -> Path:
    """best.pt of a run directory (last.pt while it has none), or the checkpoint file given."""
    path = Path(target)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise ScalerError(f"{path} holds no checkpoint yet (no best.pt or last.pt)")
    if not path.is_file():
        raise ScalerError(f"no checkpoint at {path} (expected a run directory with best.pt, or a .pt file)")
    return path


def model_source(ckpt: dict, run_dir: Path) -> str | None:
    """The model source of a checkpoint: the one it carries (its weights were trained with it),
    else its run directory's model.py; None where neither is there."""
    if ckpt.get("source"):
        return ckpt["source"]
    path = Path(run_dir) / "model.py"
    return path.read_text() if path.is_file() else None


def run_config(run_dir: Path) -> dict:
    """A run directory's config.json as a dict; {} where there is none (a bare checkpoint)."""
    return read_config(Path(run_dir)) if (Path(run_dir) / "config.json").is_file() else {}


def run_spec(run_dir: Path, source: str) -> ArchSpec | None:
    """The spec of a run's model: the one its source records, else its config's."""
    spec = embedded_spec(source)
    if spec is None:
        data = run_config(run_dir).get("spec")
        spec = ArchSpec.from_dict(data) if data else None
    return spec


def run_model(target: str | Path) -> tuple[str, dict | None]:
    """(model source, spec dict or None) of a run directory or checkpoint (`model_source`'s rule;
    the checkpoint is memory-mapped, its weights not read)."""
    path = find_checkpoint(target)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        ckpt = restore_model_state(path)  # its one-line error
    source = model_source(ckpt if isinstance(ckpt, dict) else {}, path.parent)
    if source is None:
        raise ScalerError(f"{path} carries no model source and {path.parent / 'model.py'} is missing")
    spec = run_spec(path.parent, source)
    return source, spec.to_dict() if spec is not None else None


def load_weights(model: torch.nn.Module, target: str | Path) -> Path:
    """Load the weights of a run directory (best.pt, else last.pt) or checkpoint strictly into
    `model`: `scaler train --init-from` fine-tunes from them."""
    path = find_checkpoint(target)
    ckpt = restore_model_state(path)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:240]
        raise ScalerError(f"--init-from {path} does not fit the model to train: {first}") from None
    return path


def load_trained(target: str | Path, device="cpu"):
    """(model in eval mode, run config dict, checkpoint info) from a run directory or checkpoint."""
    ckpt_path = find_checkpoint(target)
    ckpt = restore_model_state(ckpt_path)
    run_dir = ckpt_path.parent
    config = run_config(run_dir)
    source = model_source(ckpt, run_dir)
    if source is None:
        raise ScalerError(f"{ckpt_path} carries no model source and {run_dir / 'model.py'} is missing")
    weights = ckpt["model"]
    fc = weights.get("fc.weight")
    classes = fc.shape[0] if fc is not None else NUM_CLASSES.get(config.get("dataset", "cifar10"), 10)
    model = build_from_source(source, classes, str(run_dir / "model.py"))
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:240]
        raise ScalerError(f"{ckpt_path} does not fit its model: {first}") from None
    imported = ckpt.get("imported")
    epochs = None if imported else config.get("epochs")
    # unfinished: the run's last.pt (not the evaluated checkpoint: best.pt is usually an earlier epoch)
    trained = last_epoch(run_dir) if ckpt_path.name != "last.pt" else ckpt.get("epoch")
    info = {
        "checkpoint": str(ckpt_path),
        "epoch": ckpt.get("epoch"),
        "epochs": epochs,
        "unfinished": bool(epochs and trained is not None and trained < epochs),
    }
    if imported:
        info["imported"] = imported
    return model.to(device).eval(), config, info
