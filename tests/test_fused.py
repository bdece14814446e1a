"""The fused formulation of the emitted blocks computes the plain one's function from the same
state dict: outputs, input and parameter gradients and BatchNorm statistics agree to float64
rounding in train and eval mode, for every knob the fused path covers (and the others fall back)."""

import copy
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from scaler.builder import build_model
from scaler.codegen import render
from scaler.cost import count
from scaler.spec import ArchSpec
from scaler.verify import fvcore_flops, plain_formulation, use_plain_formulation

ROBUST = dict(block="robust", depths=(1, 1, 1), planes=(16, 32, 64))
SPECS = {
    "robust": ArchSpec("robust", (2, 1, 1), (16, 32, 64)),  # an identity block too
    "robust-se-none": ArchSpec(**ROBUST, se="none"),
    "robust-s1": ArchSpec(**ROBUST, scales=1, cardinality=1, base_width=160),
    "robust-k5-silu": ArchSpec(**ROBUST, kernel_size=5, activation="silu"),
    "robust-same-pad": ArchSpec(**ROBUST, padding="same"),
    "robust-g2": ArchSpec(**ROBUST, cardinality=2, scales=4),
    "basic": ArchSpec("basic", (2, 1, 1), (16, 32, 64)),
    "basic-same-pad": ArchSpec("basic", (1, 1, 1), (16, 32, 64), padding="same"),
    "basic-post": ArchSpec("basic-post", (1, 1, 1), (16, 32, 64)),
    "basic-proj": ArchSpec("basic", (2, 1, 1), (32, 32, 64)),  # identity, stride-1 and strided projections
    "mixed": ArchSpec(("basic", "basic", "robust"), (1, 1, 1), (16, 32, 64)),
}
FALLBACK = {
    "robust-se-standard": ArchSpec(**ROBUST, se="standard"),
    "robust-post": ArchSpec("robust-post", (1, 1, 1), (16, 32, 64)),
    "robust-layer-norm": ArchSpec(**ROBUST, norm="layer"),
}


def randomise_batchnorm(model, gen):
    """Running statistics and affine parameters away from their init, so folding is not trivial."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen, dtype=m.running_mean.dtype) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=gen, dtype=m.running_var.dtype) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=gen, dtype=m.weight.dtype) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen, dtype=m.bias.dtype) * 0.1)


def pair(spec):
    torch.manual_seed(0)
    fused = build_model(spec).double()
    randomise_batchnorm(fused, torch.Generator().manual_seed(1))
    plain = copy.deepcopy(fused)
    use_plain_formulation(plain)
    return fused, plain


def run(model, x, y, train: bool):
    model.train(train)
    x = x.clone().requires_grad_(True)
    out = model(x)
    torch.nn.functional.cross_entropy(out, y).backward()
    return out.detach(), x.grad


QUICK = ("robust", "basic", "robust-same-pad", "mixed")


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", [n if n in QUICK else pytest.param(n, marks=pytest.mark.slow) for n in sorted(SPECS)])
def test_fused_equals_plain(name, train):
    check_fused_equals_plain(name, train)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", ["robust", "robust-g2"])
def test_fused_equals_plain_channels_last(name, train):
    """channels_last is where the cascade copies its channel slices and its cat hands back dense
    gradients (`dense`, `DenseCat`): same function, same gradients."""
    check_fused_equals_plain(name, train, torch.channels_last)


def check_fused_equals_plain(name, train, memory_format=torch.contiguous_format):
    fused, plain = pair(SPECS[name])
    fused, plain = fused.to(memory_format=memory_format), plain.to(memory_format=memory_format)
    assert any(getattr(m, "fused", False) for m in fused.modules() if m is not fused), "no block runs fused"
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(3, 3, 8, 8, generator=gen, dtype=torch.float64)  # float64 convs are slow on the CPU
    x = x.contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (3,), generator=gen)
    for _ in range(2 if train else 1):  # the second pass sees the running statistics the first updated
        out_f, gx_f = run(fused, x, y, train)
        out_p, gx_p = run(plain, x, y, train)
        torch.testing.assert_close(out_f, out_p, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(gx_f, gx_p, rtol=1e-8, atol=1e-12)
    for (key, p), q in zip(fused.named_parameters(), plain.parameters()):
        assert (p.grad is None) == (q.grad is None), key
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-11, msg=key)
    state_f, state_p = fused.state_dict(), plain.state_dict()
    assert list(state_f) == list(state_p)
    for key in state_f:
        torch.testing.assert_close(state_f[key], state_p[key], rtol=1e-12, atol=1e-14, msg=key)


@pytest.mark.parametrize("name", sorted(FALLBACK))
def test_unfused_variants_run_plain(name):
    """SE placements, norms and layouts the fused path does not cover run their plain forward."""
    model = build_model(FALLBACK[name])
    blocks = [m for n, m in model.named_modules() if n.startswith("stage") and n.count(".") == 1]
    assert blocks and not any(getattr(b, "fused", False) for b in blocks)


def test_bf16_channels_last_close_to_plain():
    """The speed path itself (bf16 autocast, channels_last): outputs within bf16 rounding."""
    torch.manual_seed(0)
    fused = build_model(SPECS["robust"]).eval().to(memory_format=torch.channels_last)
    randomise_batchnorm(fused, torch.Generator().manual_seed(1))
    x = torch.rand(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a = fused(x).float()
        with plain_formulation(fused):
            b = fused(x).float()
    assert (a - b).abs().max() <= 0.05 * b.abs().max()


@pytest.mark.parametrize("name", ["robust", "basic", "robust-same-pad"])
def test_flops_are_counted_on_the_plain_formulation(name):
    """fvcore sees the plain formulation (the flags are restored after): the cost model's count."""
    spec = SPECS[name]
    model = build_model(spec)
    total, _ = fvcore_flops(model, spec.resolution)
    assert total == count(spec).flops
    assert all(m.fused for m in model.modules() if hasattr(m, "fused"))


