"""Exact rewrites shared by the fused blocks: eval-mode BatchNorm folded into the conv before it,
several BatchNorms over consecutive channel blocks as one call, the folds cached across the
frozen steps of an attack, and the layout helpers the CPU kernels want. Each computes the same
function as the module calls it replaces, to float rounding."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)  # torch >= 2.3


def bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as its per-channel affine map: bn(x) = x * scale + shift."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def bn_tensors(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, ...]:
    """What an eval-mode BatchNorm's fold depends on; its batch count changes with every training
    forward, whose running statistics updates do not bump their versions."""
    return bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked


FOLD_CACHES: dict[int, dict] = {}  # id(module) -> its folds, for the modules of live `constant_folds` spans


@contextmanager
def constant_folds(model: nn.Module):
    """Within it, each eval-mode fold of the model (a conv's weight and bias with its BatchNorm in
    the dtype the conv computes in, a BatchNorm's affine map) is built once and reused while its
    tensors want no gradient and stay the same tensors at the same version: the steps of an attack,
    whose parameters are frozen, stop rebuilding them (measured on a CPU: 7-11% of a PGD-20
    evaluation of small models). In-place updates, replaced parameters and BatchNorm statistics
    re-estimated inside rebuild a fold; writes through `.data` are not seen (they bypass version
    counters). Nothing is kept on the modules or after exit."""
    owners = []
    try:
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) and id(m) not in FOLD_CACHES:  # nested: the outer's
                FOLD_CACHES[id(m)] = {}
                owners.append(m)
        yield model
    finally:
        for m in owners:
            FOLD_CACHES.pop(id(m), None)


def folded(x: torch.Tensor, owner: nn.Module, tensors: tuple[torch.Tensor, ...], build, *args):
    """build(*args), a fold of `tensors` for an op on x; inside `constant_folds` the one `build` made
    before for x's device and compute dtype while none of them wants a gradient (forward-mode ones
    too) or has been replaced or changed since. The entry keeps their storage alive, so that no
    other tensor can take its address while the entry is compared against it."""
    if is_compiling():  # the compiler folds constants by itself (and cannot trace the checks below)
        return build(*args)
    cache = FOLD_CACHES.get(id(owner)) if FOLD_CACHES else None
    if cache is None or torch.is_inference_mode_enabled() or any(t.requires_grad for t in tensors):
        return build(*args)
    if forward_mode_active():  # dual tensors may carry tangents
        return build(*args)
    try:
        stamp = tuple((t.data_ptr(), t._version) for t in tensors)
    except RuntimeError:  # no storage or no version counter (functorch wrappers, inference tensors)
        return build(*args)
    key = (x.device, compute_dtype(x), build)  # one owner can have folds of several kinds
    hit = cache.get(key)
    if hit is None or hit[0] != stamp:
        hit = cache[key] = (stamp, [t.detach() for t in tensors], build(*args))  # their storage, even if replaced
    return hit[2]


def forward_mode_active() -> bool:
    """Whether a forward-mode AD level is open (`torch.autograd.forward_ad.dual_level`)."""
    return getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a conv of x computes in: autocast's (on x's device) where it is on and casts x (float32)."""
    if x.dtype != torch.float32:
        return x.dtype
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        enabled, dtype = torch.is_autocast_enabled(x.device.type), torch.get_autocast_dtype(x.device.type)
    elif x.device.type == "cuda":
        enabled, dtype = torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
    else:
        enabled, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
    return dtype if enabled else x.dtype


def has_storage(*tensors: torch.Tensor) -> bool:
    """Whether the tensors are plain ones: functorch's batched and wrapper tensors have no storage."""
    try:
        for t in tensors:
            t.data_ptr()
    except RuntimeError:
        return False
    return True


def backward_differentiated() -> bool:
    """Whether a Function's backward is itself being differentiated: under create_graph (double
    backward) or with forward-mode tangents (forward-over-reverse). Then the fused Functions run
    written-out formulas; their own read intermediates saved without history, and write with out=."""
    return torch.is_grad_enabled() or forward_mode_active()


