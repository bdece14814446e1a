"""The predictor BANANAS and the measured rule share: an ensemble of small MLPs on an arch encoding.

The encoding is one-hot per arch coordinate plus the coordinate's value scaled to [0, 1] (the
NARes space is a grid, so BANANAS's path encoding reduces to this). The members differ only in
their seeded initialisation and are trained together as one batched network (stacked weights and
`baddbmm`), which is why fitting five of them costs little more than one. The spread of the
members' predictions is the uncertainty that independent Thompson sampling draws from.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np


def encode(coords: np.ndarray, sizes: tuple[int, ...]) -> np.ndarray:
    """(n, sum(sizes) + len(sizes)) features from (n, k) choice indices."""
    coords = np.asarray(coords, dtype=np.int64)
    parts = []
    for j, size in enumerate(sizes):
        onehot = np.zeros((len(coords), size), dtype=np.float32)
        onehot[np.arange(len(coords)), coords[:, j]] = 1.0
        parts.append(onehot)
        parts.append((coords[:, j : j + 1] / max(size - 1, 1)).astype(np.float32))
    return np.concatenate(parts, axis=1)


@dataclass
class Ensemble:
    """A fitted ensemble; `predict` gives each member's prediction, in the target's units."""

    weights: list
    mean: float
    scale: float

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(members, n) predictions."""
        import torch

        with torch.no_grad():
            h = torch.as_tensor(x, dtype=torch.float32).expand(len(self.weights[0][0]), -1, -1)
            out = _forward(self.weights, h)
        return out.squeeze(-1).numpy() * self.scale + self.mean


@contextmanager
def torch_threads(threads: int | None):
    """torch's intra-op thread count set to `threads` inside (None: as it is), restored on exit.
    One thread makes a search's fits and predictions the same on any machine and suits the
    searches' parallel processes."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit(
    x: np.ndarray,
    y: np.ndarray,
    *,
    members: int = 5,
    hidden: tuple[int, ...] = (32, 32),
    epochs: int = 200,
    lr: float = 0.01,
    weight_decay: float = 1e-4,
    seed: int = 0,
    threads: int | None = 1,
) -> Ensemble:
    """Fit `members` MLPs (full batch Adam, standardised targets) and return the ensemble.
    `threads` (torch_threads): 1 for the searches' small fits; None, all cores, for the measured
    rule's one fit over a whole benchmark (1.7x faster on 2 cores)."""
    import torch

    with torch_threads(threads):
        gen = torch.Generator().manual_seed(int(seed))
        y = np.asarray(y, dtype=np.float64)
        mean, scale = float(y.mean()), float(y.std()) or 1.0
        xt = torch.as_tensor(x, dtype=torch.float32).expand(members, -1, -1)
        yt = torch.as_tensor((y - mean) / scale, dtype=torch.float32)[None, :, None].expand(members, -1, -1)
        dims = [x.shape[1], *hidden, 1]
        weights = []
        for a, b in zip(dims[:-1], dims[1:]):
            w = (torch.randn(members, a, b, generator=gen) * (2.0 / a) ** 0.5).requires_grad_()
            bias = torch.zeros(members, 1, b, requires_grad=True)
            weights.append((w, bias))
        params = [t for pair in weights for t in pair]
        state = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
        for step in range(1, epochs + 1):
            loss = ((_forward(weights, xt) - yt) ** 2).mean()
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                adam_step(params, grads, state, step, lr=lr, weight_decay=weight_decay)
    return Ensemble([(w.detach(), b.detach()) for w, b in weights], mean, scale)


def adam_step(params, grads, state, step: int, *, lr: float, weight_decay: float, betas=(0.9, 0.999), eps=1e-8):
    """One in-place Adam update, the one torch.optim.Adam makes by default (L2 weight decay added to
    the gradient; no amsgrad, no maximize): `state` holds each parameter's (first, second) moments,
    `step` counts from 1. Written here because constructing any torch.optim optimizer imports
    torch._dynamo, 2-4 s on a 2-core machine before `scaler solve --rule measured` could start its fit."""
    b1, b2 = betas
    for p, g, (m, v) in zip(params, grads, state):
        g = g.add(p, alpha=weight_decay) if weight_decay else g
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (v.sqrt() / (1 - b2**step) ** 0.5).add_(eps)
        p.addcdiv_(m, denom, value=-lr / (1 - b1**step))


def _forward(weights, h):
    import torch

    for i, (w, b) in enumerate(weights):
        h = torch.baddbmm(b, h, w)
        if i < len(weights) - 1:
            h = torch.relu(h)
    return h


def kendall_of_fit(pred: np.ndarray, truth: np.ndarray) -> float:
    """Rank agreement of predictions with held-out truth (Kendall tau-b)."""
    from studies.analysis import kendall_tau

    return kendall_tau(pred, truth)
