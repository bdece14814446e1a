"""The residual squeeze-and-excitation's combine, h + skip + (a * h + b) * gate, as one Triton pass
forward and one backward. a and b are the SE branch BatchNorm's per-channel affine map (eval mode:
from its running statistics; training mode: from the batch's, so that their gradients reach h
through the statistics), gate the per-sample, per-channel sigmoid computed from the pooled
(a * h + b). Autograd would run the BatchNorm, the gating product and the two adds as separate
passes over the block's largest tensor, each saving its own."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from trainers.fused.folds import backward_differentiated, graph_gradients, has_storage
from trainers.kernels import on_device


@triton.jit
def _tile(n, c, ph, pw, sn, sc, sh, sw):
    """Offsets of sample n's [pixels, channels] tile in a tensor of strides (sn, sc, sh, sw)."""
    return n * sn + c[None, :] * sc + ph[:, None] * sh + pw[:, None] * sw


@triton.jit
def _combine_kernel(
    h_ptr, skip_ptr, a_ptr, b_ptr, gate_ptr, out_ptr, C, HW, W,
    shn, shc, shh, shw, ssn, ssc, ssh, ssw, son, soc, soh, sow, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """out = h + skip + (a h + b) gate over a tile of sample n's pixels and channels."""
    n, pid_p, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (p < HW)[:, None] & (c < C)[None, :]
    ph, pw = p // W, p % W
    h = tl.load(h_ptr + _tile(n, c, ph, pw, shn, shc, shh, shw), mask=ok, other=0.0)
    skip = tl.load(skip_ptr + _tile(n, c, ph, pw, ssn, ssc, ssh, ssw), mask=ok, other=0.0)
    a = tl.load(a_ptr + c, mask=c < C, other=0.0)
    b = tl.load(b_ptr + c, mask=c < C, other=0.0)
    gate = tl.load(gate_ptr + n * C + c, mask=c < C, other=0.0)
    hf = h.to(a.dtype)
    out = hf + skip.to(a.dtype) + (hf * a[None, :] + b[None, :]) * gate[None, :]
    tl.store(out_ptr + _tile(n, c, ph, pw, son, soc, soh, sow), out.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _combine_backward_kernel(
    g_ptr, h_ptr, a_ptr, gate_ptr, gh_ptr, sums_ptr, C, HW, W,
    sgn, sgc, sgh, sgw, shn, shc, shh, shw, son, soc, soh, sow, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """grad_h = g * (1 + a * gate); sums[n, 0, c] = sum over pixels of g * h, sums[n, 1, c] of g."""
    n, pid_c = tl.program_id(0), tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    a = tl.load(a_ptr + c, mask=c_ok, other=0.0)
    gain = 1.0 + a * tl.load(gate_ptr + n * C + c, mask=c_ok, other=0.0)
    gh_sum = tl.zeros((BLOCK_C,), dtype=a.dtype)
    g_sum = tl.zeros((BLOCK_C,), dtype=a.dtype)
    for p0 in range(0, HW, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        ok = (p < HW)[:, None] & c_ok[None, :]
        ph, pw = p // W, p % W
        g = tl.load(g_ptr + _tile(n, c, ph, pw, sgn, sgc, sgh, sgw), mask=ok, other=0.0).to(a.dtype)
        h = tl.load(h_ptr + _tile(n, c, ph, pw, shn, shc, shh, shw), mask=ok, other=0.0).to(a.dtype)
        grad_h = (g * gain[None, :]).to(gh_ptr.dtype.element_ty)
        tl.store(gh_ptr + _tile(n, c, ph, pw, son, soc, soh, sow), grad_h, mask=ok)
        gh_sum += tl.sum(g * h, axis=0)
        g_sum += tl.sum(g, axis=0)
    tl.store(sums_ptr + n * 2 * C + c, gh_sum, mask=c_ok)
    tl.store(sums_ptr + n * 2 * C + C + c, g_sum, mask=c_ok)


def _like(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    fmt = torch.channels_last if t.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    return torch.empty(t.shape, dtype=dtype, device=t.device, memory_format=fmt)


def _grid_c(c: int) -> int:
    return min(64, triton.next_power_of_2(c))


def _se_formula(h, a, b, gate):
    """The combine without its skip (whose gradient is the output's) in plain ops."""
    hf = h.to(a.dtype)
    return (hf + (hf * a[:, None, None] + b[:, None, None]) * gate.to(a.dtype)[:, :, None, None]).to(h.dtype)


class ResidualSECombine(torch.autograd.Function):
    """h + skip + (a * h + b) * gate[:, :, None, None], in h's dtype, computed in a's (float32 for
    bf16 activations)."""

    @staticmethod
    def forward(ctx, h, skip, a, b, gate):
        n, c, hh, ww = h.shape
        ctx.save_for_backward(h, a, b, gate)  # as given: a double backward differentiates through them
        ctx.skip_dtype = skip.dtype
        out = _like(h, h.dtype)
        block_c = _grid_c(c)
        grid = (n, triton.cdiv(hh * ww, 32), triton.cdiv(c, block_c))
        with on_device(h):
            _combine_kernel[grid](
                h, skip, a.contiguous(), b.contiguous(), gate.to(a.dtype).contiguous(), out, c, hh * ww, ww,
                *h.stride(), *skip.stride(), *out.stride(), BLOCK_P=32, BLOCK_C=block_c,
            )  # fmt: skip
        return out

    @staticmethod
    def backward(ctx, grad):
        h, a, b, gate = ctx.saved_tensors
        if backward_differentiated() or not has_storage(grad):  # double backward, batched grads: written out
            needs = (ctx.needs_input_grad[0], *ctx.needs_input_grad[2:5])
            grad_h, grad_a, grad_b, grad_gate = graph_gradients(_se_formula, (h, a, b, gate), needs, grad)
            return grad_h, grad.to(ctx.skip_dtype), grad_a, grad_b, grad_gate
        n, c, hh, ww = h.shape
        gate = gate.to(a.dtype).contiguous()
        grad_h = _like(h, h.dtype)
        sums = torch.empty((n, 2, c), dtype=a.dtype, device=h.device)
        block_c = _grid_c(c)
        with on_device(h):
            _combine_backward_kernel[(n, triton.cdiv(c, block_c))](
                grad, h, a.contiguous(), gate, grad_h, sums, c, hh * ww, ww,
                *grad.stride(), *h.stride(), *grad_h.stride(), BLOCK_P=32, BLOCK_C=block_c,
            )  # fmt: skip
        gh, g = sums[:, 0], sums[:, 1]  # per sample and channel: sum of grad * h, of grad
        grad_gate = a * gh + b * g
        grad_a = (gate * gh).sum(0) if ctx.needs_input_grad[2] else None
        grad_b = (gate * g).sum(0) if ctx.needs_input_grad[3] else None
        return grad_h, grad.to(ctx.skip_dtype), grad_a, grad_b, grad_gate
