"""Training-step benchmark: the project's `Stepper` against a plain fp32 NCHW reference loop.

Both run full adversarial training steps (attack + update) on the same emitted model and the same
synthetic batch, after warm-up. The reference is written the way public reference implementations
are: parameters keep requires_grad during the attack, fp32 NCHW, a per-step `.item()`, and the
default (for-loop) SGD on the CPU.
"""

from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scaler.errors import ScalerError
from trainers.compiled import compile_model
from trainers.config import make_config
from trainers.cuda_graphs import graphed_attacks
from trainers.evaluation import STEP_ATTACKS, default_batch_size, eval_layout, evaluate, precision_dtype
from trainers.fused import fused_blocks, resolve_fused
from trainers.peak import efficiency
from trainers.step import (
    Stepper,
    make_optimizer,
    resolve_device,
    resolve_precision,
    training_layout,
)


@dataclass(frozen=True)
class BenchSetting:
    """What both benches take beside their own knobs (keyword arguments of bench_train and
    bench_eval): where and how ours runs (device, layout, compiled, the fast runtime's blocks: None
    where measured faster), whether the reference is timed, and the synthetic data (seed, the
    resolution FLOPs are counted at; flops_per_image for GFLOP/s)."""

    device: str = "auto"
    channels_last: bool = True
    compile: bool = False
    fused: bool | None = None
    reference: bool = True
    flops_per_image: int | None = None
    seed: int = 0
    resolution: int = 32


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


def minor_page_faults() -> int | None:
    """This process's minor page faults so far, host side (None without the Unix-only `resource`
    module). A loop that allocates fresh large tensors faults on each one (glibc hands freed large
    buffers back to the OS, which zero-fills their pages again), and that is part of its time in a
    default process: bench reports the counts beside the speeds so the share is visible."""
    try:
        import resource
    except ImportError:  # resource is Unix-only
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _per(faults: float | None, count: int) -> float | None:
    return None if faults is None else faults / count


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
    method: str = "pgd-at",
    batch_size: int = 64,
    steps: int = 5,
    warmup: int = 2,
    precision: str = "auto",
    **setting,
) -> dict:
    """Time `steps` training steps of ours (and of the reference loop) on synthetic data; beside
    images/s, each one's minor page faults per image over its timed steps (`page_faults_per_image`,
    `reference_page_faults_per_image`; None where not counted). `setting`: `BenchSetting`'s fields.
    Ours runs the blocks through the fast runtime where `fused` says (None: where it measured
    faster, `trainers.fused`), the reference the model as emitted: the blocks as the papers write them."""
    s = BenchSetting(**setting)
    if method not in ("pgd-at", "trades", "mart"):
        raise ScalerError(f"unknown method {method!r}; bench takes pgd-at, trades or mart")
    if batch_size < 1 or steps < 1:
        raise ScalerError("--batch-size and --steps must be >= 1")
    if warmup < 0:
        raise ScalerError("--warmup must be >= 0")
    dev = resolve_device(s.device, compile=s.compile)
    torch.manual_seed(s.seed)
    settings = dict(method=method, batch_size=batch_size, precision=precision, channels_last=s.channels_last)
    cfg = make_config("bat", {"model": "bench", "compile": s.compile, **settings})
    x = torch.rand(batch_size, 3, s.resolution, s.resolution, device=dev)  # the resolution FLOPs are counted at
    y = torch.randint(0, 10, (batch_size,), device=dev)
    ours_model, stepper = _ours_stepper(model, cfg, dev, s.seed)
    bf16 = torch.bfloat16 if stepper.dtype == torch.bfloat16 else None
    result = dict(method=method, batch_size=batch_size, steps=steps)
    result.update(_speed_setting(bf16, cfg.channels_last, dev, s.compile, s.fused))
    with fused_blocks(ours_model, result["fused"]):
        seconds, faults = _time(lambda: stepper.step(x, y), steps, warmup, dev)
    result.update(seconds_per_step=seconds, page_faults_per_image=_per(faults, batch_size))
    result["images_per_s"] = batch_size / seconds
    step_flops = None
    if s.flops_per_image:
        step_flops = training_step_flops(method, cfg.attack_steps, s.flops_per_image) * batch_size
        result["flops_per_step"] = step_flops
        result.update(efficiency(step_flops / seconds, dev.type, result["precision"]))
    if s.reference:
        ref_model = copy.deepcopy(model).to(dev)
        ref_opt = torch.optim.SGD(
            ref_model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, foreach=False
        )
        with fused_blocks(ref_model, False):  # as emitted (an earlier model file: its plain formulation)
            ref_seconds, ref_faults = _time(lambda: reference_step(ref_model, ref_opt, x, y, cfg), steps, warmup, dev)
        result.update(_reference_figures(seconds, ref_seconds, ref_faults, batch_size, step_flops, dev))
    return result


