"""Independent counts of a built model, to check the closed-form cost model against: fvcore's
FLOPs (multiply-adds) and the parameter numel. Imports torch and fvcore when called."""

from __future__ import annotations

from contextlib import contextmanager


def use_plain_formulation(model) -> list:
    """Switch every block of an emitted model to its plain (reference) formulation, `fused = False`:
    the blocks as the papers write them. Returns (module, previous flag) pairs."""
    flags = [(m, m.fused) for m in model.modules() if isinstance(getattr(m, "fused", None), bool)]
    for m, _ in flags:
        m.fused = False
    return flags


@contextmanager
def plain_formulation(model):
    """`use_plain_formulation` for a block of code, restoring the flags on exit: the fused one
    computes the same function with other operators (BatchNorm folded into convs, a pool taken as
    a sum), and FLOPs are counted on the plain one."""
    flags = use_plain_formulation(model)
    try:
        yield model
    finally:
        for m, flag in flags:
            m.fused = flag


def fvcore_flops(model, resolution: int = 32) -> tuple[int, dict]:
    """fvcore's total and per-operator count of an eval-mode model (its plain formulation) on one random input."""
    import logging

    import torch
    from fvcore.nn import FlopCountAnalysis

    logging.getLogger("fvcore").setLevel(logging.ERROR)
    with plain_formulation(model):
        analysis = FlopCountAnalysis(model.eval(), torch.rand(1, 3, resolution, resolution))
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        return int(analysis.total()), dict(analysis.by_operator())


def numel(model) -> int:
    """Parameters of a model, as `sum(p.numel())`."""
    return sum(p.numel() for p in model.parameters())
