"""The fast runtime for emitted models. An emitted model file is the architecture only: each block
has one `forward`, as the papers write it. For a span (a training run, an attack, an evaluation,
a benchmark) `fused_blocks` installs faster formulations of the same functions on the blocks it
recognises, and restores every block exactly on exit.

A block is recognised by the tag its emitted class declares (`scaler_block = (kind, version)`)
and by the exact submodule types and geometry the fused code relies on; anything else (another
model, a block whose norm was swapped, a block with hooks on its submodules, a tag of another
version) keeps its own `forward`. Where the runtime is on by default is measured, per device type:
see `FUSED_SPEEDUP`.
"""

from __future__ import annotations

import functools
import inspect
import types
from contextlib import ExitStack, contextmanager, nullcontext
from contextvars import ContextVar

import torch
from torch import nn

from trainers import kernels
from trainers.fused.bottleneck import robust_forward
from trainers.fused.folds import constant_folds, forward_mode_active, has_storage, is_compiling
from trainers.fused.preact import basic_forward

# Measured speed of the fused blocks over the emitted forward (--no-fused), per device type, in a
# PGD-10 training step (bf16, channels_last, batch 64; benchmarks/test_bench_train.py, ours against
# ours-plain). CPU (2 cores, this project's CI machine): 1.90x on the small robust model, 1.08x on
# the basic bar model. CUDA (one H100, torch 2.11, batch 128): WRN-34-10 810 img/s fused against
# 1,005 plain, RobustResNet-A1 82.7 against 83.7: the fused routes are CPU routes, on CUDA they
# only add folding work. The smaller of each device's figures.
FUSED_SPEEDUP = {"cpu": 1.08, "cuda": 0.81}

_CHOICE: ContextVar[bool | None] = ContextVar("scaler_fused_choice", default=None)


def auto_fused(device) -> bool:
    """Whether the fused blocks are on by default on this device: where they measured faster."""
    return FUSED_SPEEDUP.get(torch.device(device).type, 0.0) > 1.0


def resolve_fused(choice: bool | None, device, *, compiled: bool = False) -> bool:
    """An explicit --fused/--no-fused, else where measured faster; off under torch.compile, which
    fuses by itself (and traces the emitted forward)."""
    if choice is not None:
        return bool(choice)
    return auto_fused(device) and not compiled


@contextmanager
def fused_blocks(model: nn.Module, enabled: bool | None = None):
    """Within it, the model's recognised blocks run their fused formulation and its eval-mode
    folds are built once per frozen span (`constant_folds`). `enabled` None follows an enclosing
    span's choice, else `auto_fused` for the model's device; False runs every block as emitted
    (model files of earlier versions, which carried their fused code, are switched to their plain
    formulation too). Yields the modules given a fused forward."""
    if enabled is None:
        enabled = _CHOICE.get()
    if enabled is None:
        enabled = auto_fused(_device(model))
    token = _CHOICE.set(enabled)
    installed: list[nn.Module] = []
    lifted = {} if enabled else _lift_installed(model)  # an enclosing span's, for this plain one
    legacy = _legacy_flags(model, enabled)
    try:
        with ExitStack() as stack:
            if enabled:
                installed = _install(model)
                stack.enter_context(constant_folds(model))
                stack.enter_context(_legacy_constant_folds(model))
            yield installed
    finally:
        for m in installed:
            m.__dict__.pop("forward", None)
            _INSTALLED.pop(id(m), None)
        for m, forward in lifted.values():
            m.forward = forward
        for m, flag in legacy:
            m.fused = flag
        _CHOICE.reset(token)


def fused_forward(module: nn.Module):
    """The fused forward the runtime would give `module` (a callable of x), or None where it runs
    as emitted: an unrecognised tag, other submodule types or geometry, or hooks on submodules."""
    tag = getattr(type(module), "scaler_block", None) or getattr(type(module), "scaler_network", None)
    kind = _KINDS.get(tag) if isinstance(tag, tuple) else None
    if kind is None or not _own_forward(type(module)) or not kind.fits(module) or _hooked_inside(module):
        return None
    same_pad = _file_global(module, "same_pad") if kind.same_padding else None
    if kind.same_padding and same_pad is None:
        return None
    return functools.partial(kind.forward, module, same_pad=same_pad)


_INSTALLED: dict[int, object] = {}  # id(module) -> the fused forward a live span gave it


