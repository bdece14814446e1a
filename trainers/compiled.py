"""torch.compile where it pays: regional compilation. A model whose blocks the runtime recognises
(emitted classes declaring `scaler_block`) has each block class's forward compiled once and run
by every block of that class; repeats of a block (the same class, channels and stride: 13 of
A1's 14 first-stage blocks) reuse one compiled graph, so compile time grows with the distinct
blocks (6 in a RobustResNet), not with depth: compiling the whole A1 had not finished after
165 s on an H100 host. Stem and head stay eager. Other models are compiled whole.

The compiler's caches (inductor's FX graph and AOT autograd caches) live on disk, under
`compile_cache_dir()`, so a second run of the same architectures loads kernels instead of
compiling them.
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path

import torch
from torch import nn

RECOMPILE_LIMIT = 64
"""Compiled variants allowed per block class: train and eval mode, attacks (input gradients) and
updates, each batch shape, each distinct block of the class (dynamo's default, 8, falls back to
eager past it)."""


def compile_cache_dir() -> Path:
    """Where inductor keeps compiled kernels: $TORCHINDUCTOR_CACHE_DIR, else ~/.cache/scaler/inductor."""
    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or Path.home() / ".cache" / "scaler" / "inductor")


def tagged_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's blocks of emitted classes (`scaler_block`) running their class's own forward."""
    return [
        m for m in model.modules() if getattr(type(m), "scaler_block", None) is not None and "forward" not in m.__dict__
    ]


def compile_model(
    model: nn.Module, *, backend="inductor", dynamic: bool | None = None, regional: bool | None = None
) -> nn.Module:
    """The module to run compiled, sharing the model's parameters and buffers (as torch.compile's
    wrapper does). Regional (None: for a model on a GPU, where whole-model compiles of deep
    RobustResNets do not finish in minutes): a twin of the model, its module objects copied around
    the same tensors, whose blocks run their class's compiled forward; the twin keeps its own
    train/eval mode, which whoever runs it sets (the Stepper, attacks, `logits_of`). Otherwise, and
    for models without emitted blocks, torch.compile of the whole model: on this project's 2-core
    CPU a basic-block network's training step ran 1.15-1.19x eager compiled whole, 1.02x regionally."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(compile_cache_dir()))
    if regional is None:
        regional = any(p.is_cuda for p in model.parameters())
    if not regional or not tagged_blocks(model):
        return torch.compile(model, backend=backend, dynamic=dynamic)
    _raise_recompile_limit()
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    twin = copy.deepcopy(model, shared)
    compiled: dict[type, object] = {}
    for block in tagged_blocks(twin):
        cls = type(block)
        if cls not in compiled:
            compiled[cls] = torch.compile(cls.forward, backend=backend, dynamic=dynamic)
        block.forward = functools.partial(compiled[cls], block)
        block._scaler_compiled = True
    return twin


def compiled_regions(model: nn.Module) -> int:
    """How many of the model's blocks run a compiled forward."""
    return sum(1 for m in model.modules() if m.__dict__.get("_scaler_compiled"))


def _raise_recompile_limit() -> None:
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
