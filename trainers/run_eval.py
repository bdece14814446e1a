"""`scaler eval`: load a run directory or checkpoint and evaluate it on the test split."""

from __future__ import annotations

import torch

from scaler.errors import ScalerError
from trainers import checkpoint
from trainers.data import load_split
from trainers.evaluation import EvaluationStopped, evaluate, precision_dtype
from trainers.fused import resolve_fused
from trainers.step import block_families, resolve_device


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
    cuda_graphs=False,
):
    """(results, info) for a run directory or checkpoint; `announce(line)` is told which
    checkpoint and epoch is evaluated before the (possibly long) attacks start. `precision`:
    fp32 (default) or bf16 autocast of the attacks and logits; `batch_size` None is the device's
    default (trainers.evaluation.default_batch_size); `compile` torch.compiles the logits and our
    attacks, `fused` picks the fast runtime's blocks, `cuda_graphs` replays attack steps."""
    precision_dtype(precision)  # bad input fails before the model and data load
    for flag, value in (("--n", n), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise ScalerError(f"{flag} must be >= 1")
    dev = resolve_device(device, compile=compile)
    model, config, info = checkpoint.load_trained(target, dev)
    model = model.to(memory_format=torch.contiguous_format)
    dataset = dataset or config.get("dataset", "cifar10")
    data_dir = data_dir or config.get("data_dir")
    eps = eps if eps is not None else config.get("eps", 8 / 255)
    x, y = load_split(dataset, "test", data_dir)
    if n is not None:
        x, y = x[:n], y[:n]
    resolved = "bf16" if precision_dtype(precision, dev) is not None else "fp32"
    info.update(dataset=dataset, n=len(y), eps=eps, precision=resolved, compile=bool(compile))
    info["fused"] = resolve_fused(fused, dev, compiled=bool(compile))
    info["cuda_graphs"] = bool(cuda_graphs) and dev.type == "cuda"  # asked for on a CPU: nothing to replay
    if announce is not None:
        _announce(announce, info, model, dev)
    settings = dict(eps=eps, seed=seed, batch_size=batch_size, per_block=per_block, progress=progress)
    try:
        results = evaluate(
            model,
            x.to(dev),
            y.to(dev),
            attacks,
            precision=precision,
            compile=compile,
            fused=info["fused"],
            cuda_graphs=cuda_graphs,
            **settings,
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
