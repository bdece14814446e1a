"""The sweep driver: one Ray task per architecture, results into results.sqlite.

    sweep(space, "study", config, SweepOptions(test_attacks=("clean", "pgd20")))

Ray: an already initialised Ray is used as it is; else `address` connects to a running cluster
(`ray start --head` ...); else an embedded local Ray is started on this machine's CPUs/GPUs and
shut down at the end. Each trial declares its CPUs and GPUs, so Ray runs as many at once as the
cluster holds (capped by `max_concurrent`).

Guarantees: the driver is the only writer of the store and holds STUDY_DIR/.lock (so a trial
directory's own lock is stale whenever the driver submits it, and is cleared); complete trials are
skipped; a failing attempt (exception, NaN, dead worker or node) is retried up to `retries` times,
resuming from the trial's last.pt, then recorded as failed with its one-line error while the sweep
goes on; Ctrl-C cancels the running trials (their last.pt stays) and the next run picks up there,
and so does SIGTERM inside `stop_on_sigterm()` (Ray's own SIGTERM handler does not replace it).
Bad settings, the dataset's included (`trainers.run.check_data`, as `scaler train` checks them),
are refused before the study directory is written or Ray started.
"""

from __future__ import annotations

import math
import os
import re
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from scaler.errors import ScalerError
from studies.spaces import Space
from studies.store import Store
from studies.trial import TrialTask, run_trial

TRIALS_DIR = "trials"
ERRORS_DIR = "errors"
VOLATILE_CONFIG = ("device", "compile", "fused", "data_dir", "channels_last", "extra", "model", "spec")
"""TrainConfig fields a rerun may change without changing results (or that vary per trial)."""
DEFAULT_TEST_ATTACKS = ("clean", "fgsm", "pgd20", "cw40")
DEFAULT_CLASSES = 10
"""Spaces cost networks for 10 classes unless they say otherwise; trials train the data's classes."""


@dataclass
class SweepOptions:
    test_attacks: tuple[str, ...] = DEFAULT_TEST_ATTACKS
    test_n: int | None = None
    address: str | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None  # None: 1 on a cluster with GPUs (unless --device cpu), else 0
    max_concurrent: int | None = None  # None: as many as the cluster's resources hold
    retries: int = 2
    progress: bool = True

    def validate(self) -> None:
        from trainers.evaluation import ATTACKS

        for a in self.test_attacks:
            if a not in ATTACKS:
                raise ScalerError(f"unknown test attack {a!r}; choose from {','.join(ATTACKS)}")
        if not self.test_attacks:
            raise ScalerError("--test-attacks is empty")
        if self.test_n is not None and self.test_n < 1:
            raise ScalerError("--test-n must be >= 1")
        if not (1e-4 <= self.cpus_per_trial < math.inf):
            raise ScalerError("--cpus-per-trial must be a number >= 0.0001 (Ray's resolution)")
        gpus = self.gpus_per_trial
        if gpus is not None and not (0 <= gpus < math.inf):
            raise ScalerError("--gpus-per-trial must be a number >= 0")
        if gpus is not None and (0 < gpus < 1e-4 or (gpus > 1 and gpus != int(gpus))):
            raise ScalerError("--gpus-per-trial takes a fraction of a GPU from 0.0001 to 1, or whole GPUs (Ray's rule)")
        if self.max_concurrent is not None and self.max_concurrent < 1:
            raise ScalerError("--max-concurrent must be >= 1")
        if self.retries < 0:
            raise ScalerError("--retries must be >= 0")


