"""One adversarial training step, shared by `scaler train` and `scaler bench train`.

What makes it fast without changing what is computed: the attack runs with parameters frozen
(input gradients only) and eval-mode BatchNorm folded to its affine map, forward/backward under bf16 autocast where the hardware has it (the
perturbation, projections, losses, BN statistics and optimizer state stay fp32), channels_last
tensors, a foreach/fused optimizer, and no host synchronisation: running sums live on the device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainers.attacks import pgd, trades_attack
from trainers.config import PRECISIONS
from trainers.losses import LOSSES, WarLambda


def cpu_has_bf16() -> bool:
    """AMX or AVX-512-BF16 on this CPU (Linux flags)."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision on a device (None = fp32): --precision means this in train,
    eval and bench alike, auto being bf16 where the device has it."""
    if precision not in PRECISIONS:
        from scaler.errors import ScalerError

        raise ScalerError(f"unknown precision {precision!r}; choose {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_bf16() else None


def resolve_device(name: str, *, compile: bool = False) -> torch.device:
    """The device a command runs on (auto: a GPU where there is one), with cuDNN's autotuner on
    there; an explicit --compile is refused where torch.compile cannot build."""
    from scaler.errors import ScalerError

    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif name == "cuda" and not torch.cuda.is_available():
        raise ScalerError("--device cuda asked for, but no CUDA GPU is available")
    else:
        device = torch.device(name)
    if compile:
        require_compiler(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device


def channels_last_hazard(model, device) -> str | None:
    """Why channels_last must not be used for this model here, or None.

    torch 2.13's CPU backward of a 1x1 stride-2 convolution with fewer than 16 input channels
    segfaults in channels_last for some batch sizes (e.g. Conv2d(8, 16, 1, 2) at batch 39). Only
    tiny basic-block models (a stage planes < 16) have such a shortcut; they train in NCHW."""
    if device.type != "cpu":
        return None
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and m.stride != (1, 1) and m.in_channels < 16:
            return f"{name} is a 1x1 strided conv on {m.in_channels} channels (torch CPU channels_last bug)"
    return None


def training_layout(model, device, channels_last: bool) -> bool:
    """Whether training uses channels_last: asked for and safe for this model here. The one place
    that decides it (train and bench both ask); a refusal is said once on stderr."""
    if not channels_last:
        return False
    hazard = channels_last_hazard(model, device)
    if hazard:
        import sys

        print(f"note: training in NCHW, not channels_last: {hazard}", file=sys.stderr)
        return False
    return True


COMPILE_SPEEDUP = {("cpu", "basic"): 1.15, ("cpu", "robust"): 0.60}
"""Steady-state speedup of a torch.compile'd training step over the eager one, per device type
and block family, measured on the 2-core AVX-512/AMX CPU (PGD-10, batch 64, bf16, channels_last,
the benchmarks' bar models; compile took 20-80 s). Families and devices not listed are unmeasured."""
COMPILE_MIN_STEPS = 2000
"""Auto-compile needs a run this long: a cold compile repays itself after ~250-1000 steps here."""
BLOCK_FAMILIES = {"BasicBlock": "basic", "RobustResBlock": "robust", "InvertedBlock": "inverted"}


def block_families(model) -> set[str]:
    """The residual block families of an emitted model (empty for anything else)."""
    return {BLOCK_FAMILIES[type(m).__name__] for m in model.modules() if type(m).__name__ in BLOCK_FAMILIES}


def can_compile(device) -> bool:
    """Whether torch.compile can build code here: Inductor's CPU code needs a C++ compiler."""
    import shutil

    return torch.device(device).type != "cpu" or bool(shutil.which("g++") or shutil.which("c++"))


def require_compiler(device) -> None:
    """Refuse an explicit --compile where torch.compile cannot build (before anything is written)."""
    from scaler.errors import ScalerError

    if not can_compile(device):
        raise ScalerError("--compile on a CPU needs a C++ compiler (g++ or c++ on PATH) for torch.compile's code")


def resolve_compile(choice: bool | None, model, device, total_steps: int) -> bool:
    """Whether training uses torch.compile. None (auto) compiles where it measured faster
    (COMPILE_SPEEDUP > 1 for every block family of the model on this device type), the run is
    long enough to repay the compilation and a C++ compiler is there for Inductor's CPU code;
    True without that compiler is refused."""
    if choice is not None:
        if choice:
            require_compiler(device)
        return bool(choice)
    families = block_families(model)
    wins = bool(families) and all(COMPILE_SPEEDUP.get((device.type, f), 0.0) > 1.0 for f in families)
    return bool(wins and total_steps >= COMPILE_MIN_STEPS and can_compile(device))


def make_optimizer(model, cfg) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        # BN weights/biases and linear biases are the 1-d parameters.
        (no_decay if cfg.wd_exclude_bn_bias and p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    kwargs = dict(lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    try:
        return torch.optim.SGD(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.SGD(groups, foreach=True, **kwargs)


class Stepper:
    """Holds the model, optimizer and attack settings; `step(x, y)` does attack + update."""

    def __init__(
        self,
        model,
        optimizer,
        cfg,
        *,
        device,
        autocast_dtype,
        attack_generator,
        war: WarLambda | None,
        attack_model=None,
        ema=None,
    ):
        self.model = model  # possibly DDP-wrapped: used for the outer loss
        self.attack_model = attack_model if attack_model is not None else model  # attacks need no grad sync
        self.opt = optimizer
        self.cfg = cfg
        self.device = device
        self.dtype = autocast_dtype
        self.gen = attack_generator
        self.war = war
        self.ema = ema
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.loss_fn = LOSSES.get(cfg.method)
        # Eval-mode BN as a fused affine map in attacks; a compiled model fuses it by itself.
        self.fold_bn = not cfg.compile
        self.reset_stats()

    def reset_stats(self):
        z = torch.zeros((), device=self.device, dtype=torch.float64)
        self.loss_sum, self.correct, self.seen = z.clone(), z.clone(), 0

    def adversarial(self, x, y):
        cfg = self.cfg
        if cfg.method == "standard" or cfg.attack_steps == 0:
            return x
        if cfg.method == "trades":
            return trades_attack(
                self.attack_model,
                x,
                eps=cfg.eps,
                step=cfg.attack_step,
                steps=cfg.attack_steps,
                generator=self.gen,
                autocast_dtype=self.dtype,
                fold_bn=self.fold_bn,
            )
        start = cfg.attack_start
        if cfg.method == "mart" and start == "normal":
            std = 0.001  # MART's published start
        else:
            std = cfg.attack_step
        return pgd(
            self.attack_model,
            x,
            y,
            eps=cfg.eps,
            step=cfg.attack_step,
            steps=cfg.attack_steps,
            loss="ce",
            start=start,
            start_std=std,
            generator=self.gen,
            autocast_dtype=self.dtype,
            fold_bn=self.fold_bn,
        )

    def loss(self, x, x_adv, y):
        cfg = self.cfg
        if cfg.method == "standard":
            logits = self.model(x).float()
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            return loss, loss, None, logits
        weight = self.war.value if self.war is not None else cfg.beta
        return self.loss_fn(self.model, x, x_adv, y, weight)

    def step(self, x, y, lr: float | None = None):
        if self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x_adv = self.adversarial(x, y)
        self.model.train()
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            total, l_nat, l_rob, logits = self.loss(x, x_adv, y)
        if lr is not None:
            for g in self.opt.param_groups:
                g["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip, foreach=True)
        self.opt.step()
        if self.ema is not None:
            self.ema.update(self.attack_model)
        if self.war is not None and l_rob is not None:
            self.war.update(l_nat, l_rob)
        with torch.no_grad():  # running sums stay on the device: no host sync per step
            self.loss_sum += total.detach().double() * len(y)
            self.correct += (logits.argmax(1) == y).sum()
            self.seen += len(y)
        return total


class Ema:
    """Exponential moving average of weights (buffers copied): ema = tau ema + (1 - tau) w."""

    def __init__(self, model, tau: float):
        self.tau = tau
        self.state = {
            k: v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
            for k, v in model.state_dict().items()
        }

    @torch.no_grad()
    def update(self, model):
        current = model.state_dict()
        floats = [(self.state[k], v) for k, v in current.items() if v.is_floating_point()]
        torch._foreach_lerp_([a for a, _ in floats], [b.float() for _, b in floats], 1 - self.tau)
        for k, v in current.items():
            if not v.is_floating_point():
                self.state[k].copy_(v)
