"""`scaler eval`: load a run directory or checkpoint and evaluate it on the test split."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from scaler.builder import build_from_source
from scaler.errors import ScalerError
from trainers import checkpoint
from trainers.data import NUM_CLASSES, load_split
from trainers.evaluation import EvaluationStopped, evaluate, precision_dtype
from trainers.fused import resolve_fused
from trainers.step import block_families, require_compiler, resolve_device


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


def load_weights(model: torch.nn.Module, target: str | Path) -> Path:
    """Load the weights of a run directory (best.pt, else last.pt) or checkpoint strictly into
    `model`: `scaler train --init-from` fine-tunes from them."""
    path = find_checkpoint(target)
    ckpt = checkpoint.restore_model_state(path)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:240]
        raise ScalerError(f"--init-from {path} does not fit the model to train: {first}") from None
    return path


def run_model(target: str | Path) -> tuple[str, dict | None]:
    """(model source, spec dict or None) of a run directory or checkpoint, without its weights
    where the directory has its model.py."""
    from trainers.interop import run_spec

    path = Path(target)
    if path.is_dir() and (path / "model.py").is_file():
        source = (path / "model.py").read_text()
        run_dir = path
    else:
        ckpt_path = find_checkpoint(path)
        source = checkpoint.restore_model_state(ckpt_path).get("source")
        run_dir = ckpt_path.parent
        if source is None:
            raise ScalerError(f"{ckpt_path} carries no model source: give MODEL to train")
    spec = run_spec(run_dir, source)
    return source, spec.to_dict() if spec is not None else None


def load_trained(target: str | Path, device="cpu"):
    """(model in eval mode, run config dict, checkpoint info) from a run directory or checkpoint."""
    ckpt_path = find_checkpoint(target)
    ckpt = checkpoint.restore_model_state(ckpt_path)
    run_dir = ckpt_path.parent
    config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else {}
    source = ckpt.get("source") or ((run_dir / "model.py").read_text() if (run_dir / "model.py").is_file() else None)
    if source is None:
        raise ScalerError(f"{ckpt_path} carries no model source and {run_dir / 'model.py'} is missing")
    weights = ckpt["model"]
    classes = (
        weights["fc.weight"].shape[0]
        if "fc.weight" in weights
        else NUM_CLASSES.get(config.get("dataset", "cifar10"), 10)
    )
    model = build_from_source(source, classes, str(run_dir / "model.py"))
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:240]
        raise ScalerError(f"{ckpt_path} does not fit its model: {first}") from None
    imported = ckpt.get("imported")
    epochs = None if imported else config.get("epochs")
    # unfinished: the run's last.pt (not the evaluated checkpoint: best.pt is usually an earlier epoch)
    trained = checkpoint.last_epoch(run_dir) if ckpt_path.name != "last.pt" else ckpt.get("epoch")
    info = {
        "checkpoint": str(ckpt_path),
        "epoch": ckpt.get("epoch"),
        "epochs": epochs,
        "unfinished": bool(epochs and trained is not None and trained < epochs),
    }
    if imported:
        info["imported"] = imported
    return model.to(device).eval(), config, info


def evaluate_run(
    target,
    *,
    attacks,
    dataset=None,
    data_dir=None,
    eps=None,
    n=None,
    seed=0,
    batch_size=None,
    per_block=False,
    device="auto",
    progress=False,
    announce=None,
    precision="fp32",
    compile=False,
    fused=None,
):
    """(results, info) for a run directory or checkpoint; `announce(line)` is told which
    checkpoint and epoch is evaluated before the (possibly long) attacks start. `precision`:
    fp32 (default) or bf16 autocast of the attacks and logits; `batch_size` None is the device's
    default (trainers.evaluation.default_batch_size); `compile` torch.compiles the logits and our
    attacks, `fused` picks the fast runtime's blocks (trainers.evaluation.evaluate)."""
    precision_dtype(precision)  # bad input fails before the model and data load
    dev = resolve_device(device)
    if compile:
        require_compiler(dev)
    model, config, info = load_trained(target, dev)
    model = model.to(memory_format=torch.contiguous_format)
    dataset = dataset or config.get("dataset", "cifar10")
    data_dir = data_dir or config.get("data_dir")
    eps = eps if eps is not None else config.get("eps", 8 / 255)
    x, y = load_split(dataset, "test", data_dir)
    if n is not None:
        x, y = x[:n], y[:n]
    info.update(dataset=dataset, n=len(y), eps=eps, precision=precision, compile=bool(compile))
    info["fused"] = resolve_fused(fused, dev, compiled=bool(compile))
    if announce is not None:
        _announce(announce, info, model, dev)
    settings = dict(eps=eps, seed=seed, batch_size=batch_size, per_block=per_block, progress=progress)
    try:
        results = evaluate(
            model, x.to(dev), y.to(dev), attacks, precision=precision, compile=compile, fused=info["fused"], **settings
        )
    except EvaluationStopped as exc:  # the caller reports what finished, and of which checkpoint
        exc.info = info
        raise
    return results, info


def _announce(announce, info: dict, model, dev) -> None:
    """Which checkpoint and epoch is evaluated, on what; a note where torch.compile is on."""
    of = f" of {info['epochs']}" if info["epochs"] else ""
    why = " (no best.pt yet: the run has not validated)" if info["checkpoint"].endswith("last.pt") else ""
    when = f"imported from {info['imported']['checkpoint']}" if "imported" in info else f"epoch {info['epoch']}{of}"
    announce(f"evaluating {info['checkpoint']}, {when}{why}, on {info['n']} {info['dataset']} test points")
    if info["compile"]:
        robust_cpu = dev.type == "cpu" and "robust" in block_families(model)
        slow = " (RobustResBlock models measured 0.5-0.7x of eager compiled on a CPU)" if robust_cpu else ""
        announce(f"note: torch.compile on; each attack's first batches compile first{slow}")