def _ours_stepper(model, cfg, dev, seed: int):
    """(ours, its Stepper): a copy of the model on the device, in the training layout (recorded in
    cfg, which the Stepper reads), compiled where cfg says."""
    ours = copy.deepcopy(model).to(dev)
    cfg.channels_last = training_layout(ours, dev, cfg.channels_last)
    if cfg.channels_last:
        ours = ours.to(memory_format=torch.channels_last)
    step_model = compile_model(ours) if cfg.compile else ours
    stepper = Stepper(
        step_model,
        make_optimizer(ours, cfg),
        cfg,
        device=dev,
        autocast_dtype=resolve_precision(cfg.precision, dev),
        attack_generator=torch.Generator(device=dev).manual_seed(seed),
        war=None,
        attack_model=step_model,
    )
    return ours, stepper


def _reference_figures(seconds, ref_seconds, ref_faults, images: int, flops, dev, fault_images=None) -> dict:
    """The reference's images/s, page faults per image (of `fault_images`, default `images`), our
    speedup over it and (with the multiply-adds timed) its GFLOP/s and share of the fp32 peak
    (TF32's where convs use it)."""
    figures = {
        "reference_images_per_s": images / ref_seconds,
        "reference_page_faults_per_image": _per(ref_faults, fault_images or images),
        "speedup": ref_seconds / seconds,
    }
    if flops:
        ref = efficiency(flops / ref_seconds, dev.type, "fp32")
        figures["reference_gflops_per_s"] = ref["gflops_per_s"]
        figures["reference_fraction_of_peak"] = ref["fraction_of_peak"]
        figures["reference_peak_precision"] = ref["peak_precision"]
    return figures


