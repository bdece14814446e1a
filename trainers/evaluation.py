"""Robustness evaluation: accuracy, stable accuracy and empirical Lipschitz constant per attack.

Definitions (Huang et al., NeurIPS 2021; NARes): stable accuracy is the share of points whose prediction under
attack equals the clean prediction, right or wrong; LIP is the mean over samples of
||f(x) - f(x')||_1 / (||x - x'||_inf + 1e-6) on logits.

Speed without changing what is computed: the attacks run with parameters frozen (input gradients
only), eval-mode BatchNorm as its exact affine map, channels_last tensors for CNNs (NCHW where
`trainers.step.channels_last_hazard` says so) and no host synchronisation inside an attack; fp32
results equal the plain NCHW path's to float rounding. `precision="bf16"` autocasts the attacks'
and the logits' forward and backward (perturbations, projections and logits stay fp32). The
default is fp32; AutoAttack in fp32 calls the model as given, as pyautoattack run directly does.
"""

from __future__ import annotations

import re
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from scaler.errors import Interrupted, ScalerError
from trainers.attacks import autoattack, folded_batchnorm, pgd
from trainers.compiled import compile_model
from trainers.cuda_graphs import graphed_attacks
from trainers.fused import fused_blocks, resolve_fused


@dataclass(frozen=True)
class StepAttack:
    """An evaluation attack run by our PGD loop: its steps, the step size as a fraction of eps,
    the loss (ce or the CW margin) and whether it starts uniformly in the eps-ball."""

    steps: int
    step: float
    loss: str = "ce"
    random_start: bool = True


STEP_ATTACKS = {  # the one table of our evaluation attacks; bench's reference loop runs it too
    "clean": StepAttack(0, 0.0, random_start=False),
    "fgsm": StepAttack(1, 1.0, random_start=False),
    "pgd20": StepAttack(20, 0.1),
    "cw40": StepAttack(40, 0.1, loss="cw"),
}
ATTACKS = (*STEP_ATTACKS, "aa", "aa-compact")
DEFAULT_ATTACKS = ("clean", "pgd20", "cw40")
PRECISIONS = ("fp32", "bf16")
DEFAULT_BATCH_SIZE = 256  # on a GPU
CPU_BATCH_SIZE = 32  # attacks on a CPU run fastest on small, cache-sized batches (README: bench eval)


def default_batch_size(device) -> int:
    """The evaluation batch size that measured fastest on the device type."""
    return CPU_BATCH_SIZE if torch.device(device).type == "cpu" else DEFAULT_BATCH_SIZE


def parse_attacks(text: str) -> list[str]:
    names = [a.strip().lower() for a in text.split(",") if a.strip()]
    if not names:
        raise ScalerError("--attacks is empty")
    for a in names:
        if a not in ATTACKS:
            raise ScalerError(f"unknown attack {a!r}; choose from {','.join(ATTACKS)}")
    return list(dict.fromkeys(names))


def precision_dtype(precision: str, device="cpu") -> torch.dtype | None:
    """The autocast dtype of an evaluation precision on a device (None = fp32): --precision means
    what it means in training (`trainers.step.resolve_precision`); evaluation defaults to fp32."""
    from trainers.step import resolve_precision

    return resolve_precision(precision, torch.device(device))


def resolve_val_precision(val_precision: str, precision: str, device) -> str:
    """The precision of per-epoch validation: 'auto' is bf16 when the training precision resolves
    to bf16 here (trainers.step.resolve_precision), else fp32."""
    from trainers import step

    if val_precision == "auto":
        return "bf16" if step.resolve_precision(precision, torch.device(device)) == torch.bfloat16 else "fp32"
    precision_dtype(val_precision)
    return val_precision


def eval_layout(model, x: torch.Tensor, channels_last: bool = True) -> bool:
    """Whether evaluation runs channels_last: asked for, 4-d inputs, a model with 2-d convolutions,
    and no layout hazard for it here (the rule training follows; said nowhere, NCHW is as exact)."""
    from trainers.step import channels_last_hazard

    if not channels_last or x.dim() != 4:
        return False
    if not any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
        return False
    return channels_last_hazard(model, x.device) is None


