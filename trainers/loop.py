"""The epoch loop: train an epoch, validate when due, checkpoint, log. Setup lives in `run.py`."""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from scaler.errors import ScalerError
from trainers import checkpoint
from trainers.config import TrainConfig
from trainers.data import augment, batches
from trainers.distributed import barrier, gather_generator_states, reduce_stats
from trainers.evaluation import evaluate, resolve_val_precision
from trainers.schedule import lr_at, steps_per_epoch


@dataclass
class RunState:
    """Everything a checkpoint restores besides the config."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    data_gen: torch.Generator
    attack_gen: torch.Generator
    war: object | None = None
    ema: object | None = None
    epoch: int = 0  # epochs completed
    saved_epoch: int = 0  # the epoch last.pt holds (0: none yet)
    iteration: int = 0
    best: dict = field(default_factory=lambda: {"value": -1.0, "epoch": None})

    def checkpoint(self, source: str, world: int, lr: float) -> dict:
        return {
            "version": checkpoint.CHECKPOINT_VERSION,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "iteration": self.iteration,
            "best": self.best,
            "rng": {
                "data": self.data_gen.get_state(),
                "attack": gather_generator_states(self.attack_gen, world),
                "torch": torch.get_rng_state(),
            },
            "war": self.war.state_dict() if self.war is not None else None,
            "ema": {k: v.cpu() for k, v in self.ema.state.items()} if self.ema is not None else None,
            "lr": lr,
            "source": source,
        }

    def load(self, ckpt: dict, rank: int, device) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.data_gen.set_state(ckpt["rng"]["data"])
        attack = ckpt["rng"]["attack"]
        self.attack_gen.set_state(attack[rank] if isinstance(attack, list) else attack)
        torch.set_rng_state(ckpt["rng"]["torch"])
        if self.war is not None and ckpt.get("war"):
            self.war.load_state_dict(ckpt["war"])
        if self.ema is not None and ckpt.get("ema"):
            self.ema.state = {k: v.to(device) for k, v in ckpt["ema"].items()}
        self.epoch, self.iteration = ckpt["epoch"], ckpt["iteration"]
        self.saved_epoch = self.epoch
        self.best = ckpt.get("best", self.best)


def run_epochs(
    state: RunState,
    stepper,
    cfg: TrainConfig,
    out: Path,
    train_data,
    val_data,
    *,
    source: str,
    end_epoch: int,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
) -> dict:
    """Epochs state.epoch+1 .. end_epoch; returns the last epoch's record."""
    record: dict = {}
    while state.epoch < end_epoch:
        epoch = state.epoch + 1
        t0 = time.perf_counter()
        _train_epoch(state, stepper, cfg, train_data, epoch, rank, world, progress and rank == 0)
        train_loss, train_acc = reduce_stats(stepper, world)
        if not math.isfinite(train_loss):
            raise ScalerError(
                f"training diverged at epoch {epoch} (loss {train_loss}); {out / 'last.pt'} keeps epoch {epoch - 1}"
            )
        seconds = time.perf_counter() - t0
        steps = steps_per_epoch(len(train_data[1]), cfg)
        n_train = len(train_data[1])
        images = min(steps * cfg.batch_size, n_train) if cfg.drop_last else n_train  # all ranks together
        lr = lr_at(cfg, state.iteration - 1, steps)
        record = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "lr": lr,
            "lambda": float(state.war.value) if state.war is not None else None,
            "seconds": seconds,
            "images_per_s": images / seconds,  # training throughput (attacks included)
        }
        state.epoch = epoch
        if rank == 0:
            _close_epoch(state, cfg, out, val_data, record, source, world, progress, t0)
        else:
            gather_generator_states(state.attack_gen, world)
        barrier(world)
    return record