def _time(fn, steps: int, warmup: int, dev) -> tuple[float, float | None]:
    """(seconds, minor page faults) per step of `steps` timed calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    begin, finish = _timer(dev)
    start_faults = minor_page_faults()
    begin()
    for _ in range(steps):
        fn()
    seconds = finish() / steps
    return seconds, None if start_faults is None else (minor_page_faults() - start_faults) / steps


# --------------------------------------------------------------------------- evaluation


def evaluation_flops(attack: str, flops_per_image: int) -> int:
    """Multiply-adds of evaluating one image under `attack`, F being one forward: the clean
    forward, 2F per attack step (a forward and an input-gradient backward; no weight gradients,
    the convention of `training_step_flops`) and the forward on the attacked image."""
    steps = STEP_ATTACKS[attack].steps
    return flops_per_image * (1 + (2 * steps + 1 if attack != "clean" else 0))


def reference_eval(model, x, y, attack: str, *, eps: float = 8 / 255, batch_size: int = 64) -> float:
    """Robust accuracy (%) under `attack` as public evaluation scripts compute it: model.eval(),
    parameters left requiring grad, fp32 NCHW, the textbook PGD loop (mean CE, or the one-hot CW
    margin with kappa 0) with the same steps, step size and random start as ours, and a per-batch
    `.item()` for the clean and the robust count."""
    settings = STEP_ATTACKS[attack]
    steps, loss_name, start, step = settings.steps, settings.loss, settings.random_start, settings.step * eps
    model.eval()
    clean_correct, correct = 0, 0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        with torch.no_grad():
            clean_correct += (model(xb).argmax(1) == yb).sum().item()
        if attack == "clean":
            continue
        x_adv = (xb + torch.empty_like(xb).uniform_(-eps, eps)).clamp(0.0, 1.0) if start else xb.clone()
        for _ in range(steps):
            x_adv.requires_grad_()
            out = model(x_adv)
            if loss_name == "ce":
                loss = F.cross_entropy(out, yb)
            else:
                onehot = torch.zeros_like(out).scatter_(1, yb[:, None], 1.0)
                real = (onehot * out).sum(1)
                other = ((1.0 - onehot) * out - onehot * 10000.0).max(1)[0]
                loss = -torch.clamp(real - other, min=0.0).sum()
            grad = torch.autograd.grad(loss, [x_adv])[0]
            x_adv = x_adv.detach() + step * torch.sign(grad.detach())
            x_adv = torch.min(torch.max(x_adv, xb - eps), xb + eps).clamp(0.0, 1.0)
        with torch.no_grad():
            correct += (model(x_adv).argmax(1) == yb).sum().item()
    return 100.0 * (clean_correct if attack == "clean" else correct) / len(y)


def bench_eval(
    model,
    *,
    attack: str = "pgd20",
    n: int = 256,
    batch_size: int | None = None,
    reference_batch_size: int | None = None,
    precision: str = "fp32",
    rounds: int = 1,
    cuda_graphs: bool = False,
    **setting,
) -> dict:
    """Time our evaluation of `attack` (trainers.evaluation.evaluate: clean logits, the attack,
    the attacked logits and the metrics) over n synthetic images against `reference_eval` on the
    same data, after a one-batch warm-up of each; `rounds` > 1 times each that often, alternating,
    and keeps the medians. `setting`: `BenchSetting`'s fields, as in `bench_train`. `compile`
    times ours compiled (`warmup_seconds`, not timed, compiles each batch shape); `cuda_graphs`
    replays its attack steps as CUDA graphs (GPU). Page faults per image: the mean over the timed
    rounds (`page_faults_per_image`, `reference_page_faults_per_image`; None where not counted)."""
    s = BenchSetting(**setting)
    if attack not in STEP_ATTACKS:
        raise ScalerError(f"unknown attack {attack!r}; bench eval takes {', '.join(STEP_ATTACKS)}")
    if min(n, rounds, *(b for b in (batch_size, reference_batch_size) if b is not None)) < 1:
        raise ScalerError("--n, --rounds and --batch-size must be >= 1")
    dev = resolve_device(s.device, compile=s.compile)
    dtype = precision_dtype(precision, dev)
    batch_size = batch_size or default_batch_size(dev)
    reference_batch_size = reference_batch_size or batch_size
    ours_model = copy.deepcopy(model).to(dev).eval()
    x, y = _synthetic_test_set(ours_model, n, s.resolution, s.seed, dev)
    layout = eval_layout(ours_model, x, s.channels_last)
    result = dict(attack=attack, n=n, batch_size=batch_size, **_speed_setting(dtype, layout, dev, s.compile, s.fused))
    result["cuda_graphs"] = cuda_graphs and dev.type == "cuda"
    settings = dict(batch_size=batch_size, precision=precision, channels_last=layout, compile=s.compile)
    settings.update(fused=result["fused"], cuda_graphs=result["cuda_graphs"])
    timed = {"ours": lambda xs, ys: evaluate(ours_model, xs, ys, (attack,), **settings)}
    if s.reference:
        timed["reference"] = _reference_evaluation(copy.deepcopy(model).to(dev), attack, reference_batch_size)
    with graphed_attacks(result["cuda_graphs"]), _held_for_graphs(ours_model, result):  # recorded once, replayed
        warmup = _warm_up(timed, x, y, batch_size, s.compile, dev)
        seconds, faults, outputs = _timed_rounds(timed, x, y, rounds, dev)
    result.update({"warmup_seconds": warmup} if s.compile else {})
    result.update(seconds=seconds["ours"], images_per_s=n / seconds["ours"])
    result.update(accuracy=outputs["ours"][attack]["accuracy"], page_faults_per_image=_per(faults["ours"], n * rounds))
    total = evaluation_flops(attack, s.flops_per_image) * n if s.flops_per_image else None
    if total:
        result.update(flops=total, **efficiency(total / seconds["ours"], dev.type, result["precision"]))
    if s.reference:
        result.update(reference_seconds=seconds["reference"], reference_batch_size=reference_batch_size)
        result["reference_accuracy"] = outputs["reference"]
        result.update(
            _reference_figures(seconds["ours"], seconds["reference"], faults["reference"], n, total, dev, n * rounds)
        )
    return result


def _held_for_graphs(model, result: dict):
    """With CUDA graphs shared by every call of a benchmark: the model in its evaluation layout and
    one span of the fast runtime (one fold cache) around all of them, so that the tensors a graph
    recorded stay where it reads them."""
    if not result["cuda_graphs"]:
        return nullcontext()
    if result["channels_last"]:
        model.to(memory_format=torch.channels_last)
    return fused_blocks(model, result["fused"])


def _speed_setting(dtype, layout: bool, dev, compile: bool, fused: bool | None) -> dict:
    """How ours runs, as bench reports it: precision, layout, device, compiled, fused."""
    precision = "bf16" if dtype is not None else "fp32"
    fused = resolve_fused(fused, dev, compiled=compile)
    return dict(precision=precision, channels_last=layout, device=str(dev), compile=compile, fused=fused)


def _reference_evaluation(model, attack: str, batch_size: int):
    """`reference_eval` of `attack` on (xs, ys), the model's blocks as emitted (an earlier model
    file: its plain formulation)."""

    def run(xs, ys):
        with fused_blocks(model, False):
            return reference_eval(model, xs, ys, attack, batch_size=batch_size)

    return run


def _synthetic_test_set(model, n: int, resolution: int, seed: int, dev):
    """n seeded random images and labels over the model's classes, on the device."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, resolution, resolution, generator=gen)
    with torch.no_grad():
        classes = model(x[:1].to(dev)).shape[1]
    y = torch.randint(0, classes, (n,), generator=gen)
    return x.to(dev), y.to(dev)


