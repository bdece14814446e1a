"""A training run: `train(cfg, out_dir)` starts one, `resume(out_dir)` continues one.

Setup happens here (config, device, model, data, optimizer, DDP/compile wrapping, the run-directory
lock); the epochs run in `loop.run_epochs`; the directory's format is `checkpoint`'s. Bad input is
refused before anything is written, and an interrupted run says how to continue.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from scaler.builder import build_from_source
from scaler.errors import Interrupted, ScalerError
from trainers import checkpoint, war_calibration
from trainers.compiled import compile_model
from trainers.config import TrainConfig
from trainers.data import NUM_CLASSES, check_split, holdout, load_cifar101, load_split
from trainers.distributed import barrier, dist_info, init_distributed
from trainers.evaluation import EvaluationStopped
from trainers.fused import fused_blocks, resolve_fused
from trainers.loop import RunState, run_epochs
from trainers.losses import WarLambda
from trainers.schedule import steps_per_epoch
from trainers.step import (
    Ema,
    Stepper,
    make_optimizer,
    resolve_compile,
    resolve_device,
    resolve_precision,
    training_layout,
)


def train(
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    progress: bool = True,
    stop_after: int | None = None,
    distributed: bool = False,
) -> dict:
    """Train `cfg` into a new (or empty) run directory; returns the last epoch's metrics.
    `stop_after` ends after that epoch, resumably."""
    return _run(cfg, Path(out_dir), resuming=False, progress=progress, stop_after=stop_after, distributed=distributed)


def resume(
    out_dir: str | Path,
    *,
    epochs: int | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    distributed: bool = False,
) -> dict:
    """Continue a run from its last.pt with its own config (`epochs` may extend it). A run stopped
    before its first checkpoint starts again from its saved config."""
    out = Path(out_dir)
    if not (out / "config.json").is_file():
        raise ScalerError(f"nothing to resume: {out} holds no run (no config.json)")
    config = checkpoint.read_config(out)
    if (config.get("extra") or {}).get("imported"):
        raise ScalerError(
            f"{out} holds an imported checkpoint, not a run: fine-tune it with --init-from {out} --out NEW"
        )
    cfg = TrainConfig.from_dict(config)
    if epochs is not None:
        if epochs < 1:
            raise ScalerError("--epochs must be >= 1")
        cfg.epochs = epochs
    return _run(
        cfg,
        out,
        resuming=True,
        progress=progress,
        stop_after=stop_after,
        distributed=distributed,
        extended=epochs is not None,
    )


def model_source(cfg: TrainConfig) -> str:
    """Source of the model to train: emitted from the spec, or the user's file as it is."""
    if cfg.spec is not None:
        from scaler.codegen import Provenance, render
        from scaler.spec import ArchSpec

        return render(ArchSpec.from_dict(cfg.spec), Provenance(rule=f"train {cfg.model}"))
    path = Path(cfg.model)
    if not path.is_file():
        raise ScalerError(f"model file {path} not found")
    return path.read_text()


def check_data(cfg: TrainConfig, *, local: bool = True) -> None:
    """Refuse dataset settings `load_data` would refuse for want of the data (unknown dataset or
    validation set, missing --data-dir or dataset files) without reading it; `local=False` leaves
    out what only another machine's files could settle (`check_split`)."""
    if cfg.val not in ("holdout", "cifar10.1"):
        raise ScalerError(f"unknown validation set {cfg.val!r}; use holdout or cifar10.1")
    check_split(cfg.dataset, "train", cfg.data_dir, local=local)
    if cfg.val == "cifar10.1":
        if cfg.dataset != "cifar10":
            raise ScalerError("CIFAR-10.1 validation applies to --dataset cifar10")
        check_split("cifar10.1", "test", cfg.data_dir, local=local)