def _install(model: nn.Module) -> list[nn.Module]:
    if _global_hooks():
        return []
    installed = []
    for m in model.modules():
        if "forward" in m.__dict__:  # its forward already replaced (by a user, or an enclosing span)
            continue
        forward = fused_forward(m)
        if forward is not None:
            m.forward = forward
            _INSTALLED[id(m)] = forward
            installed.append(m)
    return installed


def _lift_installed(model: nn.Module) -> dict:
    """Take off the fused forwards enclosing spans gave the model's modules (put back on exit)."""
    lifted = {}
    for m in model.modules():
        forward = m.__dict__.get("forward")
        if forward is not None and _INSTALLED.get(id(m)) is forward:
            lifted[id(m)] = (m, m.__dict__.pop("forward"))
    return lifted


def _device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


# --------------------------------------------------------------------------- recognition
def _is_bn(m) -> bool:
    """A BatchNorm2d the folds can read: exactly that type, affine, with running statistics."""
    return type(m) is nn.BatchNorm2d and m.affine and m.track_running_stats and m.running_var is not None


def _is_conv(m, kernel: int | None = None, stride: int | None = None, padding: int | None = None) -> bool:
    """A bias-free, undilated, zero-padded nn.Conv2d with square geometry (and these sizes if given)."""
    if type(m) is not nn.Conv2d or m.bias is not None or m.dilation != (1, 1) or m.padding_mode != "zeros":
        return False
    if not isinstance(m.padding, tuple) or len(set(m.kernel_size)) > 1 or len(set(m.stride)) > 1:
        return False
    if len(set(m.padding)) > 1:
        return False
    wanted = ((kernel, m.kernel_size[0]), (stride, m.stride[0]), (padding, m.padding[0]))
    return all(want is None or want == got for want, got in wanted)


def _is_1x1(m, stride: int = 1) -> bool:
    return _is_conv(m, 1, stride, 0) and m.groups == 1


def _robust_fits(b) -> bool:
    """What `robust_forward` reads: pre-activation, SE residual or none, BatchNorms everywhere,
    the convs' split geometry as the block's constructor lays it out."""
    try:
        if b.preact is not True or b.se not in ("residual", "none") or not _is_bn(b.bn1) or not _is_bn(b.bn2):
            return False
        n_convs = b.scales - 1 if b.scales > 1 else 1
        if len(b.convs) != n_convs or len(b.bns) != n_convs or not all(_is_bn(bn) for bn in b.bns):
            return False
        first = b.convs[0]
        for conv in b.convs:
            if not _is_conv(conv, first.kernel_size[0], b.stride, first.padding[0]) or conv.groups != first.groups:
                return False
            if conv.in_channels != b.width or conv.out_channels != b.width:
                return False
        if not _is_1x1(b.conv1) or b.conv1.out_channels != b.width * b.scales or not _is_1x1(b.conv3):
            return False
        pool = None if b.scales == 1 else nn.AvgPool2d if b.stride > 1 else nn.Identity
        if type(b.pool) is not (type(None) if pool is None else pool):
            return False
        if b.shortcut is not None and not _is_1x1(b.shortcut, b.stride):
            return False
        if b.se == "residual":
            linears = (b.se_fc1, b.se_fc2)
            if not _is_bn(b.se_bn) or not all(type(f) is nn.Linear and f.bias is None for f in linears):
                return False
        return True
    except AttributeError:
        return False


def _basic_fits(b) -> bool:
    """What `basic_forward` reads: BatchNorms, bias-free square convs, a 1x1 projection (with a
    BatchNorm after it in the post-activation block)."""
    try:
        stride = b.conv1.stride[0]
        if not (_is_bn(b.bn1) and _is_bn(b.bn2) and _is_conv(b.conv1) and _is_conv(b.conv2, stride=1)):
            return False
        if b.conv1.groups != 1 or b.conv2.groups != 1 or not isinstance(b.preact, bool):
            return False
        if b.shortcut is None:
            return True
        if b.preact:
            return _is_1x1(b.shortcut, stride)
        parts = list(b.shortcut) if type(b.shortcut) is nn.Sequential else []
        return len(parts) == 2 and _is_conv(parts[0], 1, padding=0) and _is_bn(parts[1])
    except AttributeError:
        return False


