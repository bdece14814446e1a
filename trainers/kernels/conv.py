"""Grouped k x k convolution (stride 1, "same" zero padding) as one Triton kernel with a prologue
and an epilogue, and the two autograd Functions of the hierarchical cascade built on it.

The kernel is an implicit GEMM per group: a program computes BLOCK_M output pixels x all of a
group's output channels, its reduction running over (input channel, kh, kw) flattened, so that a
group of 5 channels and a 3 x 3 kernel is one 45-long reduction instead of nine 5-long ones.
Prologues: add a second input (the cascade's `chunk + previous split`), or, for the input
gradient, the ReLU mask and BatchNorm scale of the forward (`grad * (y > 0) * scale`). Epilogue:
the per-channel affine map of an eval-mode BatchNorm and the ReLU. At stride 1 and odd k the input
gradient is the same kernel on the group-transposed, flipped weight; the weight gradient is a
second kernel (pixels reduced in chunks, the chunks' partial sums added in order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from trainers.fused.folds import backward_differentiated, graph_gradients, has_storage
from trainers.kernels import on_device

NO_PROLOGUE, ADD_INPUT, RELU_GRAD = 0, 1, 2


@triton.jit
def _grouped_conv_kernel(
    x_ptr, r_ptr, y_ptr, s_ptr, w_ptr, scale_ptr, shift_ptr, out_ptr,
    H, W, P,  # P = N * H * W output pixels
    sxn, sxc, sxh, sxw,
    srn, src, srh, srw,
    son, soc, soh, sow,
    CG_IN, CG_OUT,
    K: tl.constexpr, PROLOGUE: tl.constexpr, AFFINE_RELU: tl.constexpr, TF32: tl.constexpr,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid, g = tl.program_id(0), tl.program_id(1)
    m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < P
    n, hw = m // (H * W), m % (H * W)
    oh, ow = hw // W, hw % W
    co = tl.arange(0, BLOCK_N)
    co_ok = co < CG_OUT
    reduction = CG_IN * K * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, reduction, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < reduction
        ci, kh, kw = kk // (K * K), (kk // K) % K, kk % K
        ih = oh[:, None] + kh[None, :] - K // 2
        iw = ow[:, None] + kw[None, :] - K // 2
        ok = m_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        c = g * CG_IN + ci
        a = tl.load(x_ptr + n[:, None] * sxn + c[None, :] * sxc + ih * sxh + iw * sxw, mask=ok, other=0.0)
        if PROLOGUE == 1:  # x + r (r laid out as x)
            a += tl.load(r_ptr + n[:, None] * srn + c[None, :] * src + ih * srh + iw * srw, mask=ok, other=0.0)
        if PROLOGUE == 2:  # grad * (y > 0) * s[c] (y laid out as r)
            y = tl.load(y_ptr + n[:, None] * srn + c[None, :] * src + ih * srh + iw * srw, mask=ok, other=0.0)
            s = tl.load(s_ptr + c, mask=k_ok, other=0.0)
            a = tl.where(y > 0, a * s[None, :], 0.0)
        b = tl.load(
            w_ptr + (g * CG_OUT + co[None, :]) * reduction + kk[:, None], mask=k_ok[:, None] & co_ok[None, :], other=0.0
        )
        if TF32:
            acc += tl.dot(a.to(b.dtype), b, input_precision="tf32", out_dtype=ACC)
        else:
            acc += tl.dot(a.to(b.dtype), b, input_precision="ieee", out_dtype=ACC)
    cout = g * CG_OUT + co
    if AFFINE_RELU:
        scale = tl.load(scale_ptr + cout, mask=co_ok, other=0.0)
        shift = tl.load(shift_ptr + cout, mask=co_ok, other=0.0)
        acc = tl.maximum(acc * scale[None, :] + shift[None, :], 0.0)
    offsets = n[:, None] * son + cout[None, :] * soc + oh[:, None] * soh + ow[:, None] * sow
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & co_ok[None, :])


def grouped_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    groups: int,
    *,
    add: torch.Tensor | None = None,
    relu_grad_of: tuple[torch.Tensor, torch.Tensor] | None = None,
    affine_relu: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """conv2d(x', weight, padding=k // 2, groups=groups) in weight's dtype (fp32 accumulation; fp64
    for fp64), where x' is x, x + `add`, or with `relu_grad_of=(y, s)` x * (y > 0) * s[c]; with
    `affine_relu=(scale, shift)` the output is relu(conv * scale + shift). Tensors of any layout;
    the output has x's memory format."""
    n, c_in, h, w = x.shape
    c_out, cg_in, k, k2 = weight.shape
    if k != k2 or k % 2 == 0 or c_in != cg_in * groups or c_out % groups:
        raise ValueError(
            f"grouped_conv takes square odd kernels over groups of x's channels, not {tuple(weight.shape)}"
        )
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    out = torch.empty((n, c_out, h, w), dtype=weight.dtype, device=x.device, memory_format=fmt)
    weight = weight.contiguous()
    second = add if add is not None else (relu_grad_of[0] if relu_grad_of is not None else x)
    scale, shift = affine_relu if affine_relu is not None else (weight, weight)
    prologue = ADD_INPUT if add is not None else RELU_GRAD if relu_grad_of is not None else NO_PROLOGUE
    cg_out = c_out // groups
    block_n = max(16, triton.next_power_of_2(cg_out))
    acc = tl.float64 if weight.dtype == torch.float64 else tl.float32
    tf32 = _tf32(weight.dtype, x)
    grid = (triton.cdiv(n * h * w, 64), groups)
    with on_device(x):
        _grouped_conv_kernel[grid](
            x, second, second, relu_grad_of[1] if relu_grad_of is not None else weight, weight, scale, shift, out,
            h, w, n * h * w,
            *x.stride(), *second.stride(), *out.stride(),
            cg_in, cg_out,
            K=k, PROLOGUE=prologue, AFFINE_RELU=affine_relu is not None, TF32=tf32,
            ACC=acc, BLOCK_M=64, BLOCK_N=block_n, BLOCK_K=32,
        )  # fmt: skip
    return out


def _tf32(dtype: torch.dtype, x: torch.Tensor) -> bool:
    """Triton's default dot precision ("tf32", which 16-bit operands ignore) except where it would
    round: float64, and float32 unless cuDNN's convolutions may use TF32 too (the plain path's)."""
    if dtype == torch.float64:
        return False
    return dtype != torch.float32 or (x.is_cuda and torch.backends.cudnn.allow_tf32)


def transposed_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The weight whose stride-1 "same" grouped conv is the input gradient of `weight`'s: in-group
    input and output channels swapped, the kernel flipped."""
    c_out, cg_in, k, _ = weight.shape
    w = weight.reshape(groups, c_out // groups, cg_in, k, k).transpose(1, 2).flip(-1, -2)
    return w.reshape(groups * cg_in, c_out // groups, k, k).contiguous()


@triton.jit
def _weight_grad_kernel(
    x_ptr, g_ptr, out_ptr,
    H, W, P, PIXELS,  # PIXELS: output pixels a program sums over (a multiple of BLOCK_P)
    sxn, sxc, sxh, sxw,
    sgn, sgc, sgh, sgw,
    CG_IN, CG_OUT, C_OUT,
    K: tl.constexpr, TF32: tl.constexpr, ACC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Partial weight gradients: program (chunk, g, r-block) sums grad[p, co] * x[p + (kh, kw), ci]
    over its chunk of pixels into out[chunk, g * CG_OUT + co, r], r = (ci, kh, kw) flattened."""
    chunk, g, pid_r = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    co = tl.arange(0, BLOCK_CO)
    co_ok = co < CG_OUT
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    reduction = CG_IN * K * K
    r_ok = r < reduction
    ci, kh, kw = r // (K * K), (r // K) % K, r % K
    acc = tl.zeros((BLOCK_CO, BLOCK_R), dtype=ACC)
    for p0 in range(chunk * PIXELS, chunk * PIXELS + PIXELS, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_ok = p < P
        n, hw = p // (H * W), p % (H * W)
        oh, ow = hw // W, hw % W
        cout = g * CG_OUT + co
        grad = tl.load(
            g_ptr + n[:, None] * sgn + cout[None, :] * sgc + oh[:, None] * sgh + ow[:, None] * sgw,
            mask=p_ok[:, None] & co_ok[None, :], other=0.0,
        )  # fmt: skip
        ih = oh[:, None] + kh[None, :] - K // 2
        iw = ow[:, None] + kw[None, :] - K // 2
        ok = p_ok[:, None] & r_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        c = g * CG_IN + ci
        x = tl.load(x_ptr + n[:, None] * sxn + c[None, :] * sxc + ih * sxh + iw * sxw, mask=ok, other=0.0)
        if TF32:
            acc += tl.dot(tl.trans(grad), x.to(grad.dtype), input_precision="tf32", out_dtype=ACC)
        else:
            acc += tl.dot(tl.trans(grad), x.to(grad.dtype), input_precision="ieee", out_dtype=ACC)
    offsets = chunk * C_OUT * reduction + (g * CG_OUT + co[:, None]) * reduction + r[None, :]
    tl.store(out_ptr + offsets, acc, mask=co_ok[:, None] & r_ok[None, :])


WGRAD_PIXELS = 4096  # output pixels one program of the weight gradient sums over


def weight_grad(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, groups: int) -> torch.Tensor:
    """The gradient of the stride-1 "same" grouped conv's weight, from its input x and the gradient
    of its output, in weight's dtype: per-chunk partial sums in the accumulator's dtype, added in a
    fixed order (deterministic, unlike atomics)."""
    n, _, h, w = x.shape
    c_out, cg_in, k, _ = weight.shape
    cg_out, reduction, pixels = c_out // groups, cg_in * k * k, n * h * w
    x, grad = x.to(weight.dtype), grad.to(weight.dtype)
    block_p = 64
    per_program = min(WGRAD_PIXELS, triton.cdiv(pixels, block_p) * block_p)
    chunks = triton.cdiv(pixels, per_program)
    acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    partial = torch.zeros((chunks, c_out, reduction), dtype=acc_dtype, device=x.device)
    block_r = min(64, max(16, triton.next_power_of_2(reduction)))
    grid = (chunks, groups, triton.cdiv(reduction, block_r))
    with on_device(x):
        _weight_grad_kernel[grid](
            x, grad, partial, h, w, pixels, per_program, *x.stride(), *grad.stride(), cg_in, cg_out, c_out,
            K=k, TF32=_tf32(weight.dtype, x),
            ACC=tl.float64 if acc_dtype == torch.float64 else tl.float32,
            BLOCK_P=block_p, BLOCK_CO=max(16, triton.next_power_of_2(cg_out)), BLOCK_R=block_r,
        )  # fmt: skip
    return partial.sum(0).view(weight.shape).to(weight.dtype)


class GroupedConv(torch.autograd.Function):
    """conv2d(x, weight, padding=k // 2, groups=groups) with the kernels' forward and gradients."""

    @staticmethod
    def forward(ctx, x, weight, groups):
        ctx.save_for_backward(x, weight)
        ctx.groups = groups
        return grouped_conv(x.to(weight.dtype), weight, groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        if backward_differentiated() or not has_storage(grad):  # double backward, batched grads: written out
            groups, k = ctx.groups, weight.shape[-1]

            def formula(x, weight):
                return F.conv2d(x.to(weight.dtype), weight, padding=k // 2, groups=groups)

            return (*graph_gradients(formula, (x, weight), ctx.needs_input_grad[:2], grad), None)
        grad = grad.to(weight.dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = grouped_conv(grad, transposed_weight(weight, ctx.groups), ctx.groups).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = weight_grad(x, weight, grad, ctx.groups)
        return grad_x, grad_w, None


def _cascade_formula(groups: int, has_prev: bool):
    """CascadeStep's function in plain ops (differentiable to any order)."""

    def formula(chunk, prev, weight, scale, shift):
        inp = (chunk + prev if has_prev else chunk).to(weight.dtype)
        z = F.conv2d(inp, weight, padding=weight.shape[-1] // 2, groups=groups)
        return torch.relu(z * scale[:, None, None] + shift[:, None, None]).to(weight.dtype)

    return formula


class CascadeStep(torch.autograd.Function):
    """One split of the hierarchical cascade in eval mode: relu((chunk + prev) conv weight * scale +
    shift), the BatchNorm's affine map (scale, shift) applied in the epilogue. Its input gradient is
    one kernel (ReLU mask and scale in the prologue); weight, scale and shift gradients, which only
    eval-mode fine-tuning asks for, recompute the conv."""

    @staticmethod
    def forward(ctx, chunk, prev, weight, scale, shift, groups):
        dtype = weight.dtype  # the conv's; the epilogue computes in the accumulator's (scale's for bf16)
        add = prev.to(dtype) if prev is not None else None
        out = grouped_conv(chunk.to(dtype), weight, groups, add=add, affine_relu=(scale, shift))
        ctx.save_for_backward(chunk, prev, weight, scale, shift, out)
        ctx.groups, ctx.has_prev = groups, prev is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        chunk, prev, weight, scale, shift, out = ctx.saved_tensors
        if backward_differentiated() or not has_storage(grad):  # double backward, batched grads: written out
            inputs, needs = (chunk, prev, weight, scale, shift), ctx.needs_input_grad[:5]
            if not ctx.has_prev:
                inputs, needs = (chunk, chunk, weight, scale, shift), (needs[0], False, *needs[2:])
            return (*graph_gradients(_cascade_formula(ctx.groups, ctx.has_prev), inputs, needs, grad), None)
        grad = grad.to(weight.dtype)
        grad_in = grad_w = grad_scale = grad_shift = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            relu_grad = (out, scale)
            grad_in = grouped_conv(grad, transposed_weight(weight, ctx.groups), ctx.groups, relu_grad_of=relu_grad)
        if any(ctx.needs_input_grad[2:5]):
            inp = chunk.to(weight.dtype) + (prev.to(weight.dtype) if ctx.has_prev else 0)
            z = grouped_conv(inp, weight, ctx.groups)
            masked = torch.where(out > 0, grad, torch.zeros((), dtype=grad.dtype, device=grad.device))
            grad_shift = masked.sum((0, 2, 3)).to(scale.dtype)
            grad_scale = (masked * z).sum((0, 2, 3)).to(scale.dtype)
            if ctx.needs_input_grad[2]:
                grad_w = weight_grad(inp, weight, masked * scale.to(weight.dtype)[:, None, None], ctx.groups)
        grad_chunk = grad_in.to(chunk.dtype) if grad_in is not None and ctx.needs_input_grad[0] else None
        grad_prev = grad_in.to(prev.dtype) if grad_in is not None and ctx.needs_input_grad[1] else None
        return grad_chunk, grad_prev, grad_w, grad_scale, grad_shift, None
