"""Training-step benchmark: the project's `Stepper` against a plain fp32 NCHW reference loop.

Both run full adversarial training steps (attack + update) on the same emitted model and the same
synthetic batch, after warm-up. The reference is written the way public reference implementations
are: parameters keep requires_grad during the attack, fp32 NCHW, a per-step `.item()`, and the
default (for-loop) SGD on the CPU.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F

from scaler.errors import ScalerError
from trainers.config import make_config
from trainers.peak import efficiency
from trainers.step import Stepper, make_optimizer, resolve_device, resolve_precision, training_layout


def _timer(device):
    """(start, stop -> seconds): CUDA events on a GPU, perf_counter on the CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def begin():
            torch.cuda.synchronize()
            start.record()

        def finish():
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000

        return begin, finish
    t = {}

    def begin_cpu():
        t["t0"] = time.perf_counter()

    def finish_cpu():
        return time.perf_counter() - t["t0"]

    return begin_cpu, finish_cpu


def training_step_flops(method: str, attack_steps: int, flops_per_image: int) -> int:
    """Multiply-adds of one training step per image, F being one forward: an attack step is a
    forward and an input-gradient backward (2F, no weight gradients), a trained forward 3F
    (forward, input and weight gradients); TRADES's attack starts with one clean forward, and
    TRADES and MART train on the clean and the adversarial batch."""
    attack = 2 * attack_steps + (1 if method == "trades" and attack_steps else 0)
    trained = 2 if method in ("trades", "mart") else 1
    return flops_per_image * (attack + 3 * trained)


def reference_step(model, opt, x, y, cfg) -> float:
    """One PGD-AT / TRADES / MART step as reference implementations write it (fp32, NCHW)."""
    from trainers.losses import LOSSES

    model.eval()
    if cfg.method == "trades":
        with torch.no_grad():
            p_nat = F.softmax(model(x), dim=1)
        x_adv = x + 0.001 * torch.randn_like(x)
    else:
        x_adv = x + cfg.attack_step * torch.randn_like(x)
    for _ in range(cfg.attack_steps):
        x_adv.requires_grad_()
        out = model(x_adv)
        if cfg.method == "trades":
            loss = F.kl_div(F.log_softmax(out, dim=1), p_nat, reduction="sum")
        else:
            loss = F.cross_entropy(out, y)
        grad = torch.autograd.grad(loss, [x_adv])[0]
        x_adv = x_adv.detach() + cfg.attack_step * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - cfg.eps), x + cfg.eps).clamp(0.0, 1.0)
    model.train()
    opt.zero_grad()
    loss = LOSSES[cfg.method](model, x, x_adv, y, cfg.beta)[0]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    return loss.item()


def bench_train(
    model,
    *,
    method="pgd-at",
    batch_size=64,
    steps=5,
    warmup=2,
    precision="auto",
    compile=False,
    channels_last=True,
    device="auto",
    reference=True,
    flops_per_image=None,
    seed=0,
    resolution=32,
) -> dict:
    """Time `steps` training steps of ours (and of the reference loop) on synthetic data."""
    if method not in ("pgd-at", "trades", "mart"):
        raise ScalerError(f"unknown method {method!r}; bench takes pgd-at, trades or mart")
    if batch_size < 1 or steps < 1 or warmup < 0:
        raise ScalerError("--batch-size and --steps must be >= 1")
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(seed)
    cfg = make_config(
        "bat",
        {
            "model": "bench",
            "method": method,
            "batch_size": batch_size,
            "precision": precision,
            "channels_last": channels_last,
            "compile": compile,
        },
    )
    x = torch.rand(batch_size, 3, resolution, resolution, device=dev)  # the resolution FLOPs are counted at
    y = torch.randint(0, 10, (batch_size,), device=dev)
    result = {"method": method, "batch_size": batch_size, "steps": steps, "device": str(dev)}

    ours_model = copy.deepcopy(model).to(dev)
    channels_last = cfg.channels_last = training_layout(ours_model, dev, channels_last)  # the Stepper reads cfg
    if channels_last:
        ours_model = ours_model.to(memory_format=torch.channels_last)
    step_model = torch.compile(ours_model) if compile else ours_model
    dtype = resolve_precision(precision, dev)
    stepper = Stepper(
        step_model,
        make_optimizer(ours_model, cfg),
        cfg,
        device=dev,
        autocast_dtype=dtype,
        attack_generator=torch.Generator(device=dev).manual_seed(seed),
        war=None,
        attack_model=step_model,
    )
    result["precision"] = "bf16" if dtype == torch.bfloat16 else "fp32"
    result["channels_last"] = channels_last
    result["compile"] = compile
    seconds = _time(lambda: stepper.step(x, y), steps, warmup, dev)
    result["seconds_per_step"] = seconds
    result["images_per_s"] = batch_size / seconds
    if flops_per_image:
        step_flops = training_step_flops(method, cfg.attack_steps, flops_per_image) * batch_size
        result["flops_per_step"] = step_flops
        result.update(efficiency(step_flops / seconds, dev.type, result["precision"]))
    if reference:
        ref_model = copy.deepcopy(model).to(dev)
        ref_opt = torch.optim.SGD(
            ref_model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=False
        )
        ref_seconds = _time(lambda: reference_step(ref_model, ref_opt, x, y, cfg), steps, warmup, dev)
        result["reference_images_per_s"] = batch_size / ref_seconds
        result["speedup"] = ref_seconds / seconds
        if flops_per_image:
            ref = efficiency(step_flops / ref_seconds, dev.type, "fp32")
            result["reference_gflops_per_s"] = ref["gflops_per_s"]
            result["reference_fraction_of_peak"] = ref["fraction_of_peak"]
    return result


def _time(fn, steps: int, warmup: int, dev) -> float:
    for _ in range(warmup):
        fn()
    begin, finish = _timer(dev)
    begin()
    for _ in range(steps):
        fn()
    return finish() / steps