@dataclass
class SweepSummary:
    study: str
    trials: int  # in this sweep's selection
    skipped: int  # complete before this run
    complete: int  # completed by this run
    failed: int  # recorded as failed by this run
    pending: int  # left to do (interrupted)
    seconds: float
    errors: dict[int, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def study_settings(space: Space, config: dict, options: SweepOptions) -> dict:
    """What a study is bound to: a rerun with other values is refused (see `Store.bind`)."""
    return {
        "space": space.name,
        "space_fingerprint": space.fingerprint(),
        "train": {k: v for k, v in config.items() if k not in VOLATILE_CONFIG},
        "test": {"attacks": list(options.test_attacks), "n": options.test_n},
    }


def setting_name(key: str, field: str | None) -> str:
    """A study setting (see `study_settings`) as the user gives it, for the message refusing a
    rerun with other settings: `--test-n`, not `n`."""
    if key == "space":
        return "SPACE"
    if key == "space_fingerprint":
        return "SPACE's architectures"
    if key == "test":
        return {"attacks": "--test-attacks", "n": "--test-n"}.get(field, f"test {field}")
    if key == "train" and field is not None:
        from dataclasses import fields

        from trainers.config import TrainConfig

        if not any(f.name == field and "help" in f.metadata for f in fields(TrainConfig)):  # no flag sets it
            return f"{field} (set by --recipe)"
        flag = f"--{field.replace('_', '-')}"
        return f"{flag} (fractions of --epochs)" if field == "milestones" else flag
    return key if field is None else f"{key} {field}"


def trial_config(config: dict, spec: dict, arch_id: int) -> dict:
    return {**config, "model": f"arch-{arch_id}", "spec": spec}


def sweep(
    space: Space,
    study_dir: str | Path,
    config,
    options: SweepOptions | None = None,
    *,
    arch_ids: list[int] | None = None,
    announce=None,
) -> SweepSummary:
    """Run every architecture of `space` (or those in `arch_ids`) not yet complete in `study_dir`
    with TrainConfig `config`; `announce(line)` hears what starts. See the module docstring."""
    from trainers.checkpoint import RunLock
    from trainers.data import NUM_CLASSES

    options = options or SweepOptions()
    preflight(config, options)
    t0 = time.time()
    study = Path(study_dir).resolve()
    archs = list(space.archs) if arch_ids is None else [space.by_id(i) for i in arch_ids]
    classes = NUM_CLASSES.get(config.dataset, 10)
    odd = {a.spec.num_classes for a in archs} - {classes, DEFAULT_CLASSES}
    if odd:  # a space costed for other classes than the data has: its records would lie
        raise ScalerError(
            f"the space sets num_classes {sorted(odd)[0]} but --dataset {config.dataset} has {classes} classes"
        )
    cfg = json_config(config)
    store = Store.create(study)
    lock = RunLock(study)
    try:
        lock.acquire()
        store.bind(study_settings(space, cfg, options), label=setting_name)
        items = []
        for a in archs:
            spec = {**a.spec.to_dict(), "num_classes": classes, "name": None}
            items.append((a.arch_id, spec, *_cost(spec)))
        rows = store.add_many(items)
        todo, skipped = [], 0
        for a, (_, spec, _, _) in zip(archs, items):
            row = rows[a.arch_id]
            if row.status == "complete":
                skipped += 1
                continue
            if row.status == "failed":
                store.reopen(a.arch_id)
            run_dir = str(study / TRIALS_DIR / str(a.arch_id))
            threads = max(1, math.ceil(options.cpus_per_trial))
            task_cfg = trial_config(cfg, spec, a.arch_id)
            todo.append(TrialTask(a.arch_id, run_dir, task_cfg, tuple(options.test_attacks), options.test_n, threads))
        summary = SweepSummary(str(study), len(archs), skipped, 0, 0, len(todo), 0.0)
        if todo:
            with _ray_session(options.address, announce) as ray:
                _drive(ray, todo, store, options, config.device, summary, announce)
        summary.seconds = time.time() - t0
        return summary
    finally:
        lock.release()
        store.close()


def preflight(config, options: SweepOptions) -> None:
    """Refuse bad settings before anything is written or Ray started: the options, the training
    config and its data (what `scaler train` checks: dataset, --data-dir, --val), the cluster address."""
    from trainers.run import check_data

    options.validate()
    config.validate()
    check_data(config, local=not options.address)  # else every trial would fail on it, `retries` times each
    # (on a cluster the trials read --data-dir on their nodes: only what holds everywhere is checked here)
    if options.address:
        check_reachable(options.address)


def json_config(config) -> dict:
    import json

    return json.loads(config.to_json())


def _cost(spec: dict) -> tuple[int, int]:
    from scaler.spec import ArchSpec
    from studies.spaces import cost_of

    return cost_of(ArchSpec.from_dict(spec))


# --------------------------------------------------------------------------- Ray
class _ray_session:
    """Use a running Ray, connect to `address`, or start an embedded one; shut down what we started."""

    def __init__(self, address: str | None, announce):
        self.address, self.announce, self.started = address, announce, False

    def __enter__(self):
        import logging

        import ray

        if ray.is_initialized():
            return ray
        env = {"env_vars": {"PYTHONPATH": _worker_pythonpath()}}
        kwargs = dict(runtime_env=env, log_to_driver=False, logging_level=logging.WARNING, configure_logging=True)
        caller = _callers_sigterm_handler()
        try:
            if self.address:
                ray.init(address=self.address, **kwargs)
            else:
                ray.init(include_dashboard=False, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"the Ray cluster at {self.address}" if self.address else "a local Ray"
            raise ScalerError(f"cannot start {where}: {' '.join(str(exc).split())[:300]}") from None
        finally:
            if caller is not None:  # ray.init installs its own SIGTERM handlers (Python's and C++'s): undo
                signal.signal(signal.SIGTERM, caller)
        self.started = True
        if self.announce:
            res = ray.cluster_resources()
            self.announce(
                f"ray: {'cluster ' + self.address if self.address else 'local'} with "
                f"{res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs"
            )
        return ray

    def __exit__(self, *exc):
        if self.started:
            import ray

            ray.shutdown()


def _callers_sigterm_handler():
    """The SIGTERM handler the caller set (e.g. `stop_on_sigterm`), or None where it left the default."""
    if threading.current_thread() is not threading.main_thread():
        return None  # signal.signal works on the main thread only
    handler = signal.getsignal(signal.SIGTERM)
    return None if handler in (None, signal.SIG_DFL) else handler


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse an address nothing listens on in seconds (Ray itself retries for minutes)."""
    import socket

    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return  # 'auto', ray:// client addresses: Ray resolves and reports those itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ScalerError(
            f"cannot reach a Ray cluster at {address} ({exc.strerror or exc}); "
            "start one with `ray start --head --port=6379` there, or leave out --address for a local Ray"
        ) from None


def _worker_pythonpath() -> str:
    """Workers import `studies` from where this driver did (editable checkouts, PYTHONPATH), so a
    source tree works as well as an installed package."""
    root = str(Path(__file__).resolve().parent.parent)
    parts = [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    return os.pathsep.join(parts)


def _resources(ray, options: SweepOptions, device: str) -> tuple[float, float, int]:
    """(cpus, gpus) per trial and how many trials run at once; refuses what the cluster cannot hold."""
    total = ray.cluster_resources()
    cpus, gpus_total = total.get("CPU", 0.0), total.get("GPU", 0.0)
    gpus = options.gpus_per_trial
    if gpus is None:
        gpus = 1.0 if gpus_total >= 1 and device != "cpu" else 0.0
    if gpus > 0 and device == "cpu":
        raise ScalerError("--gpus-per-trial with --device cpu: drop one of them")
    if gpus > gpus_total:
        raise ScalerError(f"--gpus-per-trial {gpus:g} but the Ray cluster has {gpus_total:g} GPUs")
    if options.cpus_per_trial > cpus:
        raise ScalerError(f"--cpus-per-trial {options.cpus_per_trial:g} but the Ray cluster has {cpus:g} CPUs")
    fit = _how_many(cpus, options.cpus_per_trial)
    if gpus > 0:
        fit = min(fit, _how_many(gpus_total, gpus))
    if options.max_concurrent is not None:
        fit = min(fit, options.max_concurrent)
    return options.cpus_per_trial, gpus, max(1, fit)


def _how_many(total: float, each: float) -> int:
    """Trials of `each` that fit in `total` (1 // 0.2 is 4.0 in floats: 5 fit)."""
    return int(total / each + 1e-9)


def error_line(exc: BaseException) -> str:
    """One line for the store: the trial's own exception, not Ray's wrapping of it."""
    import ray.exceptions as rex

    if isinstance(exc, rex.RayTaskError):
        cause = getattr(exc, "cause", None)
        if cause is not None and not isinstance(cause, rex.RayTaskError):
            exc = cause
        else:
            text = str(exc).strip().splitlines()
            return " ".join((text[-1] if text else type(exc).__name__).split())[:500]
    if isinstance(exc, rex.WorkerCrashedError):
        return "the worker died (killed, or out of memory)"
    lost = tuple(getattr(rex, n) for n in ("NodeDiedError", "ObjectLostError", "OwnerDiedError") if hasattr(rex, n))
    if isinstance(exc, lost):
        return f"the node running the trial was lost: {type(exc).__name__}"
    if isinstance(exc, ScalerError):
        return " ".join(str(exc).split())[:500]
    first = (str(exc).strip().splitlines() or [""])[0]
    return " ".join(f"{type(exc).__name__}: {first}".split())[:500]


def _drive(ray, todo: list[TrialTask], store: Store, options, device: str, summary: SweepSummary, announce) -> None:
    cpus, gpus, fit = _resources(ray, options, device)
    if announce:
        announce(f"sweep: {len(todo)} trials, {cpus:g} CPUs and {gpus:g} GPUs each, up to {fit} at once")
    _Driver(ray, store, options, summary, announce, cpus, gpus, fit).run(todo)


class _Driver:
    """The submit / wait / record loop; one method per event."""

    def __init__(self, ray, store, options, summary, announce, cpus, gpus, fit):
        self.ray, self.store, self.options, self.summary, self.announce = ray, store, options, summary, announce
        self.cpus, self.gpus, self.fit = cpus, gpus, fit
        self.remote = ray.remote(run_trial).options(num_cpus=cpus, num_gpus=gpus, max_retries=0, retry_exceptions=False)
        self.running: dict = {}  # ref -> (task, submitted at)
        self.tries: dict[int, int] = {}
        self.bar = None

    def run(self, todo: list[TrialTask]) -> None:
        queue = list(reversed(todo))  # pop() from the end: arch id order
        self.bar = _bar(self.options.progress, len(todo))
        try:
            while queue or self.running:
                while queue and len(self.running) < self.fit:
                    self.submit(queue.pop())
                done, _ = self.ray.wait(list(self.running), num_returns=1, timeout=1.0)
                for ref in done:
                    task, started = self.running.pop(ref)
                    try:
                        result = self.ray.get(ref)
                    except (KeyboardInterrupt, SystemExit):
                        raise
                    except BaseException as exc:  # noqa: BLE001 - every trial failure is recorded, not raised
                        if self.failed(task, started, exc):
                            queue.append(task)
                        continue
                    self.completed(task, result)
                if self.bar is not None:
                    s = self.summary
                    self.bar.set_postfix_str(f"done {s.complete} running {len(self.running)} failed {s.failed}")
        except KeyboardInterrupt:
            for ref in self.running:
                self.ray.cancel(ref, force=True)
            raise KeyboardInterrupt(
                f"stopped: {self.summary.complete} trials completed, {self.summary.pending} left "
                "(their last.pt kept); run the same command to continue"
            ) from None
        finally:
            if self.bar is not None:
                self.bar.close()

    def submit(self, task: TrialTask) -> None:
        Path(task.run_dir, ".lock").unlink(missing_ok=True)  # stale: we hold the study lock
        self.running[self.remote.remote(task)] = (task, time.time())

    def completed(self, task: TrialTask, result: dict) -> None:
        self.store.record_attempt(task.arch_id, result["seconds"], self.gpus, self.cpus)
        self.store.complete(task.arch_id, result)
        self.summary.complete += 1
        self.summary.pending -= 1
        if self.bar is not None:
            self.bar.update(1)

    def failed(self, task: TrialTask, started: float, exc: BaseException) -> bool:
        """Record a failed attempt; True if the trial gets another one."""
        self.store.record_attempt(task.arch_id, time.time() - started, self.gpus, self.cpus)
        attempt = self.tries[task.arch_id] = self.tries.get(task.arch_id, 0) + 1
        line = error_line(exc)
        _keep_traceback(task, attempt, exc)
        if attempt <= self.options.retries:
            self.say(f"trial {task.arch_id} attempt {attempt} failed, retrying: {line}")
            return True
        self.store.fail(task.arch_id, line)
        self.summary.failed += 1
        self.summary.pending -= 1
        self.summary.errors[task.arch_id] = line
        if self.bar is not None:
            self.bar.update(1)
        self.say(f"trial {task.arch_id} failed after {attempt} attempts: {line}")
        return False

    def say(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        elif self.announce:
            self.announce(line)


def _keep_traceback(task: TrialTask, attempt: int, exc: BaseException) -> None:
    """The whole story of a failed attempt (Ray's remote traceback) in STUDY/errors/<arch-id>.log,
    since the store keeps one line."""
    run = Path(task.run_dir)
    logs = run.parent.parent / ERRORS_DIR  # outside the run directory, which a fresh start needs empty
    try:
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / f"{task.arch_id}.log", "a") as fh:
            text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # Ray colours its tracebacks
            fh.write(f"--- attempt {attempt} failed at {time.strftime('%Y-%m-%d %H:%M:%S')}\n{text}\n")
    except OSError:
        pass  # the error line still reaches the store


def _bar(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="trial", desc="sweep", file=sys.stderr, dynamic_ncols=True)