def test_plain_and_fused_state_dicts_load_into_each_other():
    """A checkpoint written by either formulation loads strictly into the other (same names)."""
    fused, plain = pair(SPECS["robust"])
    fused.load_state_dict(plain.state_dict())
    plain.load_state_dict(fused.state_dict())
    assert list(fused.state_dict()) == list(plain.state_dict())


def test_dense_cat_hands_back_dense_gradients():
    """The cascade's cat returns channels_last gradients of its own for each piece (strided slices
    make the gradient additions after it several times slower)."""
    namespace = {}
    exec(render(SPECS["robust"]), namespace)
    cl = torch.channels_last
    pieces = [
        torch.rand(2, 4, 3, 3, dtype=torch.float64).contiguous(memory_format=cl).requires_grad_() for _ in range(3)
    ]
    out = namespace["DenseCat"].apply(*pieces)
    torch.testing.assert_close(out, torch.cat(pieces, 1), rtol=0, atol=0)
    g = torch.rand(out.shape, dtype=torch.float64).contiguous(memory_format=cl)
    grads = torch.autograd.grad(out, pieces, g)
    assert all(t.is_contiguous(memory_format=cl) for t in grads)
    torch.testing.assert_close(torch.cat(grads, 1), g, rtol=0, atol=0)


@pytest.mark.parametrize(
    "channels,per_group,stride,dense",
    [(8, 2, 2, True), (16, 4, 1, True), (64, 8, 1, True), (72, 8, 1, False), (64, 16, 2, False), (96, 2, 2, False)],
)
def test_thin_grouped_convs_run_dense_in_bf16(channels, per_group, stride, dense):
    """Under bf16 autocast on a CPU, grouped convs with up to 64 input channels and 8 per group run
    as a dense conv with a block-diagonal weight (`dense_route`), in float32 and float64 as they
    are; whichever route, output and input, weight and bias gradients match a float64 reference."""
    namespace = {}
    exec(render(SPECS["robust"]), namespace)
    gen = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    groups = channels // per_group
    conv = torch.nn.Conv2d(channels, channels, 3, stride, 1, groups=groups, bias=False)
    x = torch.rand(2, channels, 6, 6, generator=gen).contiguous(memory_format=cl).requires_grad_()
    b = torch.randn(channels, generator=gen).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert namespace["dense_route"](x, conv.weight, groups) == dense
        assert not namespace["dense_route"](x.double(), conv.weight.double(), groups)  # autocast leaves float64
        out = namespace["conv2d"](x, conv.weight, b, conv, groups)
    assert out.dtype == torch.bfloat16
    assert not namespace["dense_route"](x, conv.weight, groups)  # float32 without autocast: grouped
    g = torch.randn(out.shape, generator=gen).bfloat16().contiguous(memory_format=cl)
    grads = torch.autograd.grad(out, [x, conv.weight, b], g)
    leaves = [t.detach().bfloat16().double().requires_grad_() for t in (x, conv.weight, b)]
    ref = torch.nn.functional.conv2d(*leaves, stride, 1, 1, groups)
    torch.testing.assert_close(out.double(), ref, rtol=2e-2, atol=3e-2)
    for got, want in zip(grads, torch.autograd.grad(ref, leaves, g.double())):
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=1e-1)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_bf16_channels_last_gradients_as_close_as_plain(train):
    """The speed path as training and the attacks run it (bf16 autocast, channels_last: dense
    routes, dense slices, DenseCat): its input and parameter gradients are as close to the float32
    ones as the plain formulation's under the same autocast (bf16 rounding on a random network
    moves them by tens of percent, so the plain formulation's error is the yardstick)."""
    fused, plain = pair(SPECS["robust"])
    fused, plain = (m.float().to(memory_format=torch.channels_last).train(train) for m in (fused, plain))
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(8, 3, 16, 16, generator=gen).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,), generator=gen)

    def gradients(model, bf16):
        model = copy.deepcopy(model)
        xr = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = torch.nn.functional.cross_entropy(model(xr).float(), y)
        gx, *gp = torch.autograd.grad(loss, [xr, *model.parameters()], allow_unused=True)
        return gx, torch.cat([g.flatten() for g in gp if g is not None])

    def error(got, want):
        return [((a - b).norm() / b.norm()).item() for a, b in zip(got, want)]

    truth = gradients(plain, False)
    with spy(fused, "dense_route") as routes:
        fused_error = error(gradients(fused, True), truth)
    plain_error = error(gradients(plain, True), truth)
    assert any(routes), "no conv took the dense route"
    for f, p in zip(fused_error, plain_error):
        assert f <= 1.5 * p + 0.01, (fused_error, plain_error)
    assert error(gradients(fused, False), truth) == pytest.approx([0, 0], abs=1e-5)  # float32: the same


def test_block_diagonal_weight_is_the_grouped_conv():
    """The dense weight computes exactly the grouped conv (zeros outside each group) in float64."""
    namespace = {}
    exec(render(SPECS["robust"]), namespace)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(12, 3, 3, 3, generator=gen, dtype=torch.float64)
    x = torch.randn(2, 12, 5, 5, generator=gen, dtype=torch.float64)
    dense = namespace["block_diagonal"](w, 4)
    assert dense.shape == (12, 12, 3, 3) and int((dense != 0).sum()) == w.numel()
    torch.testing.assert_close(F.conv2d(x, dense, None, 2, 1), F.conv2d(x, w, None, 2, 1, 1, 4), rtol=1e-12, atol=1e-12)