def load_data(cfg: TrainConfig, device):
    """((x_train, y_train), (x_val, y_val)) on `device`."""
    check_data(cfg)
    x, y = load_split(cfg.dataset, "train", cfg.data_dir)
    if cfg.val == "cifar10.1":
        xv, yv = load_cifar101(cfg.data_dir)
        train_xy = (x, y)
    else:
        n_val = cfg.val_size or (1000 if len(y) > 20000 else max(1, len(y) // 10))
        train_xy, (xv, yv) = holdout(x, y, n_val, seed=cfg.seed)
    xv, yv = xv[: cfg.val_n], yv[: cfg.val_n]
    return (train_xy[0].to(device), train_xy[1].to(device)), (xv.to(device), yv.to(device))


def _check_new_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ScalerError(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(p.name != checkpoint.LOCK_NAME for p in out.iterdir()):
        hint = (
            "it holds a run stopped before its first checkpoint: pass --resume to start it again"
            if checkpoint.is_started(out)
            else "pass --resume or choose another --out"
        )
        raise ScalerError(f"run directory {out} is not empty; {hint}")


def _run(cfg, out: Path, *, resuming: bool, progress, stop_after, distributed, extended=False) -> dict:
    cfg.validate()
    if stop_after is not None and stop_after < 0:
        raise ScalerError("--stop-after must be >= 0")
    if distributed:
        init_distributed(cfg.device)
    rank, world = dist_info()
    # an explicit --compile (None is auto) is refused before the run directory exists
    device = resolve_device(cfg.device, compile=bool(cfg.compile))
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    if cfg.batch_size % world:
        raise ScalerError(f"--batch-size {cfg.batch_size} must divide evenly across {world} processes")
    has_ckpt = resuming and (out / "last.pt").is_file()
    lock = checkpoint.RunLock(out)
    if not resuming:
        lock.check()  # a directory a live run owns is named as such, whatever it holds
        _check_new_dir(out)
    # Refuse bad input before the run directory exists: a refused run creates nothing.
    check_data(cfg)
    source = None if resuming else model_source(cfg)
    if not resuming:
        barrier(world)  # every rank checks before rank 0 writes anything

    created = _missing_dirs(out) if rank == 0 else []
    try:
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        try:
            if not resuming:
                _check_new_dir(out)  # again, now that we own it: a concurrent run may have filled it
                if cfg.war_calibrate and cfg.war_zeta is None:
                    lock.release()  # the calibration run locks its own sub-directory
                    cfg.war_zeta = _calibrate_war(cfg, out, device, progress)
                    lock.acquire()
            if resuming:
                source = (out / "model.py").read_text()
            return _train_in(cfg, out, source, has_ckpt, resuming, extended, rank, world, device, progress, stop_after)
        finally:
            lock.release()
    except BaseException:
        # Refused once the data or model could only be opened (a corrupt file, a model file that
        # fails to build): remove the directories this call created, if nothing was written there.
        _remove_empty(created)
        raise


def _calibrate_war(cfg: TrainConfig, out: Path, device, progress: bool) -> float:
    """WAR's zeta: train a half-width copy inside OUT/war-calibration, measure its loss ratio."""
    thin = war_calibration.thin_config(cfg)
    cal_dir = out / "war-calibration"
    train(thin, cal_dir, progress=progress)
    return war_calibration.measure_ratio(thin, cal_dir, load_data(thin, device)[0], device)


def _missing_dirs(out: Path) -> list[Path]:
    """`out` and those of its parents that do not exist yet, deepest first."""
    missing = []
    for path in (out, *out.parents):
        if path.exists() or path.is_symlink():
            break
        missing.append(path)
    return missing


def _remove_empty(created: list[Path]) -> None:
    """rmdir (never anything else) the directories in `created`, deepest first, while they are empty."""
    for path in created:
        try:
            path.rmdir()
        except OSError:  # not empty (the run wrote something), or gone: keep the rest
            return


def _train_in(cfg, out, source, has_ckpt, resuming, extended, rank, world, device, progress, stop_after) -> dict:
    # Build the model and load the data before writing anything: bad input leaves no run behind.
    torch.manual_seed(cfg.seed)
    label = cfg.model if (cfg.spec is None and not resuming) else str(out / "model.py")  # where errors point
    model = build_from_source(source, NUM_CLASSES.get(cfg.dataset, 10), label).to(device)
    if cfg.init_from is not None and not has_ckpt:  # fine-tuning: start from those weights
        checkpoint.load_weights(model, cfg.init_from)
    cfg.channels_last = training_layout(model, device, cfg.channels_last)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_data, val_data = load_data(cfg, device)
    total_steps = steps_per_epoch(len(train_data[1]), cfg) * cfg.epochs
    auto = cfg.compile is None
    cfg.compile = resolve_compile(cfg.compile, model, device, total_steps)  # config.json keeps the decision
    if auto and cfg.compile and progress and rank == 0:
        print(f"note: torch.compile on ({total_steps} steps; it measured faster for this model here)", file=sys.stderr)
    state = RunState(
        model=model,
        optimizer=make_optimizer(model, cfg),
        data_gen=torch.Generator(device=device).manual_seed(cfg.seed),
        attack_gen=torch.Generator(device=device).manual_seed(cfg.seed + 1 + rank),
        war=WarLambda(cfg.war_zeta, cfg.war_alpha, device) if cfg.war_zeta is not None else None,
        ema=Ema(model, cfg.ema) if cfg.ema > 0 else None,
    )
    if has_ckpt:
        state.load(checkpoint.restore_model_state(out / "last.pt"), rank, device)
        if state.epoch >= cfg.epochs:
            raise ScalerError(f"{out} already finished {state.epoch} epochs; raise --epochs to continue")
    # Written once everything above succeeded: a refused resume (a truncated last.pt) changes nothing.
    if rank == 0 and not resuming:
        checkpoint.write_text(out / "model.py", source)
        cfg.extra = {**cfg.extra, "scaler_version": _version(), "torch": torch.__version__, "world_size": world}
    if rank == 0 and (not resuming or extended):  # a resume that extends the run records it
        checkpoint.write_text(out / "config.json", cfg.to_json())

    stepper = _stepper(state, cfg, device, world)
    end_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
    fused = resolve_fused(cfg.fused, device, compiled=cfg.compile)  # speed only: config.json keeps the choice
    try:
        with fused_blocks(model, fused):
            return run_epochs(
                state,
                stepper,
                cfg,
                out,
                train_data,
                val_data,
                source=source,
                end_epoch=end_epoch,
                rank=rank,
                world=world,
                progress=progress,
            )
    except (KeyboardInterrupt, EvaluationStopped):  # Ctrl-C or SIGTERM, in training or in validation
        done = state.saved_epoch
        saved = f"last.pt holds epoch {done}" if done else "no epoch finished yet"
        raise Interrupted(
            f"stopped during epoch {done + 1}; {saved}. Continue with: scaler train --resume --out {out}"
        ) from None


def _stepper(state: RunState, cfg: TrainConfig, device, world: int) -> Stepper:
    """DDP wraps the model for the outer loss; attacks (most of the work) use the plain module,
    compiled too with --compile (`trainers.compiled`; DDP's wrapper is compiled whole)."""
    model = state.model
    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )
    attack_model = compile_model(model) if cfg.compile else model  # regional: blocks compiled once each
    if cfg.compile:
        step_model = attack_model if world == 1 else torch.compile(train_model)
    else:
        step_model = train_model
    return Stepper(
        step_model,
        state.optimizer,
        cfg,
        device=device,
        autocast_dtype=resolve_precision(cfg.precision, device),
        attack_generator=state.attack_gen,
        war=state.war,
        attack_model=attack_model,
        ema=state.ema,
    )


def _version() -> str:
    from scaler import __version__

    return __version__