def graph_gradients(formula, inputs: tuple, needs: tuple, grad: torch.Tensor) -> list:
    """The gradients of formula(*inputs) (given grad at its output) with respect to the inputs `needs`
    marks, by autograd with a graph: a Function's backward under create_graph (double backward),
    where its own formulas would read intermediates saved without history."""
    needs = [need and t is not None and t.requires_grad for t, need in zip(inputs, needs)]  # frozen since
    if not any(needs):
        return [None] * len(inputs)
    with torch.enable_grad():
        # each argument through an alias of its own: partial derivatives, not total ones (the SE gate
        # depends on h), while the aliases' history keeps the gradients differentiable in the inputs
        aliases = [t.view_as(t) if need else t for t, need in zip(inputs, needs)]
        wanted = [t for t, need in zip(aliases, needs) if need]
        found = iter(torch.autograd.grad(formula(*aliases), wanted, grad, create_graph=True, allow_unused=True))
    return [next(found) if need else None for need in needs]


def conv_bn(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """bn(conv(x)); in eval mode one conv whose weight and bias carry the BatchNorm."""
    if bn.training:
        if dense_route(x, conv.weight, conv.groups):
            return bn(conv2d(x, conv.weight, conv.bias, conv, conv.groups))
        return bn(conv(x))
    weight, bias, groups = folded(x, conv, (conv.weight, *bn_tensors(bn)), fold_conv_bn, x, conv, bn)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, groups)


def fold_conv_bn(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d):
    return fold_into_conv(x, conv.weight, *bn_affine(bn), conv.groups)


def fold_into_conv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, groups: int):
    """(weight, bias, groups) of the conv of x equal to conv(x) * scale + shift (an eval-mode BatchNorm
    after a bias-free conv of this weight), in the dtype the conv computes in (autocast would cast
    them on every call), dense where `dense_route` says."""
    weight = weight * scale[:, None, None, None]
    if dense_route(x, weight, groups):
        weight, groups = block_diagonal(weight, groups), 1
    dtype = compute_dtype(x)
    return weight.to(dtype), shift.to(dtype), groups


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias, conv: nn.Conv2d, groups: int) -> torch.Tensor:
    """F.conv2d with conv's stride, padding and dilation; as a dense conv where `dense_route` says."""
    if dense_route(x, weight, groups):
        weight, groups = block_diagonal(weight, groups), 1
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, groups)


def dense_route(x: torch.Tensor, weight: torch.Tensor, groups: int) -> bool:
    """Whether a grouped conv runs as a dense conv with a block-diagonal weight: in bfloat16 on a
    CPU, with up to 64 input channels and 8 per group. oneDNN's grouped bf16 kernels are slow
    there; measured (batch 64, forward + input gradient) the dense conv ran 1.3-5x faster despite
    its groups-times more multiply-adds. The function is the same; the sums run in another order."""
    if groups == 1 or x.device.type != "cpu" or weight.shape[1] * groups > 64 or weight.shape[1] > 8:
        return False
    return compute_dtype(x) == torch.bfloat16


