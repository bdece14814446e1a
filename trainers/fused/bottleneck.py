"""The RobustResBlock's fused formulation (pre-activation, BatchNorm, SE "residual" or "none"):
BN folded into the convs in eval mode, the S - 1 independent convs of a strided block as one
grouped conv, the hierarchical cascade on dense channel slices, conv1 and the skip reading x in
one backward, and the residual SE in two passes (or, in attacks, without its input at all). The
same function as the emitted block's `forward`, from the same modules and state dict."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainers.fused.folds import (
    backward_differentiated,
    bn_affine,
    bn_tensors,
    compute_dtype,
    conv_bn,
    conv_bn_many,
    dense,
    dense_cat,
    fold_conv_bn,
    folded,
    forward_mode_active,
    graph_gradients,
    has_storage,
    is_compiling,
    matrix,
    pixels,
)


def robust_forward(block: nn.Module, x: torch.Tensor, same_pad=None) -> torch.Tensor:
    """The block's output; `same_pad` is the emitted file's own padding helper for a block that
    pads strided convs "same" (None: symmetric padding inside the convs)."""
    h, skip = conv1_and_skip(block, x)
    u = split_convs(block, block.act(h), same_pad)
    if block.se == "residual":
        return residual_se(u, skip, block.conv3, block.se_bn, block.se_fc1, block.se_fc2)
    return block.conv3(u) + skip


def conv1_and_skip(block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bn2(conv1(x)), the skip branch: x or shortcut(act(bn1(x)))). In eval mode bn1 and act are
    per pixel, so a strided 1x1 shortcut reads the same values when they run on the pixels it
    samples only: 1 / stride^2 of them. With conv1 folded and frozen (attacks) both read x
    through `SharedInputConv`, whose backward adds their gradients in conv1's matmul."""
    sample = block.shortcut is not None and block.stride > 1 and not block.bn1.training
    step = block.stride if sample else 1
    if block.bn2.training:
        h = conv_bn(x, block.conv1, block.bn2)
    else:
        tensors = (block.conv1.weight, *bn_tensors(block.bn2))
        weight, bias, _ = folded(x, block.conv1, tensors, fold_conv_bn, x, block.conv1, block.bn2)
        if shared_input_route(x, weight, bias):
            (h, x), step = SharedInputConv.apply(x, weight, bias, step), 1
        else:
            h = F.conv2d(x, weight, bias)
    if step > 1:
        x = x[:, :, ::step, ::step]
    if block.shortcut is None:
        return h, x
    pre = block.act(block.bn1(x))
    return h, F.conv2d(pre, block.shortcut.weight, block.shortcut.bias) if sample else block.shortcut(pre)


def split_convs(block: nn.Module, h: torch.Tensor, same_pad=None) -> torch.Tensor:
    """The block's `split_convs` with every conv-BN pair fused; a strided block's convs run as one."""
    pad = (lambda t: same_pad(t, block.stride, block.kernel_size)) if same_pad is not None else (lambda t: t)
    if block.scales == 1:
        return block.act(conv_bn(pad(h), block.convs[0], block.bns[0]))
    if block.stride > 1:  # no cascade: the S - 1 convs are independent
        head, last = torch.split(h, [h.shape[1] - block.width, block.width], dim=1)
        return dense_cat(block.act(conv_bn_many(pad(head), block.convs, block.bns)), block.pool(last))
    chunks = torch.split(h, block.width, dim=1)
    outs = [block.act(conv_bn(chunks[0], block.convs[0], block.bns[0]))]
    for chunk, conv, bn in zip(chunks[1:], block.convs[1:], block.bns[1:]):
        outs.append(block.act(conv_bn(dense(chunk) + outs[-1], conv, bn)))
    outs.append(chunks[-1])
    return dense_cat(*outs)


def shared_input_route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> bool:
    """Whether an eval-mode bottleneck's conv1 and its skip branch read x through `SharedInputConv`:
    on a CPU, a channels_last x that wants a gradient in the dtype the conv computes in, a folded
    conv1 that wants none (attacks), eager mode without forward-mode derivatives. Measured (batch
    32, PGD-20, bf16 and fp32) it made a RobustResNet evaluation 3-5% faster."""
    if x.device.type != "cpu" or not (torch.is_grad_enabled() and x.requires_grad) or weight.requires_grad:
        return False
    if bias.requires_grad or is_compiling() or forward_mode_active():
        return False
    if not has_storage(x):  # functorch wrappers: this Function has no functorch rules
        return False
    return x.dtype == compute_dtype(x) == weight.dtype and x.is_contiguous(memory_format=torch.channels_last)