def _train_epoch(state: RunState, stepper, cfg: TrainConfig, train_data, epoch: int, rank, world, progress) -> None:
    """One epoch's training steps (this rank's share of each batch), with its progress bar."""
    x_train, y_train = train_data
    steps = steps_per_epoch(len(y_train), cfg)
    crop = 4 if cfg.augment in ("crop-flip", "crop") else 0
    flip = cfg.augment == "crop-flip"
    local_batch = cfg.batch_size // world
    t0 = time.perf_counter()
    stepper.reset_stats()
    bar = _progress(progress, epoch, cfg.epochs, steps)
    order = batches(len(y_train), cfg.batch_size, state.data_gen, x_train.device, cfg.drop_last)
    try:  # a stop (Ctrl-C, an error) clears the bar, so the message after it stands on its own line
        for i, idx in enumerate(order):
            xb, yb = x_train[idx], y_train[idx]
            if crop or flip:
                xb = augment(xb, state.data_gen, crop=crop, flip=flip)
            part = slice(rank * local_batch, (rank + 1) * local_batch)
            stepper.step(xb[part], yb[part], lr=lr_at(cfg, state.iteration, steps))
            state.iteration += 1
            if bar is not None and (i % 10 == 9 or i == steps - 1):  # the only host syncs: every 10 steps
                bar.update(i + 1 - bar.n)
                bar.set_postfix(
                    loss=f"{(stepper.loss_sum / stepper.seen).item():.3f}",
                    acc=f"{100 * (stepper.correct / stepper.seen).item():.1f}",
                    img_s=f"{stepper.seen / (time.perf_counter() - t0):.0f}",
                )
    finally:
        if bar is not None:
            bar.close()


def _close_epoch(state: RunState, cfg: TrainConfig, out: Path, val_data, record, source, world, progress, t0) -> None:
    """Rank 0's end of an epoch: validate when due, save last.pt (best.pt, epoch_N.pt), log."""
    epoch = state.epoch
    due = epoch % cfg.eval_every == 0 or epoch == cfg.epochs
    if due:
        record.update(validate(state.model, state.ema, *val_data, cfg))
        record["eval_seconds"] = time.perf_counter() - t0 - record["seconds"]
    score = record.get(f"val_{cfg.best_metric}", -1.0)
    is_best = due and epoch >= round(cfg.best_from * cfg.epochs) and score > state.best["value"]
    if is_best:
        state.best = {"value": score, "epoch": epoch}
    checkpoint.save(state.checkpoint(source, world, record["lr"]), out / "last.pt")
    state.saved_epoch = epoch
    if is_best:
        checkpoint.copy(out / "last.pt", out / "best.pt")
    if epoch in cfg.save_epochs:
        checkpoint.copy(out / "last.pt", out / f"epoch_{epoch}.pt")
    checkpoint.append_metrics(out, record)
    if progress:
        print(summary(record), file=sys.stderr)


def validate(model, ema, x_val, y_val, cfg) -> dict:
    """Clean / PGD-20 / CW-40 on the validation points, with the EMA weights if any, in
    --val-precision (auto: bf16 when training runs in bf16, else fp32)."""
    net = model
    if ema is not None:
        net = copy.deepcopy(model)
        net.load_state_dict({k: v.to(dtype=net.state_dict()[k].dtype) for k, v in ema.state.items()})
    precision = resolve_val_precision(cfg.val_precision, cfg.precision, x_val.device)
    r = evaluate(
        net,
        x_val,
        y_val,
        ("clean", "pgd20", "cw40"),
        eps=cfg.eps,
        seed=cfg.seed,
        precision=precision,
        channels_last=cfg.channels_last,
    )
    return {
        "val_precision": precision,  # which precision the figures below were measured in
        "val_clean": r["clean"]["accuracy"],
        "val_pgd20": r["pgd20"]["accuracy"],
        "val_cw40": r["cw40"]["accuracy"],
        "val_stable": r["pgd20"]["stable"],
        "val_lip": r["pgd20"]["lip"],
        # the rest of what NARes records per epoch (studies export it)
        "val_loss": r["clean"]["loss"],
        "val_pgd20_loss": r["pgd20"]["loss"],
        "val_cw40_loss": r["cw40"]["loss"],
        "val_cw40_stable": r["cw40"]["stable"],
        "val_cw40_lip": r["cw40"]["lip"],
    }


def summary(r: dict) -> str:
    """The epoch line; validation figures only on epochs that validated."""
    line = f"epoch {r['epoch']}: loss {r['train_loss']:.4f} acc {r['train_acc']:.1f}%"
    if "val_clean" in r:
        line += f" | val clean {r['val_clean']:.1f}% pgd20 {r['val_pgd20']:.1f}% cw40 {r['val_cw40']:.1f}%"
    return f"{line} | {r['seconds']:.1f}s"


def _progress(enabled: bool, epoch: int, epochs: int, total: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch}/{epochs}", unit="step", leave=False, file=sys.stderr)
