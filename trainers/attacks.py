"""L-infinity attacks: FGSM, PGD (CE), CW-PGD (margin), the TRADES KL attack, and AutoAttack.

Every attack runs with the model in eval mode and its parameters frozen (only input gradients are
computed), restores both afterwards, and projects every iterate to the eps-ball and to [0, 1].
Randomness comes from an explicit `torch.Generator`, so attacks are reproducible.
"""

from __future__ import annotations

import functools
import logging
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

from scaler.errors import ScalerError
from trainers.config import parse_eps  # noqa: F401  (re-exported: attacks take sizes as text too)
from trainers.cuda_graphs import graph_for
from trainers.fused import fused_blocks


@contextmanager
def frozen_eval(model: torch.nn.Module):
    """Eval mode with parameters frozen; restores mode and requires_grad flags on exit."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def folded_batchnorm(model: torch.nn.Module):
    """Within an eval-mode attack, run every BatchNorm as its exact per-channel affine map
    x * scale + shift (one fused elementwise op forward and backward), and an emitted model's
    blocks through the fast runtime (`trainers.fused.fused_blocks`: on where it measured faster,
    or as an enclosing span chose), their conv-BN folds built once for all steps. Same function as
    eval-mode BN; native BN backward is several times slower on the CPU in bf16. Restored on exit."""
    patched = []
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_var is not None and not m.training:
            scale = torch.rsqrt(m.running_var + m.eps)
            if m.weight is not None:
                scale = scale * m.weight
            shift = -m.running_mean * scale
            if m.bias is not None:
                shift = shift + m.bias
            patched.append((m, m.__dict__.get("forward")))  # an outer folding's patch comes back on exit
            m.forward = functools.partial(_affine, scale.detach(), shift.detach())
    try:
        with fused_blocks(model):
            yield model
    finally:
        for m, previous in patched:
            if previous is None:
                del m.forward
            else:
                m.forward = previous


def _affine(scale: torch.Tensor, shift: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x * scale + shift per channel (dim 1), for inputs of any rank (BatchNorm1d/2d/3d)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return torch.addcmul(shift.to(x.dtype).view(shape), x, scale.to(x.dtype).view(shape))


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0, 1)


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CW margin loss with kappa = 0, summed: -max(z_y - max_{k != y} z_k, 0)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return -(true - other).clamp(min=0).sum()


def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="sum")


LOSSES = {"ce": ce_loss, "cw": margin_loss}


def random_start(x, eps, start: str, generator, std: float | None = None):
    if start == "uniform":
        noise = torch.rand(x.shape, device=x.device, generator=generator, dtype=x.dtype).mul_(2 * eps).sub_(eps)
    elif start == "normal":
        noise = torch.randn(x.shape, device=x.device, generator=generator, dtype=x.dtype).mul_(std)
    elif start == "none":
        return x.clone()
    else:
        raise ScalerError(f"unknown start {start!r}")
    return project(x + noise, x, eps)


def pgd(
    model,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    step: float,
    steps: int,
    loss: str = "ce",
    start: str = "uniform",
    start_std: float | None = None,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
    fold_bn: bool = False,
) -> torch.Tensor:
    """L-inf PGD with sign steps on CE or the CW margin; returns the adversarial batch (detached).
    `fold_bn` runs BatchNorm as its affine map during the attack, `autocast_dtype` its forward and
    backward in that dtype (x_adv, the step and the projection stay in x's dtype); the speed paths of
    training and evaluation. No host synchronisation inside the loop."""
    loss_fn = LOSSES[loss]
    x = x.detach()

    def pgd_step(x_adv, x, y):
        x_adv = x_adv.detach().requires_grad_(True)
        with _autocast(x, autocast_dtype):
            value = loss_fn(model(x_adv).float(), y)
        (grad,) = torch.autograd.grad(value, x_adv)
        return project(x_adv.detach() + step * grad.sign(), x, eps)

    def folded_step(x_adv, x, y):  # what a CUDA graph records: the fold too, its tensors in the graph's memory
        with _maybe_fold(model, fold_bn):
            return pgd_step(x_adv, x, y)

    with frozen_eval(model):
        x_adv = random_start(x, eps, start, generator, start_std)
        settings = (loss, eps, step, autocast_dtype, fold_bn)
        graphed = graph_for(model, x, y, settings, folded_step) if steps > 1 else None
        if graphed is not None:  # a `graphed_attacks` span on a GPU: the recorded step, replayed
            return graphed.run(x, y, x_adv, steps)
        with _maybe_fold(model, fold_bn):
            for _ in range(steps):
                x_adv = pgd_step(x_adv, x, y)
    return x_adv.detach()


def fgsm(model, x, y, *, eps: float, autocast_dtype: torch.dtype | None = None, fold_bn: bool = False) -> torch.Tensor:
    """One step of size eps along the sign of the CE gradient, no random start."""
    return pgd(model, x, y, eps=eps, step=eps, steps=1, start="none", autocast_dtype=autocast_dtype, fold_bn=fold_bn)


def trades_attack(
    model, x, *, eps: float, step: float, steps: int, generator=None, autocast_dtype=None, fold_bn: bool = False
) -> torch.Tensor:
    """TRADES inner maximisation: from x + 0.001 N(0, I), sign steps on KL(p(x) || p(x'))."""
    x = x.detach()
    with frozen_eval(model), _maybe_fold(model, fold_bn):
        with torch.no_grad(), _autocast(x, autocast_dtype):
            p_nat = F.softmax(model(x).float(), dim=1)
        noise = torch.randn(x.shape, device=x.device, generator=generator, dtype=x.dtype) * 0.001
        x_adv = (x + noise).detach()
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with _autocast(x, autocast_dtype):
                logits = model(x_adv).float()
            value = F.kl_div(F.log_softmax(logits, dim=1), p_nat, reduction="sum")
            (grad,) = torch.autograd.grad(value, x_adv)
            x_adv = project(x_adv.detach() + step * grad.sign(), x, eps)
    return x_adv.detach()


def _maybe_fold(model, enabled: bool):
    return folded_batchnorm(model) if enabled else nullcontext()


def _autocast(x: torch.Tensor, dtype: torch.dtype | None):
    return torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None)


# --------------------------------------------------------------------------- AutoAttack
class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage().strip())


class Autocast(torch.nn.Module):
    """`model` with its forward (and so its backward) under autocast to `dtype` and fp32 logits:
    for code that calls the model itself (AutoAttack)."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.model(x).float()


def autoattack(
    model,
    x,
    y,
    *,
    eps: float,
    version: str = "standard",
    seed: int = 0,
    batch_size: int = 250,
    progress: bool = False,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """AutoAttack through `pyautoattack` (seeded). version: 'standard' (APGD-CE, APGD-T, FAB-T,
    Square) or 'compact' (NARes AA-Compact: APGD-CE with 1 restart + APGD-T with 9 targets).
    Returns the adversarial batch and AutoAttack's own warning messages (its sanity checks).
    `autocast_dtype` runs the model under autocast (its logits and AutoAttack's own arithmetic stay
    fp32); without it the model is called as given, exactly as pyautoattack run directly would."""
    from pyautoattack import AutoAttack

    if autocast_dtype is not None:
        model = Autocast(model, autocast_dtype)
    with frozen_eval(model), fused_blocks(model):  # the same function: fused blocks, folds built once
        if version == "standard":
            aa = AutoAttack(model, eps=eps, norm="Linf", seed=seed, version="standard", device=x.device)
        elif version == "compact":
            aa = AutoAttack(
                model, eps=eps, norm="Linf", seed=seed, version="custom", device=x.device, attacks=["apgd-ce", "apgd-t"]
            )
            aa.apgd.n_restarts = 1
            aa.apgd_targeted.n_target_classes = 9
            aa.apgd_targeted.n_restarts = 1
        else:
            raise ScalerError(f"unknown AutoAttack version {version!r}")
        aa.verbose = False
        handler = _Collect()
        logger = logging.getLogger("auto-attack")
        logger.addHandler(handler)
        bars = _AutoAttackProgress(aa, model, x, y, batch_size) if progress else None
        try:
            x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=batch_size)
        finally:
            logger.removeHandler(handler)
            if bars is not None:
                bars.remove()
    return x_adv.detach(), handler.messages


class _AutoAttackProgress:
    """A progress bar per AutoAttack attack, with its ETA, on stderr. Each attack runs only on the
    points still robust, so its bar's total is that count, known when the attack starts: clean-correct
    points minus those the earlier attacks fooled. Within a batch the bar moves with the model's calls,
    as a share of the calls the attack makes on a batch nobody fools early (`attack_calls`), so a
    single batch (at most `batch_size` points) shows an ETA too. Wraps the attacks' `perturb` and
    counts calls with a forward pre-hook; results are unchanged."""

    ATTACKS = {"apgd": "APGD-CE", "apgd_targeted": "APGD-T", "fab": "FAB-T", "square": "Square"}

    def __init__(self, aa, model, x, y, batch_size: int):
        with torch.no_grad():
            preds = torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
        self.robust = int((preds == y).sum())
        self.model, self.bar, self.current = model, None, None
        self.batch: tuple[float, int, int | None] | None = None  # (bar position at its start, points, calls expected)
        self.calls = 0
        for attr, label in self.ATTACKS.items():
            attack = getattr(aa, attr, None)
            if attack is not None:
                attack.perturb = self._wrap(attack.perturb, label, attr, attack)
        try:
            self.hook = model.register_forward_pre_hook(self._tick)
        except RuntimeError:  # TorchScript modules take no hooks: the bars move once per batch
            self.hook = None

    def _wrap(self, perturb, label: str, name: str, attack):
        def run(x, y, *args, **kwargs):
            if self.current != label:
                self._open(label)
            # AutoAttack sets an attack's settings (FAB's `targeted`) only when it starts that attack
            try:
                expected = attack_calls(name, attack)
            except (AttributeError, TypeError):  # another pyautoattack's settings: once per batch
                expected = None
            self.batch, self.calls = (self.bar.n, len(y), expected), 0
            try:
                adv = perturb(x, y, *args, **kwargs)
            finally:
                start = self.batch[0]
                self.batch = None
            with torch.no_grad():
                fooled = int((self.model(adv).argmax(1) != y).sum())
            self.robust -= fooled
            self.bar.update(start + len(y) - self.bar.n)
            self.bar.set_postfix(robust=self.robust)
            return adv

        return run

    def _tick(self, module, args) -> None:
        if self.batch is None or self.batch[2] is None:  # outside an attack, or calls not known
            return
        start, points, expected = self.batch
        self.calls += 1
        position = start + points * min(self.calls / expected, 0.99)  # the rest when the batch returns
        if position > self.bar.n:
            self.bar.update(position - self.bar.n)

    def _open(self, label: str) -> None:
        import sys

        from tqdm import tqdm

        self.close()
        self.current = label
        self.bar = tqdm(
            total=self.robust,
            desc=f"AutoAttack {label}",
            unit="pt",
            leave=False,
            file=sys.stderr,
            smoothing=0,  # the rate since the start: an attack's calls vary in cost, so recent rates jump
            bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]",
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def remove(self) -> None:
        self.close()
        if self.hook is not None:
            self.hook.remove()


def attack_calls(name: str, attack) -> int:
    """The model calls pyautoattack's attack `name` makes on one batch that none of its restarts or
    target classes fools early (fewer when they do): each perturb one prediction first; per run APGD
    a gradient at its start and one per iteration, each `eot_iter` times (APGD-T one prediction more,
    for its target); FAB a gradient and a prediction per iteration plus three; Square one query per
    iteration plus two."""
    if name == "square":
        return 1 + attack.n_restarts * (attack.n_queries + 2)
    targeted = name == "apgd_targeted" or (name == "fab" and attack.targeted)
    runs = attack.n_restarts * (attack.n_target_classes if targeted else 1)
    if name == "fab":
        return 1 + runs * (2 * attack.n_iter + 3)
    return 1 + runs * ((1 + attack.n_iter) * attack.eot_iter + targeted)