class SharedInputConv(torch.autograd.Function):
    """(conv1x1(x), x's pixels the skip branch reads: all at stride 1, else every stride-th) with one
    backward: x's gradient is conv1's input gradient, one matmul over pixels ([pixels, out] times
    [out, in]), with the skip's added by that matmul at stride 1 and into the sampled pixels
    otherwise. Autograd would write conv1's gradient and then add the other in another pass over
    x's size (the block input: the largest tensors of a stage)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride):
        ctx.save_for_backward(weight)
        ctx.stride, ctx.shape = stride, x.shape
        return F.conv2d(x, weight, bias), x[:, :, ::stride, ::stride]  # a view, as without this Function

    @staticmethod
    def backward(ctx, grad_h, grad_skip):
        (weight,) = ctx.saved_tensors
        if backward_differentiated() or not has_storage(grad_h, grad_skip):  # the same map, differentiable
            grad_x = F.conv2d(grad_h, weight.transpose(0, 1))
            if ctx.stride == 1:
                return grad_x + grad_skip, None, None, None
            grad_x[:, :, :: ctx.stride, :: ctx.stride] += grad_skip
            return grad_x, None, None, None
        cl, w = torch.channels_last, weight.flatten(1)  # [out, in]
        grad_h = grad_h.to(w.dtype).contiguous(memory_format=cl)
        grad_skip = grad_skip.to(w.dtype).contiguous(memory_format=cl)
        grad_x = torch.empty(ctx.shape, dtype=w.dtype, device=w.device, memory_format=cl)
        flat = matrix(grad_x)
        if ctx.stride == 1:
            torch.addmm(matrix(grad_skip), matrix(grad_h), w, out=flat)
        else:
            torch.mm(matrix(grad_h), w, out=flat)
            grad_x[:, :, :: ctx.stride, :: ctx.stride].add_(grad_skip)
        return grad_x, None, None, None


def residual_se(
    u: torch.Tensor, skip: torch.Tensor, conv3: nn.Conv2d, bn: nn.BatchNorm2d, fc1: nn.Linear, fc2: nn.Linear
):
    """h + skip + SE(bn(h)) for h = conv3(u), with SE(z) = z * sigmoid(fc2(relu(fc1(GAP(z))))). In
    eval mode bn(h) = h * scale + shift, so GAP(bn(h)) = GAP(h) * scale + shift and the sum is
    h * (1 + scale * s) + shift * s + skip: two passes over h instead of five; where
    `per_sample_route` allows, h is never materialised (`ConvResidualSE`)."""
    if not bn.training and per_sample_route(u, skip, conv3, bn, fc1, fc2):
        scale, shift = folded(u, bn, bn_tensors(bn), bn_affine, bn)
        return ConvResidualSE.apply(u, skip, conv3.weight, scale, shift, fc1.weight, fc2.weight)
    h = conv3(u)
    area = h.shape[2] * h.shape[3]
    if bn.training:
        z = bn(h)
        s = torch.sigmoid(fc2(torch.relu(fc1(z.sum((2, 3)) / area))))
        return ScaleAdd.apply(z, s, h + skip)
    scale, shift = folded(h, bn, bn_tensors(bn), bn_affine, bn)
    return EvalResidualSE.apply(h, skip, scale, shift, fc1.weight, fc2.weight)


def per_sample_route(u: torch.Tensor, skip: torch.Tensor, conv3: nn.Conv2d, *frozen: nn.Module) -> bool:
    """Whether eval-mode `residual_se` runs as `ConvResidualSE`: on a CPU, channels_last operands of
    one dtype that the convs compute in, no parameter that wants a gradient (attacks), and a
    feature map of at least 4 pixels per input channel, so that the per-sample weights it builds
    (batch x out x in) stay a quarter of the block output or less. Measured (batch 32, bf16,
    forward + input gradients) at 32x32 it ran 1.6-2.4x faster than conv3 + `EvalResidualSE`, at
    16x16 about the same, and at 8x8 with 128 or more input channels 1.6-6.6x slower."""
    channels_last = torch.channels_last
    if u.device.type != "cpu" or u.shape[2] * u.shape[3] < 4 * u.shape[1]:
        return False
    if u.dtype != skip.dtype or compute_dtype(u) != u.dtype:
        return False
    if not (u.is_contiguous(memory_format=channels_last) and skip.is_contiguous(memory_format=channels_last)):
        return False
    return not any(p.requires_grad for m in (conv3, *frozen) for p in m.parameters())


class ScaleAdd(torch.autograd.Function):
    """h * gain + skip, gain per sample and channel (training-mode `residual_se`): autograd's own
    addcmul backward makes a pass over h more than the gradients need."""

    @staticmethod
    def forward(ctx, h, gain, skip):
        ctx.save_for_backward(h, gain)
        return torch.addcmul(skip, h, gain[:, :, None, None])

    @staticmethod
    def backward(ctx, grad):
        h, gain = ctx.saved_tensors
        grad_gain = (grad * h).sum((2, 3)) if ctx.needs_input_grad[1] else None
        return grad * gain[:, :, None, None], grad_gain, grad


class EvalResidualSE(torch.autograd.Function):
    """Eval-mode `residual_se` as one Function: h * (1 + scale * s) + shift * s + skip with
    s = sigmoid(W2 relu(W1 p)), p = GAP(h) * scale + shift (`se_mlp`, in float32 under autocast). Its
    backward makes three passes over the block-sized tensors (grad * h, grad, and h's gradient with
    the pooled sum's folded in, one addcmul) where autograd's graph makes six."""

    @staticmethod
    def forward(ctx, h, skip, scale, shift, w1, w2):
        with torch.autocast(h.device.type, enabled=False):
            pooled = h.sum((2, 3)).to(scale.dtype) / (h.shape[2] * h.shape[3])
            p, r, s = se_mlp(pooled, scale, shift, w1, w2)
        ctx.save_for_backward(h, pooled, p, r, s, scale, shift, w1, w2)
        out = torch.addcmul(skip, h, (1 + scale * s).to(h.dtype)[:, :, None, None])
        return out.add_((shift * s).to(h.dtype)[:, :, None, None])

    @staticmethod
    def backward(ctx, grad):
        h, pooled, p, r, s, scale, shift, w1, w2 = ctx.saved_tensors
        need_h, need_skip, need_scale, need_shift, need_w1, need_w2 = ctx.needs_input_grad
        if backward_differentiated():  # p, r and s were saved without history
            needs = (need_h, need_scale, need_shift, need_w1, need_w2)
            grads = graph_gradients(eval_residual_se_gain, (h, scale, shift, w1, w2), needs, grad)
            return grads[0], grad if need_skip else None, *grads[1:]
        grad_gain = (grad * h).sum((2, 3)).to(s.dtype)  # per sample and channel
        grad_offset = grad.sum((2, 3)).to(s.dtype)
        grad_v, grad_u, grad_p = se_mlp_backward(grad_gain, grad_offset, r, s, scale, shift, w1, w2)
        grad_h = grad_scale = grad_shift = grad_w1 = grad_w2 = None
        if need_h:
            grad_pooled = (grad_p * scale / (h.shape[2] * h.shape[3])).to(h.dtype)
            gain = (1 + scale * s).to(h.dtype)
            grad_h = torch.addcmul(grad_pooled[:, :, None, None].expand_as(h), grad, gain[:, :, None, None])
        if need_scale:
            grad_scale = (grad_gain * s + grad_p * pooled).sum(0)
        if need_shift:
            grad_shift = (grad_offset * s + grad_p).sum(0)
        if need_w1:
            grad_w1 = (grad_u.t() @ p).to(w1.dtype)
        if need_w2:
            grad_w2 = (grad_v.t() @ r).to(w2.dtype)
        return grad_h, grad if need_skip else None, grad_scale, grad_shift, grad_w1, grad_w2


def eval_residual_se_gain(
    h: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor
):
    """h * (1 + scale * s) + shift * s, the eval-mode residual SE less its skip, in differentiable ops
    (the Functions' backwards under create_graph)."""
    with torch.autocast(h.device.type, enabled=False):
        s = se_mlp(h.sum((2, 3)).to(scale.dtype) / (h.shape[2] * h.shape[3]), scale, shift, w1, w2)[2]
        return h * (1 + scale * s).to(h.dtype)[:, :, None, None] + (shift * s).to(h.dtype)[:, :, None, None]


def se_mlp(pooled: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor):
    """The eval-mode residual SE's gate from GAP(h): p = GAP(bn(h)), r = relu(W1 p), s = sigmoid(W2 r),
    in the BatchNorm's dtype (float32 under autocast)."""
    p = pooled * scale + shift
    r = torch.relu(p @ w1.to(p.dtype).t())
    return p, r, torch.sigmoid(r @ w2.to(p.dtype).t())


def se_mlp_backward(grad_gain, grad_offset, r, s, scale, shift, w1, w2):
    """Gradients through `se_mlp` given those of the per-sample gain 1 + scale * s and offset
    shift * s: at W2's output (v), at r's input (u) and at p."""
    grad_v = (grad_gain * scale + grad_offset * shift) * s * (1 - s)  # through the sigmoid
    grad_u = (grad_v @ w2.to(s.dtype)) * (r > 0)
    return grad_v, grad_u, grad_u @ w1.to(s.dtype)


class ConvResidualSE(torch.autograd.Function):
    """Eval-mode `residual_se` of h = conv3(u) without h, for frozen parameters: the SE reads
    GAP(h) = W3 GAP(u), and h * gain + skip is one batched matmul of u with per-sample weights
    W3 * gain (sample n's pixels [HW, in] times [in, out], added to skip's), the offset a second
    pass. Its backward takes grad * h summed over pixels as the W3-weighted sum of the matmul
    grad^T u, and u's gradient as one batched matmul, so no h is written, read or differentiated;
    the price is that extra matmul, one more conv3's worth of multiply-adds: at 32x32 it costs far
    less than the passes over memory it replaces, at 16x16 about as much (`per_sample_route`)."""

    @staticmethod
    def forward(ctx, u, skip, w3, scale, shift, w1, w2):
        n, _, height, breadth = u.shape
        area, f = height * breadth, scale.dtype
        with torch.autocast(u.device.type, enabled=False):
            w = w3.flatten(1).to(f)  # [out, in]
            pooled = (u.sum((2, 3)).to(f) / area) @ w.t()  # GAP(conv3(u))
            r, s = se_mlp(pooled, scale, shift, w1, w2)[1:]
            per_sample = (w[None] * (1 + scale * s)[:, :, None]).to(u.dtype)  # [n, out, in]
            shape, cl = (n, w.shape[0], height, breadth), torch.channels_last
            out = torch.empty(shape, dtype=u.dtype, device=u.device, memory_format=cl)
            torch.baddbmm(pixels(skip), pixels(u), per_sample.transpose(1, 2), out=pixels(out))
            out.add_((shift * s).to(u.dtype)[:, :, None, None])
        ctx.save_for_backward(u, w, per_sample, r, s, scale, shift, w1, w2)
        return out

    @staticmethod
    def backward(ctx, grad):
        u, w, per_sample, r, s, scale, shift, w1, w2 = ctx.saved_tensors
        if backward_differentiated() or not has_storage(grad):  # conv3 and the SE written out
            weight = w.to(u.dtype)[:, :, None, None]
            need_u, need_skip = ctx.needs_input_grad[:2]

            def formula(u):
                return eval_residual_se_gain(F.conv2d(u, weight), scale, shift, w1, w2)

            grad_u = graph_gradients(formula, (u,), (need_u,), grad)[0]
            return grad_u, grad if need_skip else None, None, None, None, None, None
        area, f = u.shape[2] * u.shape[3], s.dtype
        with torch.autocast(u.device.type, enabled=False):
            grad = grad.to(u.dtype).contiguous(memory_format=torch.channels_last)
            g = pixels(grad)
            grad_gain = (torch.bmm(pixels(u).transpose(1, 2), g).to(f) * w.t()).sum(1)  # sum over pixels of grad * h
            grad_offset = g.sum(1).to(f)
            grad_p = se_mlp_backward(grad_gain, grad_offset, r, s, scale, shift, w1, w2)[2]
            grad_pooled = ((grad_p * scale) @ w / area).to(u.dtype)  # d loss / d GAP(u), per pixel
            grad_u = torch.empty_like(u, memory_format=torch.channels_last)
            torch.baddbmm(grad_pooled[:, None, :], g, per_sample, out=pixels(grad_u))
        return grad_u, grad, None, None, None, None, None
