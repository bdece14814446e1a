"""Adversarial training runs: `run_training(cfg, out_dir)` writes a self-describing run directory.

  model.py        the model source (emitted from the templates, or the user's file)
  config.json     everything needed to reproduce the run
  metrics.jsonl   one object per epoch
  last.pt         written after every epoch (atomic); `--resume` continues from it bit-identically
  best.pt         best validation robustness (PGD-20 or CW-40) from `best_from` on
  epoch_N.pt      for each N in `save_epochs`

The data live on the device as tensors; shuffling, augmentation and attack starts draw from
explicit seeded generators whose states are checkpointed with the optimizer and the weights.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from scaler.errors import ScalerError
from trainers.config import TrainConfig
from trainers.data import NUM_CLASSES, augment, batches, holdout, load_cifar101, load_split
from trainers.evaluate import evaluate
from trainers.losses import WarLambda
from trainers.step import Ema, Stepper, channels_last_hazard, make_optimizer, resolve_device, resolve_precision

CHECKPOINT_VERSION = 1


# --------------------------------------------------------------------------- model resolution
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


def build_from_source(source: str, num_classes: int):
    from scaler.builder import load_source

    module = load_source(source, "model.py")
    if not callable(getattr(module, "build_model", None)):
        raise ScalerError("the model file defines no build_model() function")
    try:
        return module.build_model(num_classes=num_classes)
    except TypeError:  # a user's build_model() without a num_classes argument
        return module.build_model()


# --------------------------------------------------------------------------- checkpoints
def save_atomic(obj, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's messages run to many lines: keep the first
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ScalerError(
            f"cannot read checkpoint {path} (not a torch checkpoint?): {type(exc).__name__}: {first}"
        ) from None


def write_text_atomic(path: Path, text: str) -> None:
    from scaler.codegen import write_atomic

    write_atomic(path, text, force=True)


# --------------------------------------------------------------------------- schedule
def lr_at(cfg: TrainConfig, iteration: int, steps_per_epoch: int) -> float:
    """Learning rate at a global iteration: a pure function, so resuming needs only the counter."""
    epoch_float = iteration / steps_per_epoch
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "step":
        passed = sum(1 for m in cfg.milestone_epochs() if int(epoch_float) >= m)
        return cfg.lr * (0.1**passed)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * iteration / total))
    warm = cfg.warmup_epochs * steps_per_epoch
    if iteration < warm:
        return cfg.lr * (iteration + 1) / warm
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (iteration - warm) / max(1, total - warm)))


# --------------------------------------------------------------------------- data
def load_data(cfg: TrainConfig, device):
    x, y = load_split(cfg.dataset, "train", cfg.data_dir)
    if cfg.val == "cifar10.1":
        if cfg.dataset != "cifar10":
            raise ScalerError("CIFAR-10.1 validation applies to --dataset cifar10")
        (xv, yv) = load_cifar101(cfg.data_dir)
        train = (x, y)
    elif cfg.val == "holdout":
        n_val = cfg.val_size or (1000 if len(y) > 20000 else max(1, len(y) // 10))
        train, (xv, yv) = holdout(x, y, n_val, seed=cfg.seed)
    else:
        raise ScalerError(f"unknown validation set {cfg.val!r}; use holdout or cifar10.1")
    xv, yv = xv[: cfg.val_n], yv[: cfg.val_n]
    return (train[0].to(device), train[1].to(device)), (xv.to(device), yv.to(device))


# --------------------------------------------------------------------------- distributed
def dist_info() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed(device_name: str) -> None:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ScalerError("--distributed needs torchrun (RANK/WORLD_SIZE unset); see the README")
    if not torch.distributed.is_initialized():
        use_cuda = device_name != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")


# --------------------------------------------------------------------------- the run
def run_training(
    cfg: TrainConfig | None,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    distributed: bool = False,
    epochs: int | None = None,
) -> dict:
    """Train; returns the last epoch's metrics. With `resume`, the run directory's own config is
    used (`epochs` may extend it). `stop_after` ends after that epoch, resumably."""
    out = Path(out_dir)
    if resume:
        if not (out / "last.pt").is_file():
            raise ScalerError(f"nothing to resume: {out / 'last.pt'} does not exist")
        cfg = TrainConfig.from_dict(json.loads((out / "config.json").read_text()))
        if epochs is not None:
            cfg.epochs = epochs
    cfg.validate()
    if distributed:
        init_distributed(cfg.device)
    rank, world = dist_info()
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if cfg.batch_size % world:
        raise ScalerError(f"--batch-size {cfg.batch_size} must divide evenly across {world} processes")

    if resume:
        source = (out / "model.py").read_text()
    else:
        if out.exists() and any(out.iterdir()):
            raise ScalerError(f"run directory {out} is not empty; pass --resume or choose another --out")
        if world > 1:  # every rank checks before rank 0 writes anything
            torch.distributed.barrier()
        if cfg.war_calibrate and cfg.war_zeta is None:
            cfg.war_zeta = calibrate_war(cfg, out, progress=progress)
        source = model_source(cfg)

    # Build the model and load the data before writing anything: bad input leaves no run behind.
    torch.manual_seed(cfg.seed)
    num_classes = NUM_CLASSES.get(cfg.dataset, 10)
    model = build_from_source(source, num_classes).to(device)
    hazard = channels_last_hazard(model, device) if cfg.channels_last else None
    if hazard:
        print(f"note: training in NCHW, not channels_last: {hazard}", file=sys.stderr)
        cfg.channels_last = False
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    (x_train, y_train), (x_val, y_val) = load_data(cfg, device)
    if rank == 0 and not resume:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "model.py", source)
        meta = {"scaler_version": _version(), "torch": torch.__version__, "world_size": world}
        cfg.extra = {**cfg.extra, **meta}
    if rank == 0 and (not resume or epochs is not None):  # a resume that extends the run records it
        write_text_atomic(out / "config.json", cfg.to_json())
    steps_per_epoch = _steps_per_epoch(len(y_train), cfg)
    autocast_dtype = resolve_precision(cfg.precision, device)

    optimizer = make_optimizer(model, cfg)
    data_gen = torch.Generator(device=device).manual_seed(cfg.seed)
    attack_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1 + rank)
    war = WarLambda(cfg.war_zeta, cfg.war_alpha, device) if cfg.war_zeta is not None else None
    ema = Ema(model, cfg.ema) if cfg.ema > 0 else None
    start_epoch, best, iteration = 0, {"value": -1.0, "epoch": None}, 0

    if resume:
        ckpt = load_checkpoint(out / "last.pt")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        data_gen.set_state(ckpt["rng"]["data"])
        attack_gen.set_state(
            ckpt["rng"]["attack"][rank] if isinstance(ckpt["rng"]["attack"], list) else ckpt["rng"]["attack"]
        )
        torch.set_rng_state(ckpt["rng"]["torch"])
        if war is not None and ckpt.get("war"):
            war.load_state_dict(ckpt["war"])
        if ema is not None and ckpt.get("ema"):
            ema.state = {k: v.to(device) for k, v in ckpt["ema"].items()}
        start_epoch, iteration = ckpt["epoch"], ckpt["iteration"]
        best = ckpt.get("best", best)
        if start_epoch >= cfg.epochs:
            raise ScalerError(f"{out} already finished {start_epoch} epochs; raise --epochs to continue")

    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True
        )
    # Attacks (most of the work) use the plain module, compiled too with --compile; the outer
    # loss goes through DDP when there is one.
    attack_model = torch.compile(model) if cfg.compile else model
    if cfg.compile:
        step_model = attack_model if world == 1 else torch.compile(train_model)
    else:
        step_model = train_model
    stepper = Stepper(
        step_model,
        optimizer,
        cfg,
        device=device,
        autocast_dtype=autocast_dtype,
        attack_generator=attack_gen,
        war=war,
        attack_model=attack_model,
        ema=ema,
    )

    crop = 4 if cfg.augment in ("crop-flip", "crop") else 0
    flip = cfg.augment == "crop-flip"
    local_batch = cfg.batch_size // world
    last: dict = {}
    end_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
    for epoch in range(start_epoch, end_epoch):
        t0 = time.perf_counter()
        stepper.reset_stats()
        bar = _progress(progress and rank == 0, epoch + 1, cfg.epochs, steps_per_epoch)
        for i, idx in enumerate(batches(len(y_train), cfg.batch_size, data_gen, device, cfg.drop_last)):
            xb, yb = x_train[idx], y_train[idx]
            if crop or flip:
                xb = augment(xb, data_gen, crop=crop, flip=flip)
            xb, yb = (
                xb[rank * local_batch : (rank + 1) * local_batch],
                yb[rank * local_batch : (rank + 1) * local_batch],
            )
            stepper.step(xb, yb, lr=lr_at(cfg, iteration, steps_per_epoch))
            iteration += 1
            if bar is not None and (i % 10 == 9 or i == steps_per_epoch - 1):  # the only syncs: every 10 steps
                bar.update(i + 1 - bar.n)
                bar.set_postfix(
                    loss=f"{(stepper.loss_sum / stepper.seen).item():.3f}",
                    acc=f"{100 * (stepper.correct / stepper.seen).item():.1f}",
                    img_s=f"{stepper.seen / (time.perf_counter() - t0):.0f}",
                )
        if bar is not None:
            bar.close()
        train_loss, train_acc = _reduce_stats(stepper, world)
        if not math.isfinite(train_loss):
            raise ScalerError(
                f"training diverged at epoch {epoch + 1} (loss {train_loss}); {out / 'last.pt'} keeps epoch {epoch}"
            )
        seconds = time.perf_counter() - t0
        record = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "lr": lr_at(cfg, iteration - 1, steps_per_epoch),
            "lambda": float(war.value) if war is not None else None,
            "seconds": seconds,
        }
        if rank == 0:
            validate = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs
            if validate:
                record.update(_validate(model, ema, x_val, y_val, cfg))
                record["eval_seconds"] = time.perf_counter() - t0 - seconds
            score = record.get(f"val_{cfg.best_metric}", -1.0)
            is_best = validate and epoch + 1 >= round(cfg.best_from * cfg.epochs) and score > best["value"]
            if is_best:
                best = {"value": score, "epoch": epoch + 1}
            ckpt = {
                "version": CHECKPOINT_VERSION,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch + 1,
                "iteration": iteration,
                "best": best,
                "rng": {
                    "data": data_gen.get_state(),
                    "attack": _gather_attack_states(attack_gen, world),
                    "torch": torch.get_rng_state(),
                },
                "war": war.state_dict() if war is not None else None,
                "ema": {k: v.cpu() for k, v in ema.state.items()} if ema is not None else None,
                "lr": record["lr"],
                "source": source,
            }
            save_atomic(ckpt, out / "last.pt")
            if is_best:
                _copy_atomic(out / "last.pt", out / "best.pt")
            if epoch + 1 in cfg.save_epochs:
                _copy_atomic(out / "last.pt", out / f"epoch_{epoch + 1}.pt")
            with open(out / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
            if progress:
                print(_summary(record), file=sys.stderr)
        else:
            _gather_attack_states(attack_gen, world)
        if world > 1:
            torch.distributed.barrier()
        last = record
    return last


def _steps_per_epoch(n: int, cfg: TrainConfig) -> int:
    if cfg.drop_last and n >= cfg.batch_size:
        return n // cfg.batch_size
    return math.ceil(n / cfg.batch_size)


def _reduce_stats(stepper, world: int) -> tuple[float, float]:
    stats = torch.stack(
        [
            stepper.loss_sum,
            stepper.correct,
            torch.tensor(float(stepper.seen), dtype=torch.float64, device=stepper.loss_sum.device),
        ]
    )
    if world > 1:
        torch.distributed.all_reduce(stats)
    loss, correct, seen = stats.tolist()
    return loss / max(seen, 1), 100.0 * correct / max(seen, 1)


def _gather_attack_states(gen, world: int):
    if world == 1:
        return gen.get_state()
    out = [None] * world
    torch.distributed.all_gather_object(out, gen.get_state())
    return out


def _validate(model, ema, x_val, y_val, cfg) -> dict:
    """Clean / PGD-20 / CW-40 on the validation points, fp32, with the EMA weights if any."""
    net = model
    if ema is not None:
        net = _ema_copy(model, ema)
    r = evaluate(net, x_val, y_val, ("clean", "pgd20", "cw40"), eps=cfg.eps, seed=cfg.seed, batch_size=256)
    return {
        "val_clean": r["clean"]["accuracy"],
        "val_pgd20": r["pgd20"]["accuracy"],
        "val_cw40": r["cw40"]["accuracy"],
        "val_stable": r["pgd20"]["stable"],
        "val_lip": r["pgd20"]["lip"],
    }


def _ema_copy(model, ema):
    import copy

    net = copy.deepcopy(model)
    net.load_state_dict({k: v.to(dtype=net.state_dict()[k].dtype) for k, v in ema.state.items()})
    return net


def _progress(enabled: bool, epoch: int, epochs: int, total: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch}/{epochs}", unit="step", leave=False, file=sys.stderr)


def _summary(r: dict) -> str:
    return (
        f"epoch {r['epoch']}: loss {r['train_loss']:.4f} acc {r['train_acc']:.1f}% | val clean "
        f"{r['val_clean']:.1f}% pgd20 {r['val_pgd20']:.1f}% cw40 {r['val_cw40']:.1f}% | {r['seconds']:.1f}s"
    )


def _version() -> str:
    from scaler import __version__

    return __version__


# --------------------------------------------------------------------------- WAR calibration
def calibrate_war(cfg: TrainConfig, out: Path, progress: bool = True) -> float:
    """Train a thin version of the model (planes halved) with the tuned beta and return zeta, the
    ratio l_nat / l_rob at the end of training (seed 002: zeta is measured when the thin network
    trained with its tuned lambda converges)."""
    from scaler.spec import ArchSpec

    if cfg.spec is None:
        raise ScalerError("--war-calibrate needs a preset or spec model (it trains a thinner copy)")
    spec = ArchSpec.from_dict(cfg.spec)
    low = 16 if spec.block == "robust" else 1
    thin = replace(spec, planes=tuple(max(low, p // 2) for p in spec.planes), name=None)
    thin_cfg = replace(cfg, spec=thin.to_dict(), war_calibrate=False, war_zeta=None, save_epochs=(), extra={})
    return _train_and_measure_ratio(thin_cfg, out / "war-calibration", progress)


def _train_and_measure_ratio(cfg: TrainConfig, out: Path, progress: bool) -> float:
    run_training(cfg, out, progress=progress)
    # Measure l_nat / l_rob of the trained thin model on training batches (its converged ratio).
    device = resolve_device(cfg.device)
    source = (out / "model.py").read_text()
    model = build_from_source(source, NUM_CLASSES.get(cfg.dataset, 10)).to(device)
    model.load_state_dict(load_checkpoint(out / "last.pt")["model"])
    (x, y), _ = load_data(cfg, device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    stepper = Stepper(
        model, make_optimizer(model, cfg), cfg, device=device, autocast_dtype=None, attack_generator=gen, war=None
    )
    nat, rob = 0.0, 0.0  # summed over up to 8 training batches
    for idx in list(batches(len(y), cfg.batch_size, None, device))[:8]:
        x_adv = stepper.adversarial(x[idx], y[idx])
        model.train()
        with torch.no_grad():
            _, l_nat, l_rob, _ = stepper.loss_fn(model, x[idx], x_adv, y[idx], cfg.beta)
        nat, rob = nat + float(l_nat), rob + float(l_rob)
    if rob <= 0:
        raise ScalerError("WAR calibration measured a zero robust loss; cannot derive zeta")
    zeta = nat / rob
    write_text_atomic(out / "war_zeta.json", json.dumps({"zeta": zeta, "beta": cfg.beta}))
    return zeta
