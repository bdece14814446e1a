"""The fixed-shape PGD loop captured as a CUDA graph: one step (forward, loss, input gradient, sign
step, projection) recorded once per batch shape and replayed `steps` times, so that a small
model's attack is not bound by kernel launches (A1's forward and backward launch about 7,600
kernels of 10-30 us each). Only where the weights stay fixed for the whole span (evaluation): a
graph reads the tensors it was recorded with, at their addresses.

`graphed_attacks()` opens the span; inside it `trainers.attacks.pgd` on CUDA tensors replays the
graph of its shape and settings, recording it on first use. Randomness (the start) stays outside
the graph, so results match the eager loop to float rounding. What a step reads must stay at its
address: the recorded step folds BatchNorm itself (its folded tensors live in the graph's memory),
and the fast runtime's fold cache keeps its tensors for the enclosing span. Each graph has a
memory pool of its own: one per attack and batch shape.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch

_GRAPHS: ContextVar[dict | None] = ContextVar("scaler_cuda_graphs", default=None)
WARMUP_STEPS = 3  # eager steps on a side stream before recording: cuDNN autotuning, Triton compiles


@contextmanager
def graphed_attacks(enabled: bool = True):
    """Within it, PGD attacks on CUDA tensors run as replayed CUDA graphs (one per model, batch
    shape and attack settings); the graphs and their memory are freed on exit. An enabled span
    inside an enabled one shares its graphs (a benchmark's rounds record once)."""
    outer = _GRAPHS.get()
    token = _GRAPHS.set((outer if outer is not None else {}) if enabled else None)
    try:
        yield
    finally:
        _GRAPHS.reset(token)


def graph_for(model, x: torch.Tensor, y: torch.Tensor, settings: tuple, step_fn):
    """The recorded step for this model, shape and settings inside a `graphed_attacks` span, else None
    (not in a span, not CUDA). `step_fn(x_adv, x, y)` is the eager step: the new x_adv."""
    graphs = _GRAPHS.get()
    if graphs is None or not x.is_cuda:
        return None
    # the tensors a graph reads, by address and version: moved or changed ones record a new graph
    held = tuple((t.data_ptr(), t._version) for t in (*model.parameters(), *model.buffers()))
    key = (id(model), held, tuple(x.shape), x.dtype, tuple(y.shape), settings)
    if key not in graphs:
        graphs[key] = GraphedStep(x, y, step_fn)
    return graphs[key]


class GraphedStep:
    """One attack step recorded on static buffers (the clean batch, its labels, x_adv)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, step_fn) -> None:
        self.x, self.y, self.x_adv = x.detach().clone(), y.clone(), x.detach().clone()
        self.step_fn = step_fn
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()

    def _step(self) -> None:
        self.x_adv.copy_(self.step_fn(self.x_adv, self.x, self.y))

    def run(self, x: torch.Tensor, y: torch.Tensor, x_start: torch.Tensor, steps: int) -> torch.Tensor:
        """x_adv after `steps` steps from x_start."""
        self.x.copy_(x)
        self.y.copy_(y)
        self.x_adv.copy_(x_start)
        for _ in range(steps):
            self.graph.replay()
        return self.x_adv.clone()
