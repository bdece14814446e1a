"""One trial, as a Ray worker runs it: train an architecture into its own run directory (or
resume it), then evaluate its best.pt on the test set. Returns what the driver stores; never
touches results.sqlite.

A trial is idempotent over its run directory: a run that finished is only evaluated, one
interrupted mid-way resumes from its last.pt (or restarts from its config if no epoch finished),
so retries and reruns never redo finished epochs.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from scaler.errors import ScalerError

LEFTOVERS = ("model.py", ".lock")
"""Files a run writes before its config.json: safe to clear when no config.json exists."""


@dataclass(frozen=True)
class TrialTask:
    """Everything a worker needs, picklable: no live objects."""

    arch_id: int
    run_dir: str
    config: dict  # TrainConfig fields, spec included
    test_attacks: tuple[str, ...]
    test_n: int | None
    threads: int = 1


def read_history(run: Path) -> list[dict]:
    """metrics.jsonl as a list (a torn last line, from a kill mid-write, is dropped)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def run_trial(task: TrialTask) -> dict:
    """Train (or resume) and test one architecture; see the module docstring."""
    import torch

    import trainers
    from trainers.config import TrainConfig

    t0 = time.time()
    torch.set_num_threads(max(1, task.threads))
    run = Path(task.run_dir)
    cfg = TrainConfig.from_dict(task.config)
    history = read_history(run)
    if not history or history[-1]["epoch"] < cfg.epochs:
        _train_or_resume(trainers, cfg, run)
    results, info = trainers.evaluate(
        run, attacks=list(task.test_attacks), n=task.test_n, seed=cfg.seed, device=cfg.device, progress=False
    )
    device = "cpu"
    if torch.cuda.is_available() and cfg.device != "cpu":
        device = torch.cuda.get_device_name(0)
    return {
        "arch_id": task.arch_id,
        "history": read_history(run),
        "test": results,
        "best_epoch": info["epoch"],
        "device": device,
        "host": socket.gethostname(),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": time.time() - t0,
    }


def _train_or_resume(trainers, cfg, run: Path) -> None:
    if (run / "config.json").is_file():
        try:
            trainers.resume(run, progress=False)
        except ScalerError as exc:
            # last.pt finished every epoch but the kill came before metrics.jsonl got the last line
            if "already finished" not in str(exc):
                raise
        return
    if run.is_dir():
        for name in LEFTOVERS:
            (run / name).unlink(missing_ok=True)
    trainers.train(cfg, run, progress=False)
