"""Import other codebases' checkpoints into run directories, and export runs to their names.

`import_checkpoint` reads a user's file (weights_only), finds the state dict inside it, detects its
layout (`scaler.layouts`), checks the spec against what that layout's class computes, renames every
tensor, loads strictly, and only then writes the run directory (model.py, config.json, best.pt in
the trainer's checkpoint format) in one rename, so a refused import writes nothing.
`export_run` applies the renaming the other way.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from scaler.builder import build_from_source
from scaler.errors import ScalerError
from scaler.fileio import atomic_write
from scaler.layouts import NORM_BUFFERS, check_spec, detect, export_target, get_layout, plan_import
from scaler.spec import ArchSpec
from trainers import checkpoint

WRAPPERS = ("state_dict", "model_state_dict", "model", "net")
"""Keys under which training scripts store the state dict (checked in this order)."""

PREFIXES = ("module.", "_orig_mod.")
"""Prefixes DataParallel/DDP and torch.compile put before every key."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a checkpoint file: raw, or under one of WRAPPERS; prefixes stripped."""
    path = Path(path)
    if not path.is_file():
        raise ScalerError(f"checkpoint {path} not found")
    return unwrap(checkpoint.restore(path), str(path))


def unwrap(obj, label: str = "checkpoint") -> dict[str, torch.Tensor]:
    """A flat {name: tensor} from a raw or wrapped state dict, refusing anything else."""
    for _ in range(len(WRAPPERS) + 1):
        if not isinstance(obj, Mapping) or not obj:
            break
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            bad = next((k for k in obj if not isinstance(k, str)), None)
            if bad is not None:
                raise ScalerError(f"{label}: state-dict key {bad!r} is not a string")
            return strip_prefixes(dict(obj))
        inner = next((obj[k] for k in WRAPPERS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            odd = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
            raise ScalerError(
                f"{label} holds no state dict: entry {odd!r} is not a tensor and none of "
                f"{', '.join(WRAPPERS)} wraps one"
            )
        obj = inner
    raise ScalerError(f"{label} holds no state dict (a dict of tensors, raw or under {', '.join(WRAPPERS)})")


def strip_prefixes(state: dict) -> dict:
    """Remove a prefix every key shares (repeatedly: DDP around a compiled model)."""
    changed = True
    while changed and state:
        changed = False
        for prefix in PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def stored_normalization(state: Mapping[str, torch.Tensor]) -> tuple | None:
    """The checkpoint's (mu, sigma) as float triples, None if it holds neither."""
    present = [k for k in NORM_BUFFERS if k in state]
    if not present:
        return None
    if len(present) == 1:
        missing = next(k for k in NORM_BUFFERS if k not in state)
        raise ScalerError(f"checkpoint holds {present[0]} but no {missing} (input normalisation half given)")
    values = []
    for key in NORM_BUFFERS:
        t = state[key]
        if t.numel() != 3 or not t.is_floating_point():
            raise ScalerError(f"checkpoint {key}: expected 3 per-channel floats, found shape {list(t.shape)}")
        values.append(tuple(float(v) for v in t.flatten()))
    return tuple(values)


def meta_model(source: str, num_classes: int | None, label: str) -> torch.nn.Module:
    """The model of `source` on the meta device: names, shapes and dtypes without memory."""
    with torch.device("meta"):
        return build_from_source(source, num_classes, label)


def convert(state: Mapping[str, torch.Tensor], source: str, spec: ArchSpec | None, fmt: str | None, label: str):
    """(weights in our names and the model's dtypes, layout, ImportPlan), after every check; the
    weights have been loaded strictly into the model."""
    layout = get_layout(fmt) if fmt else detect(state)
    stored = stored_normalization(state) if layout.normalization == "buffers" else None
    check_spec(layout, spec, stored)
    model = meta_model(source, spec.num_classes if spec else None, label)
    target = model.state_dict()
    plan = plan_import(
        layout, {k: tuple(v.shape) for k, v in state.items()}, {k: tuple(v.shape) for k, v in target.items()}
    )
    weights = {}
    for key, value in target.items():
        if key in plan.mapping:
            weights[key] = _own(state[plan.mapping[key]].to(dtype=value.dtype))
        else:  # a BatchNorm counter an old checkpoint lacks
            weights[key] = torch.zeros((), dtype=value.dtype)
    try:
        model.load_state_dict(weights, strict=True, assign=True)
    except RuntimeError as exc:  # the plan covers every key and shape: only a dtype surprise gets here
        raise ScalerError(f"checkpoint does not load into the model: {' '.join(str(exc).split())[:240]}") from None
    return weights, layout, plan


def _own(t: torch.Tensor) -> torch.Tensor:
    """`t` in storage of its own, so saving it does not also save a dropped neighbour's bytes."""
    t = t.contiguous()
    return t.clone() if t.untyped_storage().nbytes() != t.nbytes else t


def import_checkpoint(
    checkpoint_path: str | Path,
    out: str | Path,
    *,
    source: str,
    spec: ArchSpec | None,
    label: str,
    fmt: str | None = None,
    dataset: str | None = None,
    data_dir: str | None = None,
    force: bool = False,
) -> dict:
    """Write run directory `out` holding the checkpoint's weights in the model of `source`."""
    from trainers.config import make_config
    from trainers.data import DATASETS, NUM_CLASSES

    out = Path(out)
    _check_out(out, force)
    if dataset is not None and dataset not in DATASETS:
        raise ScalerError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    state = read_state_dict(checkpoint_path)
    weights, layout, plan = convert(state, source, spec, fmt, str(checkpoint_path))
    classes = int(weights["fc.weight"].shape[0]) if "fc.weight" in weights else None
    if dataset is None:
        by_classes = {10: "cifar10", 100: "cifar100"}
        if classes not in by_classes:
            raise ScalerError(f"cannot tell the dataset of a {classes}-class model: give --dataset")
        dataset = by_classes[classes]
    elif dataset in NUM_CLASSES and classes is not None and NUM_CLASSES[dataset] != classes:
        raise ScalerError(f"--dataset {dataset} has {NUM_CLASSES[dataset]} classes, the checkpoint {classes}")
    info = {
        "checkpoint": str(Path(checkpoint_path).resolve()),
        "format": layout.name,
        "upstream": layout.upstream,
        "tensors": len(weights),
        "dropped": list(plan.dropped),
        "zeroed_counters": len(plan.counters),
    }
    cfg = make_config(None, {"model": label, "spec": spec.to_dict() if spec else None, "dataset": dataset})
    cfg.data_dir = data_dir
    cfg.extra = {"imported": info, "scaler_version": _version(), "torch": torch.__version__}
    ckpt = {
        "version": checkpoint.CHECKPOINT_VERSION,
        "model": weights,
        "epoch": 0,
        "iteration": 0,
        "source": source,
        "imported": info,
    }
    _write_run(
        out,
        {
            "model.py": lambda p: p.write_text(source, encoding="utf-8"),
            "config.json": lambda p: p.write_text(cfg.to_json(), encoding="utf-8"),
            "best.pt": lambda p: torch.save(ckpt, p),
        },
        force,
    )
    return {**info, "run_dir": str(out), "model": label}


def imported_info(config: dict) -> dict | None:
    """What `import_checkpoint` recorded in a run's config.json (None for a trained run)."""
    return (config.get("extra") or {}).get("imported")


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ScalerError(f"{out} is a file, not a run directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ScalerError(f"run directory {out} is not empty; choose another -o or pass --force to replace it")
        if (out / checkpoint.LOCK_NAME).exists():
            raise ScalerError(f"{out} is in use by a training run ({out / checkpoint.LOCK_NAME} exists)")


def _write_run(out: Path, files: dict, force: bool) -> None:
    """Write `files` into a fresh sibling directory, then rename it to `out` (replacing an old one
    only with `force`): readers see no run or a whole one."""
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_dir(parent, f".{out.name}.", ".tmp")
    old = None
    try:
        for name, write in files.items():
            write(tmp / name)
        if out.exists():
            _check_out(out, force)  # again: someone may have filled it meanwhile
            old = _fresh_dir(parent, f".{out.name}.", ".old")
            os.replace(out, old / "run")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / "run").exists() and not out.exists():
            os.replace(old / "run", out)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _fresh_dir(parent: Path, prefix: str, suffix: str) -> Path:
    """A new directory in `parent` with the mode the umask gives (as `scaler train`'s run
    directories get), not tempfile.mkdtemp's 0700: it becomes the run directory by a rename."""
    for _ in range(100):
        path = parent / f"{prefix}{os.urandom(6).hex()}{suffix}"
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free temporary name in {parent}")


def export_run(
    target: str | Path, out: str | Path, *, to: str = "robustbench", force: bool = False, parents: bool = False
) -> dict:
    """Write the weights of a run (its best.pt, else last.pt) or checkpoint file in layout `to`, as a
    raw state dict that the matching class loads strictly."""
    ckpt_path = checkpoint.find_checkpoint(target)
    ckpt = checkpoint.restore_model_state(ckpt_path)
    source = checkpoint.model_source(ckpt, ckpt_path.parent)
    spec = checkpoint.run_spec(ckpt_path.parent, source) if source else None
    if spec is None:
        raise ScalerError(f"{ckpt_path}: its model is not a scaler spec, so its layout elsewhere is unknown")
    goal = export_target(spec, to)
    weights = {k: v for k, v in ckpt["model"].items()}
    model = meta_model(source, spec.num_classes, "model.py")
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    plan_import(get_layout("scaler"), {k: tuple(v.shape) for k, v in weights.items()}, ours)  # refuses a misfit
    state: dict[str, torch.Tensor] = {}
    if goal.norm_buffers:
        mean, std = (spec.mean, spec.std) if spec.mean is not None else ((0.0,) * 3, (1.0,) * 3)
        state["mu"] = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        state["sigma"] = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    for key in ours:
        state[goal.layout.upstream_key(key)] = weights[key]
    try:
        atomic_write(Path(out), lambda tmp: torch.save(state, tmp), force=force, parents=parents)
    except OSError as exc:
        raise ScalerError(f"cannot write {out}: {exc.strerror or exc}") from None
    return {
        "checkpoint": str(ckpt_path),
        "out": str(out),
        "format": goal.layout.name,
        "upstream": goal.layout.upstream,
        "constructor": goal.constructor,
        "tensors": len(state),
    }


def _version() -> str:
    from scaler import __version__

    return __version__
