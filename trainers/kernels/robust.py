"""The RobustResBlock's GPU formulation: the fused runtime's (`trainers.fused.bottleneck`) with the
stride-1 hierarchical cascade and the residual SE's combine on the Triton kernels. The same
function as the emitted block's `forward`, from the same modules and state dict: BatchNorm in
training mode normalises with the batch's statistics and updates the running ones as
`nn.BatchNorm2d` does."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainers.fused.bottleneck import conv1_and_skip, split_convs
from trainers.fused.folds import bn_affine, bn_tensors, compute_dtype, folded
from trainers.kernels.conv import CascadeStep, GroupedConv
from trainers.kernels.se import ResidualSECombine


def robust_forward(block: nn.Module, x: torch.Tensor, same_pad=None) -> torch.Tensor:
    """The block's output (`same_pad`: the emitted file's padding helper, as in the fused runtime)."""
    h, skip = conv1_and_skip(block, x)
    h = block.act(h)
    u = cascade(block, h) if cascade_fits(block) else split_convs(block, h, same_pad)
    if block.se == "residual":
        return residual_se(block, block.conv3(u), skip)
    return block.conv3(u) + skip


def cascade_fits(block: nn.Module) -> bool:
    """Whether the kernels run the block's k x k convs: the stride-1 cascade (S > 1) of odd square
    kernels with a ReLU (strided blocks have no cascade: their convs are one grouped conv already)."""
    conv = block.convs[0]
    return block.scales > 1 and block.stride == 1 and conv.kernel_size[0] % 2 == 1 and type(block.act) is nn.ReLU


def cascade(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The hierarchical split convs: split i (after the first) adds split i - 1's output; each is a
    conv, its BatchNorm and the ReLU, one kernel in eval mode; the last split passes through."""
    chunks = torch.split(h, block.width, dim=1)
    dtype = compute_dtype(h)
    outs, prev = [], None
    for chunk, conv, bn in zip(chunks, block.convs, block.bns):
        weight = conv.weight.to(dtype)
        if bn.training:
            inp = chunk if prev is None else chunk + prev
            prev = F.relu(bn(GroupedConv.apply(inp, weight, conv.groups)))
        else:
            scale, shift = folded(h, bn, bn_tensors(bn), bn_affine, bn)
            prev = CascadeStep.apply(chunk, prev, weight, scale, shift, conv.groups)
        outs.append(prev)
    outs.append(chunks[-1])
    return torch.cat(outs, dim=1)


def residual_se(block: nn.Module, h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """h + skip + SE(se_bn(h)), SE(z) = z * sigmoid(fc2(relu(fc1(mean(z))))): the BatchNorm's map
    (a, b) and the gate are small tensors; the passes over h are the pooling and one combine."""
    a, b = _batch_norm_map(block.se_bn, h)
    pooled = _wide(h).mean((2, 3)).to(a.dtype) * a + b  # mean(a * h + b)
    gate = torch.sigmoid(block.se_fc2(torch.relu(block.se_fc1(pooled))))
    return ResidualSECombine.apply(h, skip, a, b, gate)


def _batch_norm_map(bn: nn.BatchNorm2d, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bn(h) as h * a + b per channel: from the running statistics in eval mode; in training mode
    from the batch's (differentiable), updating the running statistics as the module would."""
    if not bn.training:
        return folded(h, bn, bn_tensors(bn), bn_affine, bn)
    var, mean = torch.var_mean(_wide(h), dim=(0, 2, 3), unbiased=False)
    with torch.no_grad():
        bn.num_batches_tracked.add_(1)
        momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        count = h.numel() // h.shape[1]
        bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), momentum)
        bn.running_var.lerp_((var * count / max(count - 1, 1)).to(bn.running_var.dtype), momentum)
    a = bn.weight * torch.rsqrt(var.to(bn.weight.dtype) + bn.eps)
    return a, bn.bias - mean.to(bn.weight.dtype) * a


def _wide(t: torch.Tensor) -> torch.Tensor:
    """t in float32 at least (bf16 activations' statistics are taken in float32)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))