@contextmanager
def in_layout(model, channels_last: bool):
    """The model's 4-d parameters and buffers in channels_last inside; a model that was NCHW
    (contiguous) before is NCHW again on exit."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.dim() == 4]
    contiguous = all(t.is_contiguous() for t in tensors)
    if not channels_last or not tensors:
        yield model
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        if contiguous:
            model.to(memory_format=torch.contiguous_format)


@torch.no_grad()
def logits_of(
    model,
    x: torch.Tensor,
    batch_size: int = DEFAULT_BATCH_SIZE,
    *,
    autocast_dtype: torch.dtype | None = None,
    fold_bn: bool = False,
) -> torch.Tensor:
    """fp32 logits of x in eval mode, in batches (under autocast to `autocast_dtype` if given)."""
    was = model.training
    model.eval()
    try:
        with folded_batchnorm(model) if fold_bn else nullcontext():
            with torch.autocast(x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = torch.cat([model(x[i : i + batch_size]).float() for i in range(0, len(x), batch_size)])
    finally:
        model.train(was)
    return out


def adversarial(
    model,
    name: str,
    x,
    y,
    *,
    eps: float,
    seed: int,
    batch_size: int,
    messages: list[str],
    progress: bool = False,
    autocast_dtype: torch.dtype | None = None,
    fold_bn: bool = False,
):
    """The adversarial version of (x, y) under attack `name`, in batches, seeded. `progress` shows
    a bar per attack with its ETA on stderr; `autocast_dtype` and `fold_bn` are the attacks' speed
    options (AutoAttack takes the first only)."""
    if name == "clean":
        return x
    if name in ("aa", "aa-compact"):
        x_adv, msgs = autoattack(
            model,
            x,
            y,
            eps=eps,
            version="standard" if name == "aa" else "compact",
            seed=seed,
            batch_size=batch_size,
            progress=progress,
            autocast_dtype=autocast_dtype,
        )
        messages.extend(f"AutoAttack: {m}" for m in msgs)
        return x_adv
    if name not in STEP_ATTACKS:
        raise ScalerError(f"unknown attack {name!r}")
    attack = STEP_ATTACKS[name]
    gen = torch.Generator(device=x.device).manual_seed(seed)
    out = []
    for i in _bar(range(0, len(x), batch_size), name, progress):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        start = "uniform" if attack.random_start else "none"
        out.append(
            pgd(
                model,
                xb,
                yb,
                eps=eps,
                step=attack.step * eps,
                steps=attack.steps,
                loss=attack.loss,
                start=start,
                generator=gen,
                autocast_dtype=autocast_dtype,
                fold_bn=fold_bn,
            )
        )
    return torch.cat(out)


def _bar(iterable, desc: str, enabled: bool):
    if not enabled:
        return iterable
    import sys

    from tqdm import tqdm

    return tqdm(iterable, desc=desc, unit="batch", leave=False, file=sys.stderr)


def lipschitz(f_x: torch.Tensor, f_adv: torch.Tensor, x: torch.Tensor, x_adv: torch.Tensor) -> float:
    num = (f_x - f_adv).flatten(1).abs().sum(1)
    den = (x - x_adv).flatten(1).abs().amax(1) + 1e-6
    return (num / den).mean().item()


def evaluate(
    model,
    x: torch.Tensor,
    y: torch.Tensor,
    attacks=DEFAULT_ATTACKS,
    *,
    eps: float = 8 / 255,
    seed: int = 0,
    batch_size: int | None = None,
    per_block: bool = False,
    progress: bool = False,
    precision: str = "fp32",
    channels_last: bool = True,
    fold_bn: bool = True,
    compile: bool = False,
    fused: bool | None = None,
    cuda_graphs: bool = False,
) -> dict:
    """{attack: {accuracy, stable, lip, loss, n}} plus 'warnings' (gradient-masking sanity flags);
    loss is the mean cross-entropy of the (attacked) logits, as NARes records it. `precision`
    fp32 or bf16 (autocast); `channels_last` and `fold_bn` are the exact speed paths (on by
    default; off, evaluation runs as plain NCHW eval-mode code); `batch_size` defaults to
    `default_batch_size` of x's device, and to 256 for AutoAttack (whose random restarts are seeded
    per batch: the batches pyautoattack users run, and this project's AA results so far). The model
    comes back in its mode and layout. `compile` runs the logits and our attacks (not AutoAttack:
    pyautoattack calls the model as given) through torch.compile, one static graph per batch shape,
    with BatchNorm left to the compiler (not folded) as in compiled training. `fused` runs the
    blocks through the fast runtime (`trainers.fused`): None where it measured faster, or as an
    enclosing span (a training run) chose. `cuda_graphs` replays our PGD/CW steps on a GPU as
    recorded CUDA graphs (`trainers.cuda_graphs`; ignored on a CPU)."""
    dtype = precision_dtype(precision, x.device)
    aa_batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    batch_size = default_batch_size(x.device) if batch_size is None else batch_size
    if batch_size < 1:
        raise ScalerError("--batch-size must be >= 1")
    for name in attacks:
        if name not in ATTACKS:
            raise ScalerError(f"unknown attack {name!r}; choose from {','.join(ATTACKS)}")
    layout = eval_layout(model, x, channels_last)
    xs = x.contiguous(memory_format=torch.channels_last) if layout else x
    ours = compile_model(model, dynamic=False) if compile else model  # shares model's parameters
    settings = dict(layout=layout, dtype=dtype, fold_bn=fold_bn, compiled=compile, eps=eps, seed=seed)
    run = _Evaluation(model, ours, x, xs, y, batch_sizes=(batch_size, aa_batch_size), progress=progress, **settings)
    chosen = None if fused is None and not compile else resolve_fused(fused, x.device, compiled=compile)
    results: dict = {}
    with fused_blocks(model, chosen), graphed_attacks(cuda_graphs):
        run.clean()
        current = None
        try:
            for current in attacks:
                results[current] = run.attack(current, per_block)
        except KeyboardInterrupt:
            finished = {k: v for k, v in results.items() if k != current}
            finished["warnings"] = run.messages + sanity_flags(finished)
            raise EvaluationStopped(current, finished) from None
    results["warnings"] = run.messages + sanity_flags(results)
    return results


@dataclass
class _Evaluation:
    """One `evaluate` call's data and settings: the clean logits once, then each attack's figures."""

    model: torch.nn.Module
    ours: torch.nn.Module  # the model, or it compiled (our attacks and logits)
    x: torch.Tensor
    xs: torch.Tensor  # x in the evaluation layout
    y: torch.Tensor
    layout: bool
    dtype: torch.dtype | None
    fold_bn: bool
    compiled: bool
    eps: float
    seed: int
    batch_sizes: tuple[int, int]  # ours, AutoAttack's
    progress: bool
    messages: list = field(default_factory=list)

    def clean(self) -> None:
        with in_layout(self.model, self.layout):
            self.clean_logits = logits_of(self.ours, self.xs, self.batch_sizes[0], **self._speed(False))
        self.clean_pred = self.clean_logits.argmax(1)

    def _speed(self, is_aa: bool) -> dict:
        """AutoAttack calls the model uncompiled; BatchNorm is left to the compiler when compiled."""
        return dict(autocast_dtype=self.dtype, fold_bn=self.fold_bn and (is_aa or not self.compiled))

    def attack(self, name: str, per_block: bool) -> dict:
        is_aa = name in ("aa", "aa-compact")
        plain = is_aa and self.dtype is None  # exact AutoAttack: the model as given
        net, speed = (self.model, self._speed(True)) if is_aa else (self.ours, self._speed(False))
        with in_layout(self.model, self.layout and not plain):
            x_in = self.x if is_aa else self.xs  # AutoAttack views its tensors: NCHW in
            batch = self.batch_sizes[1] if is_aa else self.batch_sizes[0]
            x_adv = adversarial(
                net, name, x_in, self.y, eps=self.eps, seed=self.seed, batch_size=batch,
                messages=self.messages, progress=self.progress, **speed,
            )  # fmt: skip
            if name == "clean":
                adv_logits = self.clean_logits
            else:
                fold = speed["fold_bn"] and not plain
                adv_logits = logits_of(net, x_adv, self.batch_sizes[0], autocast_dtype=self.dtype, fold_bn=fold)
            pred = adv_logits.argmax(1)
            result = {
                "accuracy": 100.0 * (pred == self.y).float().mean().item(),
                "stable": 100.0 * (pred == self.clean_pred).float().mean().item(),
                "lip": 0.0 if name == "clean" else lipschitz(self.clean_logits, adv_logits, self.x, x_adv),
                "loss": torch.nn.functional.cross_entropy(adv_logits, self.y).item(),
                "n": len(self.y),
            }
            if per_block and name == "pgd20":
                result["per_block_lip"] = per_block_lipschitz(self.model, x_in, x_adv, self.batch_sizes[0])
        return result


class EvaluationStopped(Interrupted):
    """Ctrl-C (or SIGTERM) during an evaluation; `results` holds the attacks that finished."""

    def __init__(self, attack: str | None, results: dict):
        self.attack, self.results, self.info = attack, results, {}  # info: the checkpoint's, where known
        done = [k for k in results if k != "warnings"]
        super().__init__(f"stopped during {attack}; finished: {', '.join(done) or 'none'}")


def sanity_flags(results: dict) -> list[str]:
    """Warnings that suggest gradient masking or a broken evaluation."""
    flags = []
    clean = results.get("clean", {}).get("accuracy")
    for name, r in results.items():
        if name in ("clean", "warnings") or clean is None:
            continue
        if r["accuracy"] > clean + 1e-9:
            flags.append(f"{name} accuracy {r['accuracy']:.2f}% is above clean {clean:.2f}%: evaluation is broken")
    if "fgsm" in results and "pgd20" in results and results["pgd20"]["accuracy"] > results["fgsm"]["accuracy"] + 0.5:
        flags.append("PGD-20 is weaker than FGSM: a sign of gradient masking")
    for strong in ("aa", "aa-compact"):
        for weak in ("pgd20", "cw40"):
            if strong in results and weak in results and results[strong]["accuracy"] > results[weak]["accuracy"] + 0.5:
                flags.append(f"{strong} is weaker than {weak}: check the evaluation")
    return flags


_BLOCK_RE = re.compile(r"^stage\d+\.\d+$")


@torch.no_grad()
def per_block_lipschitz(model, x, x_adv, batch_size: int = DEFAULT_BATCH_SIZE) -> dict[str, float]:
    """LIP at every residual block output (Huang et al., NeurIPS 2021, Fig. 5): mean ||phi(x) - phi(x')||_1 / ||x - x'||_inf."""
    blocks = {n: m for n, m in model.named_modules() if _BLOCK_RE.match(n)}
    if not blocks:
        raise ScalerError("--per-block-lipschitz needs a model with stageN.M residual blocks (an emitted model)")
    sums = {n: 0.0 for n in blocks}
    was = model.training
    model.eval()
    for i in range(0, len(x), batch_size):
        feats: dict[str, list] = {n: [] for n in blocks}

        def keep(name, store=feats):
            return lambda _m, _i, out: store[name].append(out.float())

        hooks = [m.register_forward_hook(keep(n)) for n, m in blocks.items()]
        try:
            model(x[i : i + batch_size])
            model(x_adv[i : i + batch_size])
        finally:
            for h in hooks:
                h.remove()
        den = (x[i : i + batch_size] - x_adv[i : i + batch_size]).flatten(1).abs().amax(1) + 1e-6
        for n, (a, b) in feats.items():
            sums[n] += ((a - b).flatten(1).abs().sum(1) / den).sum().item()
    model.train(was)
    return {n: s / len(x) for n, s in sums.items()}