def _warm_up(timed: dict, x, y, batch_size: int, compile: bool, dev) -> float:
    """One batch of each, and ours on a shorter last batch's shape where compiled (one more shape
    to compile); returns ours' seconds (its compile time, when compiled)."""
    begin, finish = _timer(dev)
    n = len(y)
    last = n % batch_size if n > batch_size else 0
    begin()
    timed["ours"](x[:batch_size], y[:batch_size])
    if compile and last:
        timed["ours"](x[:last], y[:last])
    seconds = finish()
    if "reference" in timed:
        timed["reference"](x[:batch_size], y[:batch_size])
    return seconds


def _timed_rounds(timed: dict, x, y, rounds: int, dev):
    """(median seconds, summed minor page faults or None, last outputs) of each of `timed` over
    `rounds` rounds, each round one call of each on all of (x, y)."""
    begin, finish = _timer(dev)
    times: dict[str, list[float]] = {k: [] for k in timed}
    faults: dict[str, int | None] = dict.fromkeys(timed, 0)
    outputs: dict = {}
    for _ in range(rounds):
        for name, fn in timed.items():
            before = minor_page_faults()
            begin()
            outputs[name] = fn(x, y)
            times[name].append(finish())
            faults[name] = None if before is None else faults[name] + minor_page_faults() - before
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}, faults, outputs