def block_diagonal(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped conv's weight [out, in / groups, k, k] as the dense one [out, in, k, k] of the same
    conv: each output channel's kernel in its group's input channels, zeros elsewhere."""
    out_channels, per_group = weight.shape[:2]
    mask = torch.eye(groups, dtype=weight.dtype, device=weight.device).repeat_interleave(out_channels // groups, 0)
    return (mask[:, :, None, None, None] * weight[:, None]).reshape(out_channels, groups * per_group, *weight.shape[2:])


def conv_bn_many(x: torch.Tensor, convs: nn.ModuleList, bns: nn.ModuleList) -> torch.Tensor:
    """cat([bn_i(conv_i(x_i))]) for x split into consecutive channel blocks x_i, one per conv (all
    of one shape), as one grouped conv and one BatchNorm call."""
    conv = convs[0]
    if bns[0].training:
        weight = torch.cat([c.weight for c in convs])
        return batch_norm_many(conv2d(x, weight, None, conv, conv.groups * len(convs)), bns)
    tensors = tuple(t for c, bn in zip(convs, bns) for t in (c.weight, *bn_tensors(bn)))
    weight, bias, groups = folded(x, conv, tensors, fold_many, x, convs, bns)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, groups)


def fold_many(x: torch.Tensor, convs: nn.ModuleList, bns: nn.ModuleList):
    """`fold_conv_bn` for `conv_bn_many`: the convs' weights stacked, their BatchNorms' maps as one."""
    scale, shift = (torch.cat(t) for t in zip(*(bn_affine(bn) for bn in bns)))
    return fold_into_conv(x, torch.cat([c.weight for c in convs]), scale, shift, convs[0].groups * len(convs))


def batch_norm_many(x: torch.Tensor, bns: nn.ModuleList) -> torch.Tensor:
    """Training-mode cat([bn_i(x_i)]) for consecutive channel blocks x_i of x, in one call; each
    BatchNorm's running statistics and batch count are updated as its own forward would."""
    first = bns[0]
    for bn in bns:
        bn.num_batches_tracked.add_(1)
    momentum = first.momentum if first.momentum is not None else 1.0 / float(first.num_batches_tracked)
    mean = torch.cat([bn.running_mean for bn in bns])
    var = torch.cat([bn.running_var for bn in bns])
    weight = torch.cat([bn.weight for bn in bns])
    bias = torch.cat([bn.bias for bn in bns])
    out = F.batch_norm(x, mean, var, weight, bias, True, momentum, first.eps)
    with torch.no_grad():
        for bn, m, v in zip(bns, mean.split(first.num_features), var.split(first.num_features)):
            bn.running_mean.copy_(m)
            bn.running_var.copy_(v)
    return out


def dense(t: torch.Tensor) -> torch.Tensor:
    """A channel slice of a channels_last tensor as a tensor of its own. Elementwise ops on such a
    slice step through a few channels per pixel (4-16 in the cascade) and run several times slower
    than a copy followed by the op on dense operands."""
    if t.dim() != 4 or t.stride(1) != 1 or not has_storage(t):  # functorch's batched tensors have no layout
        return t
    if not t.is_contiguous(memory_format=torch.channels_last):
        return t.contiguous(memory_format=torch.channels_last)
    return t


def dense_cat(*tensors: torch.Tensor) -> torch.Tensor:
    """`DenseCat` in eager mode; torch.cat under torch.compile, which picks its own layouts (and whose
    tracing of a variadic autograd.Function under no_grad returned only its last input, torch 2.13)."""
    if is_compiling():
        return torch.cat(tensors, dim=1)
    return DenseCat.apply(*tensors)


class DenseCat(torch.autograd.Function):
    """torch.cat along channels whose gradients come back dense (`dense`): the cascade adds them to
    other gradients and feeds them to activation backwards."""

    @staticmethod
    def forward(ctx, *tensors):
        ctx.sizes = [t.shape[1] for t in tensors]
        return torch.cat(tensors, dim=1)

    @staticmethod
    def backward(ctx, grad):
        return tuple(dense(g) for g in grad.split(ctx.sizes, dim=1))


def pixels(t: torch.Tensor) -> torch.Tensor:
    """A channels_last [n, c, h, w] tensor as the [n, h * w, c] matrix view of its memory (a view,
    never a copy: `out=` writes through it)."""
    return t.permute(0, 2, 3, 1).view(t.shape[0], t.shape[2] * t.shape[3], t.shape[1])


def matrix(t: torch.Tensor) -> torch.Tensor:
    """A channels_last [n, c, h, w] tensor as the [n * h * w, c] matrix view of its memory (a view:
    `out=` and in-place matmuls write through it)."""
    return pixels(t).view(-1, t.shape[1])