@contextmanager
def spy(model, name):
    """The list of what the emitted module's function `name` returns, recorded inside."""
    namespace, calls = type(model).__init__.__globals__, []
    original = namespace[name]
    namespace[name] = lambda *args: calls.append(original(*args)) or calls[-1]
    try:
        yield calls
    finally:
        namespace[name] = original


def frozen_input_gradient(model, x, y, bf16=False):
    """Logits and the input gradient with every parameter frozen, as the attacks run the model."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    xr = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(xr)
    out = out.float() if bf16 else out
    return out.detach(), torch.autograd.grad(torch.nn.functional.cross_entropy(out, y), [xr])[0]


def test_frozen_eval_residual_se_without_h_equals_plain():
    """With parameters frozen (attacks) the eval-mode residual SE runs conv3 as a batched matmul
    with per-sample weights (`ConvResidualSE`) where the map has >= 4 pixels per channel: same
    logits and input gradients as the plain formulation in float64, with and without grad."""
    fused, plain = pair(SPECS["robust"])
    fused, plain = (m.to(memory_format=torch.channels_last) for m in (fused, plain))
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(3, 3, 16, 16, generator=gen, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (3,), generator=gen)
    with spy(fused, "per_sample_route") as calls:
        out_f, gx_f = frozen_input_gradient(fused, x, y)
        with torch.no_grad():
            clean = fused(x)
    out_p, gx_p = frozen_input_gradient(plain, x, y)
    assert True in calls and False in calls  # the 16x16 stage takes it, the 8x8 and 4x4 ones do not
    torch.testing.assert_close(out_f, out_p, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(clean, out_p, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(gx_f, gx_p, rtol=1e-8, atol=1e-12)


def test_residual_se_without_h_only_for_frozen_channels_last_cpu():
    """Parameters that want gradients, NCHW operands or an fp32 map under bf16 autocast keep the
    path through h (whose Function has the parameter gradients)."""
    fused, _ = pair(SPECS["robust"])
    fused = fused.float().eval()
    block = fused.stage1[0]
    cl = torch.channels_last
    u = torch.rand(2, block.conv3.in_channels, 16, 16).contiguous(memory_format=cl)
    skip = torch.rand(2, block.conv3.out_channels, 16, 16).contiguous(memory_format=cl)
    route = type(fused).__init__.__globals__["per_sample_route"]
    modules = (block.conv3, block.se_bn, block.se_fc1, block.se_fc2)
    assert not route(u, skip, *modules)  # parameters require grad
    for p in fused.parameters():
        p.requires_grad_(False)
    assert route(u, skip, *modules)
    assert not route(u.contiguous(), skip.contiguous(), *modules)
    small = (t[:, :, :4, :4].contiguous(memory_format=cl) for t in (u, skip))
    assert not route(*small, *modules)  # 16 pixels for 32 channels
    assert not route(u, skip.double().contiguous(memory_format=cl), *modules)
    for p in (p for m in modules for p in m.parameters()):  # any one parameter that wants a gradient
        p.requires_grad_(True)
        assert not route(u, skip, *modules)
        p.requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not route(u, skip, *modules)
        assert route(u.bfloat16(), skip.bfloat16(), *modules)


def test_bf16_frozen_input_gradients_as_close_as_plain():
    """The attacks' bf16 path through `ConvResidualSE`: logits and input gradients no further from
    the float32 ones than the plain formulation's under the same autocast."""
    fused, plain = pair(SPECS["robust"])
    fused, plain = (m.float().to(memory_format=torch.channels_last) for m in (fused, plain))
    gen = torch.Generator().manual_seed(5)
    x = torch.rand(8, 3, 32, 32, generator=gen).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,), generator=gen)
    truth = frozen_input_gradient(copy.deepcopy(plain), x, y)
    with spy(fused, "per_sample_route") as calls:
        got = frozen_input_gradient(fused, x, y, bf16=True)
    assert True in calls
    reference = frozen_input_gradient(plain, x, y, bf16=True)
    for g, r, t in zip(got, reference, truth):
        assert (g - t).norm() <= 1.5 * (r - t).norm() + 1e-3 * t.norm()


def test_conv_residual_se_gradients_by_gradcheck():
    """`ConvResidualSE` against conv3 + the SE written out, in float64 by finite differences, with
    an SE hidden layer of 3 whose pre-activations take both signs (so its ReLU mask matters)."""
    fused, _ = pair(SPECS["robust"])
    cls = type(fused).__init__.__globals__["ConvResidualSE"]
    gen = torch.Generator().manual_seed(6)
    cl = torch.channels_last
    u = torch.randn(2, 4, 3, 5, generator=gen, dtype=torch.float64).contiguous(memory_format=cl)
    skip = torch.randn(2, 6, 3, 5, generator=gen, dtype=torch.float64).contiguous(memory_format=cl)
    w3, w1, w2 = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((6, 4, 1, 1), (3, 6), (6, 3)))
    scale, shift = (
        torch.rand(6, generator=gen, dtype=torch.float64) + 0.5,
        torch.randn(6, generator=gen, dtype=torch.float64),
    )
    w1[1] = -w1[0]  # so the hidden pre-activations take both signs

    def written_out(u, skip):
        h = F.conv2d(u, w3)
        z = h * scale[:, None, None] + shift[:, None, None]
        pre = z.mean((2, 3)) @ w1.t()
        return h + skip + z * torch.sigmoid(torch.relu(pre) @ w2.t())[:, :, None, None], pre

    pre = written_out(u, skip)[1]
    assert (pre > 0).any() and (pre < 0).any()
    torch.testing.assert_close(cls.apply(u, skip, w3, scale, shift, w1, w2), written_out(u, skip)[0])
    leaves = [t.clone().requires_grad_() for t in (u, skip)]
    assert torch.autograd.gradcheck(lambda a, b: cls.apply(a, b, w3, scale, shift, w1, w2), leaves)


