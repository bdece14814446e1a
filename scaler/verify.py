"""Independent counts of a built model, to check the closed-form cost model against: fvcore's
FLOPs (multiply-adds) and the parameter numel. Imports torch and fvcore when called."""

from __future__ import annotations


def fvcore_flops(model, resolution: int = 32) -> tuple[int, dict]:
    """fvcore's total and per-operator count of an eval-mode model, as it is (an emitted file's
    `forward` is the formulation its header counts), on one random input."""
    import logging

    import torch
    from fvcore.nn import FlopCountAnalysis

    logging.getLogger("fvcore").setLevel(logging.ERROR)
    analysis = FlopCountAnalysis(model.eval(), torch.rand(1, 3, resolution, resolution))
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    return int(analysis.total()), dict(analysis.by_operator())


def numel(model) -> int:
    """Parameters of a model, as `sum(p.numel())`."""
    return sum(p.numel() for p in model.parameters())
