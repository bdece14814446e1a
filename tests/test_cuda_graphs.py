"""CUDA-graph attacks (`trainers.cuda_graphs`): inside a `graphed_attacks` span PGD on a GPU replays
one recorded step per batch shape and equals the eager loop; on a CPU the span changes nothing.
The GPU test runs where there is one (benchmarks/gpu_check.sh runs it); CI has none."""

import pytest
import torch

from scaler.builder import build_model
from scaler.spec import ArchSpec
from trainers import cuda_graphs
from trainers.attacks import pgd


def _attack(model, x, y, seed=0, **kw):
    gen = torch.Generator(device=x.device).manual_seed(seed)
    return pgd(model, x, y, eps=8 / 255, step=2 / 255, steps=5, generator=gen, **kw)


def test_span_changes_nothing_on_a_cpu():
    torch.manual_seed(0)
    model = build_model(ArchSpec("robust", (1, 1, 1), (16, 32, 64))).eval()
    x, y = torch.rand(4, 3, 16, 16), torch.randint(0, 10, (4,))
    eager = _attack(model, x, y)
    with cuda_graphs.graphed_attacks():
        assert torch.equal(_attack(model, x, y), eager)
        assert cuda_graphs._GRAPHS.get() == {}  # nothing recorded
    assert cuda_graphs._GRAPHS.get() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("loss, fold_bn", [("ce", False), ("cw", True)])
def test_graphed_pgd_equals_eager_on_a_gpu(loss, fold_bn):
    """Folded BatchNorm (evaluation's default) too: the recorded step folds it in the graph's memory."""
    torch.manual_seed(0)
    model = build_model(ArchSpec("robust", (2, 1, 1), (16, 32, 64))).cuda().eval()
    x, y = torch.rand(8, 3, 32, 32, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    eager = _attack(model, x, y, loss=loss, fold_bn=fold_bn)
    with cuda_graphs.graphed_attacks():
        first = _attack(model, x, y, loss=loss, fold_bn=fold_bn)
        second = _attack(model, x[:5], y[:5], loss=loss, fold_bn=fold_bn)  # another shape: another graph
        torch.cuda.empty_cache()  # freed memory handed back: a graph reading it would read garbage
        again = _attack(model, x, y, loss=loss, seed=0, fold_bn=fold_bn)  # replayed
        assert len(cuda_graphs._GRAPHS.get()) == 2
    for got in (first, again):
        assert (got - eager).abs().max().item() <= 2 / 255 + 1e-6  # a sign may flip at rounding
        assert (got == eager).float().mean().item() > 0.99
    assert second.shape == (5, 3, 32, 32)