def test_fused_shortcut_samples_odd_maps():
    """The eval-mode strided shortcut on odd-sized maps (its 1x1 conv samples rows and columns
    0, 2, 4, ...): same logits and input gradients as the plain formulation in float64."""
    fused, plain = pair(SPECS["robust"])
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(2, 3, 9, 7, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (2,), generator=gen)
    out_f, gx_f = run(fused, x, y, train=False)
    out_p, gx_p = run(plain, x, y, train=False)
    torch.testing.assert_close(out_f, out_p, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(gx_f, gx_p, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("size", [(16, 16), (9, 7)], ids=["even", "odd"])
def test_frozen_eval_shared_input_equals_plain(size):
    """With parameters frozen (attacks) and channels_last inputs, each block's conv1 and skip branch
    read x through `SharedInputConv` (identity skips, a stride-1 and strided shortcuts): same
    logits and input gradients as the plain formulation in float64, clean logits too."""
    fused, plain = pair(SPECS["robust"])
    fused, plain = (m.to(memory_format=torch.channels_last) for m in (fused, plain))
    gen = torch.Generator().manual_seed(15)
    x = torch.rand(3, 3, *size, generator=gen, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (3,), generator=gen)
    with spy(fused, "shared_input_route") as calls:
        out_f, gx_f = frozen_input_gradient(fused, x, y)
        with torch.no_grad():
            clean = fused(x)
    blocks = [m for m in fused.modules() if type(m).__name__ == "RobustResBlock"]
    assert calls == [True] * len(blocks) + [False] * len(blocks)  # no route without gradients
    assert {(b.shortcut is None, b.stride) for b in blocks} == {(True, 1), (False, 1), (False, 2)}
    out_p, gx_p = frozen_input_gradient(plain, x, y)
    torch.testing.assert_close(out_f, out_p, rtol=1e-9, atol=1e-11)
    assert torch.equal(clean, out_f)
    torch.testing.assert_close(gx_f, gx_p, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("stride", [1, 2])
def test_shared_input_conv_gradients_by_gradcheck(stride):
    """`SharedInputConv` against conv1x1(x) and x's sampled pixels written out, by finite differences
    in float64, on an odd map; the skip's gradient is added (stride 1) or scattered (stride 2)."""
    fused, _ = pair(SPECS["robust"])
    cls = type(fused).__init__.__globals__["SharedInputConv"]
    gen = torch.Generator().manual_seed(16)
    x = torch.rand(2, 6, 5, 7, generator=gen, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(4, 6, 1, 1, generator=gen, dtype=torch.float64)
    bias = torch.randn(4, generator=gen, dtype=torch.float64)
    h, skip = cls.apply(x, weight, bias, stride)
    assert torch.equal(h, F.conv2d(x, weight, bias)) and torch.equal(skip, x[:, :, ::stride, ::stride])

    def f(a):
        h, skip = cls.apply(a.contiguous(memory_format=torch.channels_last), weight, bias, stride)
        return h, skip * 3  # a skip gradient unlike conv1's

    assert torch.autograd.gradcheck(f, [x.clone().requires_grad_()])


def test_shared_input_only_for_frozen_channels_last_cpu_gradients():
    """Folded weights that want gradients, NCHW or fp32 inputs under bf16 autocast, no input
    gradient, and forward-mode derivatives keep conv1 and the skip as two reads of x."""
    fused, _ = pair(SPECS["robust"])
    route = type(fused).__init__.__globals__["shared_input_route"]
    cl = torch.channels_last
    x = torch.rand(2, 8, 4, 4).contiguous(memory_format=cl).requires_grad_()
    weight, bias = torch.rand(4, 8, 1, 1), torch.rand(4)
    assert route(x, weight, bias)
    assert not route(x.detach(), weight, bias)
    with torch.no_grad():
        assert not route(x, weight, bias)
    assert not route(x.detach().contiguous().requires_grad_(), weight, bias)
    assert not route(x, weight.clone().requires_grad_(), bias)
    assert not route(x, weight, bias.clone().requires_grad_())
    assert not route(x, weight.double(), bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not route(x, weight.bfloat16(), bias.bfloat16())
        xb = x.detach().bfloat16().contiguous(memory_format=cl).requires_grad_()
        assert route(xb, weight.bfloat16(), bias.bfloat16())
    import torch.autograd.forward_ad as fwad

    with fwad.dual_level():
        assert not route(x, weight, bias)


def preact_blocks(model):
    return [m for m in model.modules() if type(m).__name__ == "BasicBlock"]


@pytest.mark.parametrize("size", [(16, 16), (9, 7)], ids=["even", "odd"])
def test_frozen_eval_preact_block_equals_plain(size):
    """With parameters frozen (attacks) and channels_last inputs, every pre-activation block runs as
    `PreactBlock` (identity, stride-1 and strided projections, odd maps): the plain formulation's
    logits and input gradients in float64, clean logits too; no route without gradients. Inside
    `constant_folds` each block's operands are built once for all steps."""
    fused, plain = pair(SPECS["basic-proj"])
    fused, plain = (m.to(memory_format=torch.channels_last) for m in (fused, plain))
    gen = torch.Generator().manual_seed(21)
    x = torch.rand(3, 3, *size, generator=gen, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (3,), generator=gen)
    blocks = preact_blocks(fused)
    assert {(b.shortcut is None, b.conv1.stride[0]) for b in blocks} == {(True, 1), (False, 1), (False, 2)}
    with spy(fused, "preact_route") as calls, spy(fused, "fold_preact") as builds, constant_folds(fused):
        out_f, gx_f = frozen_input_gradient(fused, x, y)
        again = frozen_input_gradient(fused, x, y)
        with torch.no_grad():
            clean = fused(x)
    assert calls == [True] * 2 * len(blocks) + [False] * len(blocks)
    assert len(builds) == len(blocks)  # the second attack step reused them
    out_p, gx_p = frozen_input_gradient(plain, x, y)
    torch.testing.assert_close(out_f, out_p, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(clean, out_f, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(gx_f, gx_p, rtol=1e-8, atol=1e-12)
    assert torch.equal(again[0], out_f) and torch.equal(again[1], gx_f)


@pytest.mark.parametrize("stride, project", [(1, False), (1, True), (2, True)], ids=["identity", "project", "stride2"])
def test_preact_block_gradients_by_gradcheck(stride, project):
    """`PreactBlock` against the block written out (bn1 as its affine map, bn2 folded into conv1) by
    finite differences in float64 on an odd map; x's gradient through both branches, masked by
    both ReLUs, with bn1's scale moved into the backward weights."""
    fused, _ = pair(SPECS["basic-proj"])
    cls = type(fused).__init__.__globals__["PreactBlock"]
    gen = torch.Generator().manual_seed(22)
    c_in, c_out = (4, 6) if project else (5, 5)
    scale, shift = (
        torch.rand(c_in, generator=gen, dtype=torch.float64) + 0.5,
        torch.randn(c_in, generator=gen, dtype=torch.float64),
    )
    w1 = torch.randn(c_out, c_in, 3, 3, generator=gen, dtype=torch.float64)
    b1 = torch.randn(c_out, generator=gen, dtype=torch.float64)
    w2 = torch.randn(c_out, c_out, 3, 3, generator=gen, dtype=torch.float64)
    projection = torch.randn(c_out, c_in, generator=gen, dtype=torch.float64) if project else None
    w1_in = w1 * scale[:, None, None]
    projection_in = projection * scale if project else None
    x = torch.randn(2, c_in, 7, 5, generator=gen, dtype=torch.float64).contiguous(memory_format=torch.channels_last)

    def written_out(a):
        pre = torch.relu(a * scale[:, None, None] + shift[:, None, None])
        h = torch.relu(F.conv2d(pre, w1, b1, stride, 1))
        skip = a if projection is None else F.conv2d(pre, projection[:, :, None, None], None, stride)
        return F.conv2d(h, w2, None, 1, 1) + skip

    def f(a):
        a = a.contiguous(memory_format=torch.channels_last)
        return cls.apply(a, (scale, shift, w1, b1, w1_in, w2, projection, projection_in), (stride, 1, 1))

    torch.testing.assert_close(f(x), written_out(x), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(f, [x.clone().requires_grad_()])
    assert torch.autograd.gradgradcheck(f, [x.clone().requires_grad_()])  # the differentiable fallback


def test_preact_route_only_for_frozen_relu_channels_last_cpu_gradients():
    """Parameters that want gradients, train mode, NCHW or fp32 inputs under bf16 autocast, no input
    gradient, another activation and forward-mode derivatives keep the block as autograd runs it."""
    fused, _ = pair(SPECS["basic-proj"])
    fused = fused.float().to(memory_format=torch.channels_last).eval()
    route = type(fused).__init__.__globals__["preact_route"]
    block = preact_blocks(fused)[0]
    for p in fused.parameters():
        p.requires_grad_(False)
    x = torch.rand(2, block.conv1.in_channels, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    assert route(x, block)
    assert not route(x.detach(), block)
    with torch.no_grad():
        assert not route(x, block)
    assert not route(x.detach().contiguous().requires_grad_(), block)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not route(x, block)
        assert route(x.detach().bfloat16().contiguous(memory_format=torch.channels_last).requires_grad_(), block)
    fused.train()  # frozen parameters in train mode: BatchNorm uses batch statistics
    assert not route(x, block)
    for bn in (block.bn1, block.bn2):  # either in train mode
        fused.eval()
        bn.train()
        assert not route(x, block)
    fused.eval()
    assert route(x, block)
    for p in (block.conv1.weight, block.bn1.weight, block.shortcut.weight):
        p.requires_grad_(True)
        assert not route(x, block)
        p.requires_grad_(False)
    for name in ("act1", "act2"):
        act = getattr(block, name)
        setattr(block, name, torch.nn.SiLU())
        assert not route(x, block)
        setattr(block, name, act)
    import torch.autograd.forward_ad as fwad

    with fwad.dual_level():
        assert not route(x, block)
    assert route(x, block)


def test_preact_block_second_order_and_batched_gradients_equal_plain():
    """Through `PreactBlock`'s backward: input Hessian-vector products (create_graph),
    forward-over-reverse (tangents on the cotangent) and per-class gradients in one call
    (`is_grads_batched`, a backward under vmap) equal the plain formulation's in float64."""
    import torch.autograd.forward_ad as fwad

    fused, plain = pair(SPECS["basic-proj"])
    fused, plain = (m.to(memory_format=torch.channels_last).eval() for m in (fused, plain))
    for p in (*fused.parameters(), *plain.parameters()):
        p.requires_grad_(False)
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(23), dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last)

    def hessian_vector(model):
        xr = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(model(xr).sin().sum(), xr, create_graph=True)
        return g.detach(), torch.autograd.grad(g.square().sum(), xr)[0]

    def forward_over_reverse(model):
        xr = x.clone().requires_grad_()
        out = model(xr)
        tangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(24), dtype=out.dtype)
        with fwad.dual_level():
            (g,) = torch.autograd.grad(out, xr, fwad.make_dual(torch.ones_like(out), tangent))
            return fwad.unpack_dual(g).primal.clone(), fwad.unpack_dual(g).tangent.clone()

    def jacobian(model):
        xr = x.clone().requires_grad_()
        out = model(xr)
        rows = torch.eye(out.shape[1], dtype=out.dtype)[:, None].expand(-1, *out.shape)
        return (torch.autograd.grad(out, xr, rows, is_grads_batched=True)[0],)

    checks = (hessian_vector, forward_over_reverse, jacobian)
    with spy(fused, "preact_route") as calls:
        got = [check(fused) for check in checks]
    assert calls and all(calls)
    for g, e in zip(got, [check(plain) for check in checks]):
        assert e[-1].abs().max() > 0
        for a, b in zip(g, e):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)


def test_functorch_gradients_through_preact_blocks_equal_plain():
    """Under torch.func.grad the input is a functorch wrapper without storage: the blocks keep
    autograd's path (no `PreactBlock`) and give the plain formulation's input gradient."""
    fused, plain = pair(SPECS["basic-proj"])
    fused, plain = (m.to(memory_format=torch.channels_last).eval() for m in (fused, plain))
    for p in (*fused.parameters(), *plain.parameters()):
        p.requires_grad_(False)
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(26), dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last)
    with spy(fused, "preact_route") as calls:
        got = torch.func.grad(lambda a: fused(a).sin().sum())(x)
    assert calls and not any(calls)
    expected = torch.func.grad(lambda a: plain(a).sin().sum())(x)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


PREACT_TENSORS = ("bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "conv1.weight")
PREACT_TENSORS += ("bn2.weight", "bn2.bias", "bn2.running_mean", "bn2.running_var", "conv2.weight", "shortcut.weight")


@pytest.mark.parametrize("change", [*PREACT_TENSORS, "re-estimated", "replaced"])
def test_preact_folds_see_changes_inside_the_span(change):
    """`PreactBlock`'s operands are rebuilt when any tensor they come from changes inside the span:
    each in place, BatchNorm statistics re-estimated by training forwards (which bump no version),
    the projection replaced through `.data` (twice, so an address may come back): exactly what the
    model gives outside a span, and not what it gave before the change."""
    fused, _ = pair(SPECS["basic-proj"])
    fused = fused.to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(27)
    x = torch.rand(2, 3, 12, 12, generator=gen, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (2,), generator=gen)
    block = fused.stage1[0]  # the stride-1 projection
    with spy(fused, "preact_route") as calls, constant_folds(fused):
        before = frozen_input_gradient(fused, x, y)
        if change in PREACT_TENSORS:
            with torch.no_grad():
                block.get_parameter(change).mul_(1.5) if "running" not in change else block.get_buffer(change).mul_(1.5)
        elif change == "re-estimated":
            fused.train()
            with torch.no_grad():
                fused(torch.rand(8, 3, 12, 12, dtype=torch.float64).contiguous(memory_format=torch.channels_last) * 3)
        else:
            for i in range(3):
                block.shortcut.weight.data = torch.randn_like(block.shortcut.weight)
                if i == 0:
                    frozen_input_gradient(fused, x, y)
        got = frozen_input_gradient(fused, x, y)
    n = len(preact_blocks(fused))
    assert calls[:n] == calls[-n:] == [True] * n  # the attack steps before and after the change
    expected = frozen_input_gradient(fused, x, y)
    assert not torch.equal(got[1], before[1])  # it did change
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_bf16_frozen_preact_input_gradients_as_close_as_plain():
    """The attacks' bf16 path through `PreactBlock`: logits and input gradients no further from the
    float32 ones than the plain formulation's under the same autocast."""
    fused, plain = pair(SPECS["basic-proj"])
    fused, plain = (m.float().to(memory_format=torch.channels_last) for m in (fused, plain))
    gen = torch.Generator().manual_seed(25)
    x = torch.rand(8, 3, 32, 32, generator=gen).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,), generator=gen)
    truth = frozen_input_gradient(copy.deepcopy(plain), x, y)
    with spy(fused, "preact_route") as calls:
        got = frozen_input_gradient(fused, x, y, bf16=True)
    assert calls and all(calls)
    reference = frozen_input_gradient(plain, x, y, bf16=True)
    for g, r, t in zip(got, reference, truth):
        assert (g - t).norm() <= 1.5 * (r - t).norm() + 1e-3 * t.norm()


@pytest.mark.parametrize(
    "frozen, memory_format, train",
    [
        (True, torch.channels_last, False),  # SharedInputConv, ConvResidualSE
        (False, torch.contiguous_format, False),  # EvalResidualSE
        (False, torch.contiguous_format, True),
    ],
    ids=["frozen-cl-eval", "eval", "train"],
)
def test_double_backward_equals_plain(frozen, memory_format, train):
    """Second derivatives through the fused Functions (create_graph: Hessian-vector products, input
    gradient penalties) equal the plain formulation's in float64; their hand-written backwards
    read intermediates saved without history, so under create_graph they run as autograd graphs."""
    fused, plain = pair(SPECS["robust"])
    fused, plain = (m.to(memory_format=memory_format).train(train) for m in (fused, plain))
    for p in (*fused.parameters(), *plain.parameters()):
        p.requires_grad_(not frozen)
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(17), dtype=torch.float64)
    x = x.contiguous(memory_format=memory_format)

    def hessian_vector(model):
        xr = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(model(xr).square().sum(), xr, create_graph=True)
        return g.detach(), torch.autograd.grad(g.square().sum(), xr)[0]

    with spy(fused, "shared_input_route") as shared, spy(fused, "per_sample_route") as per_sample:
        got = hessian_vector(fused)
    expected = hessian_vector(plain)
    assert (True in shared) == (True in per_sample) == (frozen and not train)
    assert expected[1].abs().max() > 0
    torch.testing.assert_close(got[0], expected[0], rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-7, atol=1e-12)


def test_second_order_through_fused_functions_in_every_direction():
    """The backwards of the frozen eval-mode Functions differentiated other ways than input
    Hessian-vector products: a gradient penalty on the one trainable weight whose gradient flows
    only through ConvResidualSE's skip (its input u wants none), and forward-over-reverse (tangents
    on the cotangent through SharedInputConv's backward); all equal the plain formulation's."""
    import torch.autograd.forward_ad as fwad

    fused, plain = pair(SPECS["robust"])
    fused, plain = (m.to(memory_format=torch.channels_last).eval() for m in (fused, plain))
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(18), dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last)

    def weight_penalty(model):
        for name, q in model.named_parameters():
            q.requires_grad_(name == "stage1.0.shortcut.weight")
        w = model.stage1[0].shortcut.weight
        (g,) = torch.autograd.grad(model(x).sin().sum(), w, create_graph=True)
        return g.detach(), torch.autograd.grad(g.square().sum(), w)[0]

    def forward_over_reverse(model):
        for q in model.parameters():
            q.requires_grad_(False)
        xr = x.clone().requires_grad_()
        out = model(xr)
        tangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(19), dtype=out.dtype)
        with fwad.dual_level():
            (g,) = torch.autograd.grad(out, xr, fwad.make_dual(torch.ones_like(out), tangent))
            return fwad.unpack_dual(g).primal.clone(), fwad.unpack_dual(g).tangent.clone()

    with spy(fused, "shared_input_route") as shared, spy(fused, "per_sample_route") as per_sample:
        got = [weight_penalty(fused), forward_over_reverse(fused)]
    assert True in per_sample and True in shared
    for g, e in zip(got, [weight_penalty(plain), forward_over_reverse(plain)]):
        assert e[1].abs().max() > 0
        torch.testing.assert_close(g[0], e[0], rtol=1e-8, atol=1e-12)
        torch.testing.assert_close(g[1], e[1], rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("name", ["robust", "robust-se-none", "robust-s1"])
def test_batched_gradients_equal_plain(name):
    """Per-class input gradients in one call (`is_grads_batched`: the backward under vmap, whose
    batched tensors have no storage and no channels_last strides) through the frozen eval-mode
    Functions equal the plain formulation's, one row per logit."""
    fused, plain = pair(SPECS[name])
    fused, plain = (m.to(memory_format=torch.channels_last).eval() for m in (fused, plain))
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(20), dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last)

    def jacobian(model):
        for q in model.parameters():
            q.requires_grad_(False)
        xr = x.clone().requires_grad_()
        out = model(xr)
        rows = torch.eye(out.shape[1], dtype=out.dtype)[:, None].expand(-1, *out.shape)
        return torch.autograd.grad(out, xr, rows, is_grads_batched=True)[0]

    with spy(fused, "shared_input_route") as calls:
        got = jacobian(fused)
    assert True in calls
    torch.testing.assert_close(got, jacobian(plain), rtol=1e-8, atol=1e-12)


def constant_folds(model):
    return type(model).__init__.__globals__["constant_folds"](model)


@pytest.mark.parametrize("name", ["robust", "mixed"])
def test_constant_folds_built_once_for_frozen_steps(name):
    """Inside `constant_folds` with parameters frozen (an attack's steps) every eval-mode fold is
    built on the first forward and reused by the next ones, with the plain formulation's logits and
    input gradients in float64; outside it every forward builds them again."""
    fused, plain = pair(SPECS[name])
    gen = torch.Generator().manual_seed(8)
    x = torch.rand(2, 3, 16, 16, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (2,), generator=gen)
    truth = frozen_input_gradient(plain, x, y)
    with spy(fused, "fold_into_conv") as builds, spy(fused, "bn_affine") as affines:
        with constant_folds(fused):
            first = frozen_input_gradient(fused, x, y)
            built = (len(builds), len(affines))
            again = [frozen_input_gradient(fused, x, y) for _ in range(2)]
            assert (len(builds), len(affines)) == built  # nothing rebuilt
        assert not type(fused).__init__.__globals__["FOLD_CACHES"]  # nothing kept after the span
        outside = frozen_input_gradient(fused, x, y)
    assert built[0] > 0 and len(builds) == 2 * built[0] and len(affines) == 2 * built[1]
    for got in (first, *again, outside):
        torch.testing.assert_close(got[0], truth[0], rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(got[1], truth[1], rtol=1e-8, atol=1e-12)


def test_constant_folds_follow_in_place_updates_and_gradients():
    """A fold is rebuilt when one of its tensors changes in place inside the span (here BatchNorm
    statistics and a conv weight), and never cached for parameters that want gradients, whose
    gradients stay the plain formulation's."""
    fused, plain = pair(SPECS["robust"])
    gen = torch.Generator().manual_seed(9)
    x = torch.rand(2, 3, 16, 16, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (2,), generator=gen)
    with constant_folds(fused):
        frozen_input_gradient(fused, x, y)
        for model in (fused, plain):
            randomise_batchnorm(model, torch.Generator().manual_seed(10))
            with torch.no_grad():
                model.stage2[0].convs[1].weight.mul_(-2)
        got = frozen_input_gradient(fused, x, y)
        for p in (*fused.parameters(), *plain.parameters()):
            p.requires_grad_(True)
        with spy(fused, "fold_into_conv") as builds:
            fused_out = [run(fused, x, y, train=False) for _ in range(2)]
        assert len(builds) % 2 == 0 and builds and builds[0][0] is not builds[len(builds) // 2][0]  # built twice
        fused_grads = [None if p.grad is None else p.grad / 2 for p in fused.parameters()]  # two backwards
    truth = frozen_input_gradient(plain, x, y)
    torch.testing.assert_close(got[0], truth[0], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(got[1], truth[1], rtol=1e-8, atol=1e-12)
    for p in plain.parameters():
        p.requires_grad_(True)
    plain_out = run(plain, x, y, train=False)
    torch.testing.assert_close(fused_out[1][1], plain_out[1], rtol=1e-8, atol=1e-12)
    assert sum(g is not None for g in fused_grads) > 0.9 * len(fused_grads)  # an identity block's bn1 has none
    for (name, p), g in zip(plain.named_parameters(), fused_grads):
        assert (g is None) == (p.grad is None), name
        if g is not None:
            torch.testing.assert_close(g, p.grad, rtol=1e-7, atol=1e-10, msg=name)


def test_constant_folds_keep_dtypes_and_inference_mode_apart():
    """One span holding float32, bf16 autocast and inference-mode forwards: each gives exactly what
    it gives outside the span (folds are kept per compute dtype; none are cached in inference mode,
    whose tensors could not be saved for a later backward), and spans nest."""
    fused, _ = pair(SPECS["robust"])
    fused = fused.float().to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(11)
    x = torch.rand(4, 3, 16, 16, generator=gen).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (4,), generator=gen)
    expected = [frozen_input_gradient(fused, x, y, bf16=b) for b in (True, False, True)]
    with constant_folds(fused):
        with torch.inference_mode():
            clean = fused(x)
        with constant_folds(fused):
            got = [frozen_input_gradient(fused, x, y, bf16=b) for b in (True, False, True)]
        caches = type(fused).__init__.__globals__["FOLD_CACHES"]
        assert all(id(m) in caches for m in fused.modules() if isinstance(m, torch.nn.Conv2d))  # the outer's
    for g, e in zip(got, expected):
        assert torch.equal(g[0], e[0]) and torch.equal(g[1], e[1])
    assert torch.equal(clean, expected[1][0])


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("change", ["in-place", "re-estimated", "replaced"])
def test_constant_folds_see_changes_inside_the_span(change, memory_format):
    """A fold is rebuilt when its tensors change inside the span: in place (BatchNorm affines and
    statistics, a conv weight), BatchNorm statistics re-estimated by training forwards (which bump
    no version), tensors replaced through `.data` (twice, so an address may come back): exactly what
    the model gives outside a span, on the residual SE's NCHW route and its channels_last one
    (`ConvResidualSE`, the 16x16 stage)."""
    fused, _ = pair(SPECS["robust"])
    fused = fused.to(memory_format=memory_format)
    torch.manual_seed(12)
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (2,))
    conv, se_bn = fused.stage2[0].convs[1], fused.stage1[0].se_bn
    with constant_folds(fused):
        frozen_input_gradient(fused, x, y)
        if change == "in-place":
            randomise_batchnorm(fused, torch.Generator().manual_seed(10))
            with torch.no_grad():
                conv.weight.mul_(-2)
        elif change == "re-estimated":
            fused.train()
            with torch.no_grad():
                fused(torch.rand(8, 3, 16, 16, dtype=torch.float64).contiguous(memory_format=memory_format) * 3)
        else:  # the fold of the first replacement is built, then two more (the second may take its address)
            for i in range(3):
                conv.weight.data = torch.randn_like(conv.weight)
                se_bn.running_var.data = torch.rand_like(se_bn.running_var) + 0.5
                if i == 0:
                    frozen_input_gradient(fused, x, y)
        got = frozen_input_gradient(fused, x, y)
    expected = frozen_input_gradient(fused, x, y)
    assert not torch.equal(got[0], frozen_input_gradient(pair(SPECS["robust"])[0], x, y)[0])  # it did change
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_constant_folds_keep_functional_and_forward_mode_calls():
    """Parameters passed in per call (`functional_call`, fresh tensors each time) and forward-mode
    derivatives with respect to a weight (`torch.func.jvp`, dual tensors) come out as outside a span."""
    import torch.autograd.forward_ad as fwad
    from torch.func import functional_call, jvp

    fused, _ = pair(SPECS["basic"])
    fused.eval()
    for p in fused.parameters():
        p.requires_grad_(False)
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    name = "stage1.0.conv2.weight"
    w = dict(fused.named_parameters())[name]
    tangent = torch.ones_like(w)

    def calls():
        outs = [functional_call(fused, {name: w * (1 + i)}, (x,)) for i in range(3)]
        outs.append(jvp(lambda v: functional_call(fused, {name: v}, (x,)), (w,), (tangent,))[1])
        with fwad.dual_level():
            outs.append(fwad.unpack_dual(functional_call(fused, {name: fwad.make_dual(w, tangent)}, (x,))).tangent)
        return outs

    expected = calls()
    with constant_folds(fused):
        fused(x)
        got = calls()
    assert expected[-1].abs().sum() > 0
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


def test_compiled_eval_forward_equals_eager():
    """torch.compile traces the fused formulation in eval mode under no_grad (validation logits),
    where a variadic autograd.Function (`DenseCat`) traced to its last input only: `dense_cat` is
    torch.cat there."""
    fused, _ = pair(SPECS["robust"])
    fused = fused.float().eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(14))
    torch._dynamo.reset()
    compiled = torch.compile(fused, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), fused(x), rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
