"""`scaler eval`: load a run directory or checkpoint and evaluate it on the test split."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from scaler.errors import ScalerError
from trainers.data import NUM_CLASSES, load_split
from trainers.evaluate import evaluate
from trainers.step import resolve_device
from trainers.train import build_from_source, load_checkpoint


def load_trained(target: str | Path, device="cpu"):
    """(model in eval mode, run config dict, checkpoint path) from a run directory or checkpoint."""
    path = Path(target)
    ckpt_path = path / "best.pt" if path.is_dir() else path
    if path.is_dir() and not ckpt_path.is_file():
        ckpt_path = path / "last.pt"
    if not ckpt_path.is_file():
        raise ScalerError(f"no checkpoint at {path} (expected a run directory with best.pt, or a .pt file)")
    ckpt = load_checkpoint(ckpt_path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ScalerError(f"{ckpt_path} is not a scaler checkpoint (no 'model' entry)")
    run_dir = ckpt_path.parent
    config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else {}
    source = ckpt.get("source") or ((run_dir / "model.py").read_text() if (run_dir / "model.py").is_file() else None)
    if source is None:
        raise ScalerError(f"{ckpt_path} carries no model source and {run_dir / 'model.py'} is missing")
    classes = (
        ckpt["model"]["fc.weight"].shape[0]
        if "fc.weight" in ckpt["model"]
        else NUM_CLASSES.get(config.get("dataset", "cifar10"), 10)
    )
    model = build_from_source(source, classes)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), config, ckpt_path


def evaluate_run(
    target,
    *,
    attacks,
    dataset=None,
    data_dir=None,
    eps=None,
    n=None,
    seed=0,
    batch_size=256,
    per_block=False,
    device="auto",
):
    dev = resolve_device(device)
    model, config, ckpt_path = load_trained(target, dev)
    model = model.to(memory_format=torch.contiguous_format)
    dataset = dataset or config.get("dataset", "cifar10")
    data_dir = data_dir or config.get("data_dir")
    eps = eps if eps is not None else config.get("eps", 8 / 255)
    x, y = load_split(dataset, "test", data_dir)
    if n is not None:
        x, y = x[:n], y[:n]
    results = evaluate(
        model, x.to(dev), y.to(dev), attacks, eps=eps, seed=seed, batch_size=batch_size, per_block=per_block
    )
    return results, {"checkpoint": str(ckpt_path), "dataset": dataset, "n": len(y), "eps": eps}
