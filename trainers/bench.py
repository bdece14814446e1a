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
from trainers.evaluation import STEP_ATTACKS, default_batch_size, eval_layout, evaluate, precision_dtype
from trainers.fused import fused_blocks, resolve_fused
from trainers.peak import efficiency
from trainers.step import (
    Stepper,
    make_optimizer,
    require_compiler,
    resolve_device,
    resolve_precision,
    training_layout,
)


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
    fused=None,
) -> dict:
    """Time `steps` training steps of ours (and of the reference loop) on synthetic data; beside
    images/s, each one's minor page faults per image over its timed steps (`page_faults_per_image`,
    `reference_page_faults_per_image`; None where not counted). Ours runs the blocks through the
    fast runtime where `fused` says (None: where it measured faster, `trainers.fused`), the
    reference the model as emitted: the blocks as the papers write them."""
    if method not in ("pgd-at", "trades", "mart"):
        raise ScalerError(f"unknown method {method!r}; bench takes pgd-at, trades or mart")
    if batch_size < 1 or steps < 1:
        raise ScalerError("--batch-size and --steps must be >= 1")
    if warmup < 0:
        raise ScalerError("--warmup must be >= 0")
    dev = resolve_device(device)
    if compile:
        require_compiler(dev)
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
    result["fused"] = resolve_fused(fused, dev, compiled=compile)
    with fused_blocks(ours_model, result["fused"]):
        seconds, faults = _time(lambda: stepper.step(x, y), steps, warmup, dev)
    result["seconds_per_step"] = seconds
    result["page_faults_per_image"] = _per(faults, batch_size)
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
        with fused_blocks(ref_model, False):  # as emitted (an earlier model file: its plain formulation)
            ref_seconds, ref_faults = _time(lambda: reference_step(ref_model, ref_opt, x, y, cfg), steps, warmup, dev)
        result["reference_images_per_s"] = batch_size / ref_seconds
        result["reference_page_faults_per_image"] = _per(ref_faults, batch_size)
        result["speedup"] = ref_seconds / seconds
        if flops_per_image:
            ref = efficiency(step_flops / ref_seconds, dev.type, "fp32")
            result["reference_gflops_per_s"] = ref["gflops_per_s"]
            result["reference_fraction_of_peak"] = ref["fraction_of_peak"]
            result["reference_peak_precision"] = ref["peak_precision"]
    return result


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
    attack="pgd20",
    n=256,
    batch_size=None,
    precision="fp32",
    channels_last=True,
    compile=False,
    device="auto",
    reference=True,
    reference_batch_size=None,
    flops_per_image=None,
    seed=0,
    resolution=32,
    rounds=1,
    fused=None,
) -> dict:
    """Time our evaluation of `attack` (trainers.evaluation.evaluate: clean logits, the attack,
    the attacked logits and the metrics) over n synthetic images against `reference_eval` on the
    same data, after a one-batch warm-up of each; `rounds` > 1 times each that often, alternating,
    and keeps the medians. Ours runs the blocks through the fast runtime where `fused` says (None:
    where it measured faster), the reference the model as emitted, as in `bench train`. `compile`
    times ours torch.compile'd (BatchNorm left to the compiler, as in compiled training); its
    warm-up, which compiles each batch shape, is reported as `warmup_seconds` and not timed.
    Minor page faults per image are the mean over the timed rounds (`page_faults_per_image`,
    `reference_page_faults_per_image`; None where not counted)."""
    if attack not in STEP_ATTACKS:
        raise ScalerError(f"unknown attack {attack!r}; bench eval takes {', '.join(STEP_ATTACKS)}")
    dtype = precision_dtype(precision)
    dev = resolve_device(device)
    batch_size = default_batch_size(dev) if batch_size is None else batch_size
    reference_batch_size = batch_size if reference_batch_size is None else reference_batch_size
    if batch_size < 1 or reference_batch_size < 1:
        raise ScalerError("--batch-size must be >= 1")
    if n < 1 or rounds < 1:
        raise ScalerError("--n and --rounds must be >= 1")
    if compile:
        require_compiler(dev)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, resolution, resolution, generator=gen)
    ours_model = copy.deepcopy(model).to(dev).eval()
    with torch.no_grad():
        classes = ours_model(x[:1].to(dev)).shape[1]
    y = torch.randint(0, classes, (n,), generator=gen)
    x, y = x.to(dev), y.to(dev)
    layout = eval_layout(ours_model, x, channels_last)
    result = {
        "attack": attack,
        "n": n,
        "batch_size": batch_size,
        "precision": "bf16" if dtype is not None else "fp32",
        "channels_last": layout,
        "device": str(dev),
    }

    result["compile"] = compile
    result["fused"] = resolve_fused(fused, dev, compiled=compile)

    def ours(xs, ys):
        return evaluate(
            ours_model,
            xs,
            ys,
            (attack,),
            batch_size=batch_size,
            precision=precision,
            channels_last=layout,
            compile=compile,
            fused=result["fused"],
        )

    ref_model = copy.deepcopy(model).to(dev) if reference else torch.nn.Module()

    def ref(xs, ys):
        with fused_blocks(ref_model, False):  # as emitted (an earlier model file: its plain formulation)
            return reference_eval(ref_model, xs, ys, attack, batch_size=reference_batch_size)

    timed = {"ours": ours, **({"reference": ref} if reference else {})}
    begin, finish = _timer(dev)
    last = n % batch_size if n > batch_size else 0  # a shorter last batch is one more shape to compile
    begin()  # warm-up: one batch of each, and ours on the last batch's shape where compiled
    ours(x[:batch_size], y[:batch_size])
    if compile and last:
        ours(x[:last], y[:last])
    warmup = finish()
    if compile:
        result["warmup_seconds"] = warmup
    if reference:
        ref(x[:batch_size], y[:batch_size])
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
    seconds = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    result["seconds"] = seconds["ours"]
    result["images_per_s"] = n / seconds["ours"]
    result["page_faults_per_image"] = _per(faults["ours"], n * rounds)
    result["accuracy"] = outputs["ours"][attack]["accuracy"]
    if flops_per_image:
        total = evaluation_flops(attack, flops_per_image) * n
        result["flops"] = total
        result.update(efficiency(total / seconds["ours"], dev.type, result["precision"]))
    if reference:
        result["reference_seconds"] = seconds["reference"]
        result["reference_images_per_s"] = n / seconds["reference"]
        result["reference_page_faults_per_image"] = _per(faults["reference"], n * rounds)
        result["reference_batch_size"] = reference_batch_size
        result["reference_accuracy"] = outputs["reference"]
        result["speedup"] = seconds["reference"] / seconds["ours"]
        if flops_per_image:
            ref_eff = efficiency(total / seconds["reference"], dev.type, "fp32")
            result["reference_gflops_per_s"] = ref_eff["gflops_per_s"]
            result["reference_fraction_of_peak"] = ref_eff["fraction_of_peak"]
            result["reference_peak_precision"] = ref_eff["peak_precision"]
    return result