def _network_fits(net) -> bool:
    try:
        parts = (net.stem, net.stage1, net.stage2, net.stage3, net.bn, net.act)
        return all(isinstance(p, nn.Module) for p in parts) and type(net.fc) is nn.Linear
    except AttributeError:
        return False


def network_forward(net: nn.Module, x: torch.Tensor, same_pad=None) -> torch.Tensor:
    """The residual network's forward with its global average pool as a sum: the gradient of a
    mean is materialised channels-first, which is slow to mix with channels_last tensors."""
    if getattr(net, "mean", None) is not None:
        x = (x - net.mean) / net.std
    x = net.stage3(net.stage2(net.stage1(net.stem(x))))
    x = net.act(net.bn(x))
    return net.fc(x.sum((2, 3)) / (x.shape[2] * x.shape[3]))


def robust_block_forward(block: nn.Module, x: torch.Tensor, same_pad=None) -> torch.Tensor:
    """The RobustResBlock's fast formulation for x's device: where Triton runs (CUDA), the cascade
    and the residual SE on its kernels (`trainers.kernels.robust`), else the CPU formulation."""
    if kernels.usable(x) and has_storage(x) and not (is_compiling() or forward_mode_active()):
        from trainers.kernels.robust import robust_forward as kernel_forward

        return kernel_forward(block, x, same_pad)
    return robust_forward(block, x, same_pad)


class _Kind(types.SimpleNamespace):
    """A recognised class: its fit check, fused forward, and whether it pads strided convs "same"."""


_KINDS = {
    ("basic", 1): _Kind(fits=_basic_fits, forward=basic_forward, same_padding=False),
    ("basic-same", 1): _Kind(fits=_basic_fits, forward=basic_forward, same_padding=True),
    ("robust", 1): _Kind(fits=_robust_fits, forward=robust_block_forward, same_padding=False),
    ("robust-same", 1): _Kind(fits=_robust_fits, forward=robust_block_forward, same_padding=True),
    ("resnet", 1): _Kind(fits=_network_fits, forward=network_forward, same_padding=False),
}


def _own_forward(cls: type) -> bool:
    """Whether the class's forward is the one of the class that declares the tag: a subclass with
    a forward of its own computes something else."""
    for klass in cls.__mro__:
        if "scaler_block" in klass.__dict__ or "scaler_network" in klass.__dict__:
            return inspect.getattr_static(cls, "forward", None) is klass.__dict__.get("forward")
    return False


def _hooked_inside(module: nn.Module) -> bool:
    """Whether a submodule (not the module itself, whose hooks still fire) has hooks that a fused
    forward, which reads the submodules' tensors rather than calling them, would skip."""
    for name, m in module.named_modules():
        if name and (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks):
            return True
    return False


def _global_hooks() -> bool:
    from torch.nn.modules import module as mod

    return bool(mod._global_forward_hooks or mod._global_forward_pre_hooks or mod._global_backward_hooks)


def _file_global(module: nn.Module, name: str):
    return _globals_of(module).get(name)


# --------------------------------------------------------------------------- earlier model files
def _legacy_flags(model: nn.Module, enabled: bool) -> list:
    """Model files emitted before this runtime carry their fused code behind a `fused` flag per
    block (True by default): switched off for a span that runs plain, and back on exit."""
    if enabled:
        return []
    flags = [(m, m.fused) for m in model.modules() if isinstance(m.__dict__.get("fused"), bool) and _legacy_file(m)]
    for m, _ in flags:
        m.fused = False
    return flags


def _legacy_file(module: nn.Module) -> bool:
    """Whether the module's class comes from a model file of an earlier version (its globals hold
    that file's fold cache): a `fused` attribute elsewhere is someone else's."""
    return "FOLD_CACHES" in _globals_of(module) and callable(_globals_of(module).get("constant_folds"))


def _globals_of(module: nn.Module) -> dict:
    forward = inspect.getattr_static(type(module), "forward", None)
    return getattr(forward, "__globals__", {})


def _legacy_constant_folds(model: nn.Module):
    """An earlier model file's own `constant_folds(model)`, found in the globals of the first
    submodule's `forward` that has one; a no-op for other models (TorchScript ones included)."""
    for m in model.modules():
        if _legacy_file(m):  # getattr_static: no descriptors run (TorchScript's raise)
            return _globals_of(m)["constant_folds"](model)
    return nullcontext()
