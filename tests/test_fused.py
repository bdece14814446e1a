"""The fast runtime (`trainers.fused`) computes the emitted blocks' function from the same state
dict: inside `fused_blocks` outputs, input and parameter gradients and BatchNorm statistics agree
with the model as emitted to float64 rounding in train and eval mode, for every knob the fused
formulations cover (the others, and blocks whose submodules were swapped or hooked, run as
emitted), and on exit every module is exactly as before."""

import copy
import functools
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scaler.builder import build_model, load_model_file
from scaler.spec import ArchSpec
from trainers.fused import bottleneck, folds, fused_blocks, fused_forward, preact

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
LEGACY = Path(__file__).parent / "fixtures" / "legacy"
FUSED_MODULES = (folds, bottleneck, preact)


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
    """(fused, plain): the same emitted float64 model twice; run `fused` inside `fused_blocks`."""
    torch.manual_seed(0)
    plain = build_model(spec).double()
    randomise_batchnorm(plain, torch.Generator().manual_seed(1))
    return copy.deepcopy(plain), plain


def tagged(model):
    """The modules whose emitted class carries a runtime tag (blocks and the network)."""
    return [m for m in model.modules() if hasattr(type(m), "scaler_block") or hasattr(type(m), "scaler_network")]


def ids(modules):
    return {id(m) for m in modules}


def own_forwards(model):
    """The names of the modules with a `forward` of their own (an instance attribute)."""
    return [name for name, m in model.named_modules() if "forward" in m.__dict__]


def fused_run(fn, model, *args, **kwargs):
    """fn(model, ...) inside a span of its own with the model's blocks fused (and folds built afresh)."""
    with fused_blocks(model, True) as installed:
        assert installed, "no block runs fused"
        return fn(model, *args, **kwargs)


@contextmanager
def spy(name):
    """The list of what the runtime's function `name` returns, recorded inside: patched in each
    trainers.fused module that calls it by that name (they look their globals up at call time)."""
    calls, patched = [], [(m, getattr(m, name)) for m in FUSED_MODULES if name in vars(m)]
    assert patched, name

    def recorder(original):
        def recorded(*args, **kwargs):
            calls.append(original(*args, **kwargs))
            return calls[-1]

        return recorded

    for module, original in patched:
        setattr(module, name, recorder(original))
    try:
        yield calls
    finally:
        for module, original in patched:
            setattr(module, name, original)


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
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(3, 3, 8, 8, generator=gen, dtype=torch.float64)  # float64 convs are slow on the CPU
    x = x.contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (3,), generator=gen)
    for _ in range(2 if train else 1):  # the second pass sees the running statistics the first updated
        with fused_blocks(fused, True) as installed, spy("conv_bn") as convs:
            out_f, gx_f = run(fused, x, y, train)
        assert ids(installed) == ids(tagged(fused)) and convs, "not every block ran fused"
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
    """SE placements, norms and layouts the fused formulations do not cover: no block gets a fused
    forward, and the model computes inside a span exactly what it computes outside."""
    torch.manual_seed(0)
    model = build_model(FALLBACK[name])
    blocks = [m for m in model.modules() if hasattr(type(m), "scaler_block")]
    assert len(blocks) == 3 and all(fused_forward(b) is None for b in blocks)
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(3, 3, 8, 8, generator=gen)
    y = torch.randint(0, 10, (3,), generator=gen)
    for train in (False, True):
        inside = copy.deepcopy(model)
        expected = run(copy.deepcopy(model), x, y, train)
        with fused_blocks(inside, True) as installed:
            got = run(inside, x, y, train)
        assert ids(installed) <= {id(inside)}  # the network's head at most
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_bf16_channels_last_close_to_plain():
    """The speed path itself (bf16 autocast, channels_last): outputs within bf16 rounding."""
    torch.manual_seed(0)
    model = build_model(SPECS["robust"]).eval().to(memory_format=torch.channels_last)
    randomise_batchnorm(model, torch.Generator().manual_seed(1))
    x = torch.rand(8, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        b = model(x).float()
        a = fused_run(lambda m: m(x).float(), model)
    assert (a - b).abs().max() <= 0.05 * b.abs().max()


def test_dense_cat_hands_back_dense_gradients():
    """The cascade's cat returns channels_last gradients of its own for each piece (strided slices
    make the gradient additions after it several times slower)."""
    cl = torch.channels_last
    pieces = [
        torch.rand(2, 4, 3, 3, dtype=torch.float64).contiguous(memory_format=cl).requires_grad_() for _ in range(3)
    ]
    out = folds.DenseCat.apply(*pieces)
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
    gen = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    groups = channels // per_group
    conv = torch.nn.Conv2d(channels, channels, 3, stride, 1, groups=groups, bias=False)
    x = torch.rand(2, channels, 6, 6, generator=gen).contiguous(memory_format=cl).requires_grad_()
    b = torch.randn(channels, generator=gen).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert folds.dense_route(x, conv.weight, groups) == dense
        assert not folds.dense_route(x.double(), conv.weight.double(), groups)  # autocast leaves float64
        out = folds.conv2d(x, conv.weight, b, conv, groups)
    assert out.dtype == torch.bfloat16
    assert not folds.dense_route(x, conv.weight, groups)  # float32 without autocast: grouped
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
    _, plain = pair(SPECS["robust"])
    plain = plain.float().to(memory_format=torch.channels_last).train(train)
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(8, 3, 16, 16, generator=gen).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,), generator=gen)

    def gradients(fused, bf16):
        model = copy.deepcopy(plain)
        xr = x.clone().requires_grad_()
        with fused_blocks(model, fused) as installed:
            assert bool(installed) == fused
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = torch.nn.functional.cross_entropy(model(xr).float(), y)
            gx, *gp = torch.autograd.grad(loss, [xr, *model.parameters()], allow_unused=True)
        return gx, torch.cat([g.flatten() for g in gp if g is not None])

    def error(got, want):
        return [((a - b).norm() / b.norm()).item() for a, b in zip(got, want)]

    truth = gradients(False, False)
    with spy("dense_route") as routes:
        fused_error = error(gradients(True, True), truth)
    plain_error = error(gradients(False, True), truth)
    assert any(routes), "no conv took the dense route"
    for f, p in zip(fused_error, plain_error):
        assert f <= 1.5 * p + 0.01, (fused_error, plain_error)
    assert error(gradients(True, False), truth) == pytest.approx([0, 0], abs=1e-5)  # float32: the same


def test_block_diagonal_weight_is_the_grouped_conv():
    """The dense weight computes exactly the grouped conv (zeros outside each group) in float64."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(12, 3, 3, 3, generator=gen, dtype=torch.float64)
    x = torch.randn(2, 12, 5, 5, generator=gen, dtype=torch.float64)
    dense = folds.block_diagonal(w, 4)
    assert dense.shape == (12, 12, 3, 3) and int((dense != 0).sum()) == w.numel()
    torch.testing.assert_close(F.conv2d(x, dense, None, 2, 1), F.conv2d(x, w, None, 2, 1, 1, 4), rtol=1e-12, atol=1e-12)


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
    with spy("per_sample_route") as calls, fused_blocks(fused, True):
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
    _, model = pair(SPECS["robust"])
    model = model.float().eval()
    block = model.stage1[0]
    cl = torch.channels_last
    u = torch.rand(2, block.conv3.in_channels, 16, 16).contiguous(memory_format=cl)
    skip = torch.rand(2, block.conv3.out_channels, 16, 16).contiguous(memory_format=cl)
    route = bottleneck.per_sample_route
    modules = (block.conv3, block.se_bn, block.se_fc1, block.se_fc2)
    assert not route(u, skip, *modules)  # parameters require grad
    for p in model.parameters():
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
    with spy("per_sample_route") as calls:
        got = fused_run(frozen_input_gradient, fused, x, y, bf16=True)
    assert True in calls
    reference = frozen_input_gradient(plain, x, y, bf16=True)
    for g, r, t in zip(got, reference, truth):
        assert (g - t).norm() <= 1.5 * (r - t).norm() + 1e-3 * t.norm()


def test_conv_residual_se_gradients_by_gradcheck():
    """`ConvResidualSE` against conv3 + the SE written out, in float64 by finite differences, with
    an SE hidden layer of 3 whose pre-activations take both signs (so its ReLU mask matters)."""
    cls = bottleneck.ConvResidualSE
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


def test_eval_residual_se_and_scale_add_gradients_by_gradcheck():
    """`EvalResidualSE` (every input, first and second order: under create_graph its backward runs
    as an autograd graph) against the eval-mode residual SE written out, and `ScaleAdd` (training
    mode's h * gain + skip), by finite differences in float64."""
    gen = torch.Generator().manual_seed(37)
    h, skip = (torch.randn(2, 6, 3, 5, generator=gen, dtype=torch.float64) for _ in range(2))
    scale, shift = torch.rand(6, generator=gen, dtype=torch.float64) + 0.5, torch.randn(6, generator=gen).double()
    w1, w2 = torch.randn(3, 6, generator=gen, dtype=torch.float64), torch.randn(6, 3, generator=gen).double()
    w1[1] = -w1[0]  # so the hidden pre-activations take both signs

    def written_out(h, skip, scale, shift, w1, w2):
        z = h * scale[:, None, None] + shift[:, None, None]
        return h + skip + z * torch.sigmoid(torch.relu(z.mean((2, 3)) @ w1.t()) @ w2.t())[:, :, None, None]

    leaves = [t.clone().requires_grad_() for t in (h, skip, scale, shift, w1, w2)]
    torch.testing.assert_close(bottleneck.EvalResidualSE.apply(*leaves), written_out(*leaves))
    assert torch.autograd.gradcheck(bottleneck.EvalResidualSE.apply, leaves)
    assert torch.autograd.gradgradcheck(bottleneck.EvalResidualSE.apply, leaves)
    gain = torch.rand(2, 6, generator=gen, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (h, gain, skip)]
    torch.testing.assert_close(bottleneck.ScaleAdd.apply(*leaves), skip + h * gain[:, :, None, None])
    assert torch.autograd.gradcheck(bottleneck.ScaleAdd.apply, leaves)


def test_fused_shortcut_samples_odd_maps():
    """The eval-mode strided shortcut on odd-sized maps (its 1x1 conv samples rows and columns
    0, 2, 4, ...): same logits and input gradients as the plain formulation in float64."""
    fused, plain = pair(SPECS["robust"])
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(2, 3, 9, 7, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (2,), generator=gen)
    out_f, gx_f = fused_run(run, fused, x, y, train=False)
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
    with spy("shared_input_route") as calls, fused_blocks(fused, True):
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
    cls = bottleneck.SharedInputConv
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
    route = bottleneck.shared_input_route
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
    logits and input gradients in float64, clean logits too; no route without gradients. Within one
    span each block's operands are built once for all steps (`constant_folds`)."""
    fused, plain = pair(SPECS["basic-proj"])
    fused, plain = (m.to(memory_format=torch.channels_last) for m in (fused, plain))
    gen = torch.Generator().manual_seed(21)
    x = torch.rand(3, 3, *size, generator=gen, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (3,), generator=gen)
    blocks = preact_blocks(fused)
    assert {(b.shortcut is None, b.conv1.stride[0]) for b in blocks} == {(True, 1), (False, 1), (False, 2)}
    with spy("preact_route") as calls, spy("fold_preact") as builds, fused_blocks(fused, True):
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
    cls = preact.PreactBlock
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
    _, model = pair(SPECS["basic-proj"])
    model = model.float().to(memory_format=torch.channels_last).eval()
    route = preact.preact_route
    block = preact_blocks(model)[0]
    for p in model.parameters():
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
    model.train()  # frozen parameters in train mode: BatchNorm uses batch statistics
    assert not route(x, block)
    for bn in (block.bn1, block.bn2):  # either in train mode
        model.eval()
        bn.train()
        assert not route(x, block)
    model.eval()
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
    with spy("preact_route") as calls:
        got = [fused_run(check, fused) for check in checks]
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
    with spy("preact_route") as calls:
        got = fused_run(lambda m: torch.func.grad(lambda a: m(a).sin().sum())(x), fused)
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
    model gives in a span of its own, and not what it gave before the change."""
    fused, _ = pair(SPECS["basic-proj"])
    fused = fused.to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(27)
    x = torch.rand(2, 3, 12, 12, generator=gen, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (2,), generator=gen)
    block = fused.stage1[0]  # the stride-1 projection
    with spy("preact_route") as calls, fused_blocks(fused, True):
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
    expected = fused_run(frozen_input_gradient, fused, x, y)
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
    with spy("preact_route") as calls:
        got = fused_run(frozen_input_gradient, fused, x, y, bf16=True)
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

    with spy("shared_input_route") as shared, spy("per_sample_route") as per_sample, spy("conv_bn") as convs:
        got = fused_run(hessian_vector, fused)
    expected = hessian_vector(plain)
    assert convs and (True in shared) == (True in per_sample) == (frozen and not train)
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

    with spy("shared_input_route") as shared, spy("per_sample_route") as per_sample:
        got = [fused_run(weight_penalty, fused), fused_run(forward_over_reverse, fused)]
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

    with spy("shared_input_route") as calls:
        got = fused_run(jacobian, fused)
    assert True in calls
    torch.testing.assert_close(got, jacobian(plain), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", ["robust", "mixed"])
def test_constant_folds_built_once_for_frozen_steps(name):
    """Within a span with parameters frozen (an attack's steps) every eval-mode fold is built on the
    first forward and reused by the next ones, with the plain formulation's logits and input
    gradients in float64; nothing is kept after the span, so the next span builds them again."""
    fused, plain = pair(SPECS[name])
    gen = torch.Generator().manual_seed(8)
    x = torch.rand(2, 3, 16, 16, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (2,), generator=gen)
    truth = frozen_input_gradient(plain, x, y)
    with spy("fold_into_conv") as builds, spy("bn_affine") as affines:
        with fused_blocks(fused, True):
            first = frozen_input_gradient(fused, x, y)
            built = (len(builds), len(affines))
            again = [frozen_input_gradient(fused, x, y) for _ in range(2)]
            assert (len(builds), len(affines)) == built  # nothing rebuilt
        assert not folds.FOLD_CACHES  # nothing kept after the span
        outside = fused_run(frozen_input_gradient, fused, x, y)
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
    with fused_blocks(fused, True):
        frozen_input_gradient(fused, x, y)
        for model in (fused, plain):
            randomise_batchnorm(model, torch.Generator().manual_seed(10))
            with torch.no_grad():
                model.stage2[0].convs[1].weight.mul_(-2)
        got = frozen_input_gradient(fused, x, y)
        for p in (*fused.parameters(), *plain.parameters()):
            p.requires_grad_(True)
        with spy("fold_into_conv") as builds:
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
    it gives in a span of its own (folds are kept per compute dtype; none are cached in inference
    mode, whose tensors could not be saved for a later backward), and spans nest: an inner one
    follows the outer, installs nothing of its own and leaves the outer's forwards and folds."""
    fused, _ = pair(SPECS["robust"])
    fused = fused.float().to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(11)
    x = torch.rand(4, 3, 16, 16, generator=gen).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (4,), generator=gen)
    expected = [fused_run(frozen_input_gradient, fused, x, y, bf16=b) for b in (True, False, True)]
    with fused_blocks(fused, True) as installed:
        with torch.inference_mode():
            clean = fused(x)
        with fused_blocks(fused) as inner:
            got = [frozen_input_gradient(fused, x, y, bf16=b) for b in (True, False, True)]
        assert inner == [] and installed and all("forward" in m.__dict__ for m in installed)
        convs = [m for m in fused.modules() if isinstance(m, torch.nn.Conv2d)]
        assert all(id(m) in folds.FOLD_CACHES for m in convs)  # the outer's
    for g, e in zip(got, expected):
        assert torch.equal(g[0], e[0]) and torch.equal(g[1], e[1])
    assert torch.equal(clean, expected[1][0])


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("change", ["in-place", "re-estimated", "replaced"])
def test_constant_folds_see_changes_inside_the_span(change, memory_format):
    """A fold is rebuilt when its tensors change inside the span: in place (BatchNorm affines and
    statistics, a conv weight), BatchNorm statistics re-estimated by training forwards (which bump
    no version), tensors replaced through `.data` (twice, so an address may come back): exactly what
    the model gives in a span of its own, on the residual SE's NCHW route and its channels_last one
    (`ConvResidualSE`, the 16x16 stage)."""
    fused, _ = pair(SPECS["robust"])
    fused = fused.to(memory_format=memory_format)
    torch.manual_seed(12)
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64).contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (2,))
    conv, se_bn = fused.stage2[0].convs[1], fused.stage1[0].se_bn
    with fused_blocks(fused, True) as installed:
        assert installed
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
    expected = fused_run(frozen_input_gradient, fused, x, y)
    unchanged = pair(SPECS["robust"])[0].to(memory_format=memory_format)
    assert not torch.equal(got[0], fused_run(frozen_input_gradient, unchanged, x, y)[0])  # it did change
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_constant_folds_keep_functional_and_forward_mode_calls():
    """Parameters passed in per call (`functional_call`, fresh tensors each time) and forward-mode
    derivatives with respect to a weight (`torch.func.jvp`, dual tensors) come out as in a span of
    their own."""
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

    def dual(model):
        with fwad.dual_level():
            return fwad.unpack_dual(functional_call(model, {name: fwad.make_dual(w, tangent)}, (x,))).tangent

    calls = [functools.partial(lambda m, i: functional_call(m, {name: w * (1 + i)}, (x,)), i=i) for i in range(3)]
    calls += [lambda m: jvp(lambda v: functional_call(m, {name: v}, (x,)), (w,), (tangent,))[1], dual]
    expected = [fused_run(call, fused) for call in calls]
    with fused_blocks(fused, True):
        fused(x)
        got = [call(fused) for call in calls]
    assert expected[-1].abs().sum() > 0
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


def test_compiled_eval_forward_equals_eager():
    """torch.compile traces the fused formulation in eval mode under no_grad (validation logits),
    where a variadic autograd.Function (`DenseCat`) traced to its last input only: `dense_cat` is
    torch.cat there."""
    fused, plain = pair(ArchSpec(**ROBUST))
    fused, plain = fused.float().eval(), plain.float().eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(14))
    torch._dynamo.reset()
    try:
        with fused_blocks(fused, True) as installed, torch.no_grad():
            assert installed
            compiled = torch.compile(fused, backend="eager")
            torch.testing.assert_close(compiled(x), fused(x), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(compiled(x), plain(x), rtol=1e-5, atol=1e-6)
    finally:
        torch._dynamo.reset()


def test_compiled_dense_cat_is_cat():
    """`dense_cat` traced under no_grad (the variadic `DenseCat` traced to its last input only)."""
    pieces = [torch.rand(2, c, 3, 3) for c in (2, 3, 4)]
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            out = torch.compile(folds.dense_cat, backend="eager", fullgraph=True)(*pieces)
    finally:
        torch._dynamo.reset()
    assert torch.equal(out, torch.cat(pieces, 1))


def test_compiled_fused_forward_traces_in_one_graph():
    """The fused formulation traces without graph breaks (fullgraph), as the emitted one does."""
    fused, _ = pair(SPECS["robust"])
    fused = fused.float().eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(14))
    torch._dynamo.reset()
    try:
        with fused_blocks(fused, True), torch.no_grad():
            torch.testing.assert_close(torch.compile(fused, backend="eager", fullgraph=True)(x), fused(x))
    finally:
        torch._dynamo.reset()


# --------------------------------------------------------------------------- the runtime's contract
class Boom(Exception):
    pass


@pytest.mark.parametrize("fail", [False, True], ids=["exit", "exception"])
def test_span_restores_every_module_exactly(fail):
    """On exit, normal or by an exception, no module keeps a `forward` of the runtime's (a forward
    the user gave a module is left to it, inside the span too), no fold is kept, and the model
    computes what it did before from the same state dict, which the span never changed."""
    torch.manual_seed(0)
    model = build_model(SPECS["mixed"]).eval()
    randomise_batchnorm(model, torch.Generator().manual_seed(1))
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(30))
    mine, seen = model.stage1[0], []

    def own_forward(z, forward=mine.forward):
        seen.append(z.shape)
        return forward(z)

    mine.forward = own_forward
    with torch.no_grad():
        before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    seen.clear()
    with pytest.raises(Boom) if fail else nullcontext():
        with fused_blocks(model, True) as installed, torch.no_grad():
            assert ids(installed) == ids(tagged(model)) - {id(mine)}
            assert sorted(own_forwards(model)) == sorted(
                ["stage1.0", *(n for n, m in model.named_modules() if m in installed)]
            )
            assert list(model.state_dict()) == list(state)
            inside = model(x)
            model.load_state_dict(state)  # a checkpoint loads strictly inside a span
            if fail:
                raise Boom
    assert own_forwards(model) == ["stage1.0"] and mine.__dict__["forward"] is own_forward and seen
    assert not folds.FOLD_CACHES
    if not fail:
        torch.testing.assert_close(inside, before, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(model(x), before)
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], v) for k, v in state.items())


class DoubledBatchNorm(nn.BatchNorm2d):
    """A BatchNorm subclass with a forward of its own: the fused code must not read it as a BatchNorm."""

    def forward(self, x):
        return 2 * super().forward(x)


def doubled(bn):
    new = DoubledBatchNorm(bn.num_features).to(bn.weight.dtype)
    new.load_state_dict(bn.state_dict())
    return new


SWAPS = {
    "group-norm": lambda bn: nn.GroupNorm(1, bn.num_features).to(bn.weight.dtype),
    "identity": lambda bn: nn.Identity(),
    "sync-batch-norm": nn.SyncBatchNorm.convert_sync_batchnorm,
    "subclass": doubled,
}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("swap", sorted(SWAPS))
@pytest.mark.parametrize("name", ["robust", "basic"])
def test_block_with_a_swapped_norm_runs_plain(name, swap, train):
    """A block whose bn2 was swapped (another norm, none, a BatchNorm subclass) keeps its own forward:
    `fused_forward` is None, it computes inside a span exactly what it computes outside, and the
    model (its other blocks fused) the emitted model's function."""
    _, plain = pair(SPECS[name])
    block = plain.stage2[0]  # strided, with a projection
    block.bn2 = SWAPS[swap](block.bn2)
    fused = copy.deepcopy(plain)
    block = fused.stage2[0]
    assert fused_forward(block) is None
    gen = torch.Generator().manual_seed(31)
    x = torch.rand(3, 3, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (3,), generator=gen)
    z = torch.rand(2, block.conv1.in_channels, 4, 4, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        alone = copy.deepcopy(block).train(train)(z)
    with fused_blocks(fused, True) as installed:
        assert ids(installed) == ids(tagged(fused)) - {id(block)}
        out_f, gx_f = run(fused, x, y, train)
        with torch.no_grad():
            assert torch.equal(copy.deepcopy(block)(z), alone)
    out_p, gx_p = run(plain, x, y, train)
    torch.testing.assert_close(out_f, out_p, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(gx_f, gx_p, rtol=1e-8, atol=1e-12)


HOOKS = {
    "forward": lambda m, seen: m.register_forward_hook(lambda *_: seen.append(m)),
    "forward-pre": lambda m, seen: m.register_forward_pre_hook(lambda *_: seen.append(m)),
    "backward": lambda m, seen: m.register_full_backward_hook(lambda *_: seen.append(m)),
}


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_block_with_a_hooked_submodule_runs_plain(hook):
    """A hook on a submodule (which a fused forward, reading the submodules' tensors, would skip)
    keeps its block as emitted, and it fires inside the span; a hook on a block itself fires with
    the block fused. Once the hook is removed the block is fused again."""
    _, plain = pair(SPECS["mixed"])
    fused = copy.deepcopy(plain)
    hooked, whole = fused.stage3[0], fused.stage1[0]  # a robust block and a basic one
    seen, on_block = [], []
    handle = HOOKS[hook](hooked.conv1, seen)
    HOOKS[hook](whole, on_block)
    assert fused_forward(hooked) is None and fused_forward(whole) is not None
    gen = torch.Generator().manual_seed(32)
    x = torch.rand(3, 3, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (3,), generator=gen)
    with fused_blocks(fused, True) as installed:
        blocks = [m for m in tagged(fused) if m is not fused]  # the network's head may stay as emitted too
        assert id(hooked) not in ids(installed) and ids(blocks) - {id(hooked)} <= ids(installed)
        out_f, gx_f = run(fused, x, y, train=False)
    assert seen and on_block
    out_p, gx_p = run(plain, x, y, train=False)
    torch.testing.assert_close(out_f, out_p, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(gx_f, gx_p, rtol=1e-8, atol=1e-12)
    handle.remove()
    assert fused_forward(hooked) is not None


def test_global_module_hooks_keep_every_block_plain():
    """A global module hook fires for every submodule call: with one registered nothing is fused."""
    model = build_model(SPECS["robust"]).eval()
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, *_: seen.append(m))
    try:
        with fused_blocks(model, True) as installed, torch.no_grad():
            model(torch.rand(1, 3, 8, 8))
    finally:
        handle.remove()
    assert installed == [] and any(isinstance(m, nn.BatchNorm2d) for m in seen)


def test_unknown_tag_versions_are_not_fused():
    """A class tagged with a version of its kind the runtime does not know (a later emitter's)
    keeps its own forward; blocks of known versions beside it are fused."""
    _, plain = pair(SPECS["mixed"])
    fused = copy.deepcopy(plain)
    robust, basic = fused.stage3[0], fused.stage1[0]
    robust.__class__ = type("LaterRobustResBlock", (type(robust),), {"scaler_block": ("robust", 99)})
    basic.__class__ = type("LaterBasicBlock", (type(basic),), {"scaler_block": ("basic", 2)})
    fused.__class__ = type("LaterResNet", (type(fused),), {"scaler_network": ("resnet", 2)})
    assert all(fused_forward(m) is None for m in (robust, basic, fused))
    assert fused_forward(fused.stage2[0]) is not None
    gen = torch.Generator().manual_seed(33)
    x = torch.rand(3, 3, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (3,), generator=gen)
    with fused_blocks(fused, True) as installed:
        assert ids(installed) == {id(fused.stage2[0])}
        out_f, gx_f = run(fused, x, y, train=False)
    out_p, gx_p = run(plain, x, y, train=False)
    torch.testing.assert_close(out_f, out_p, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(gx_f, gx_p, rtol=1e-8, atol=1e-12)


def test_nested_spans_follow_the_enclosing_choice():
    """`fused_blocks(model)` (enabled None) inside `fused_blocks(model, False)` installs nothing: the
    model runs as emitted, bit for bit; after the outer span (even one left by an exception) the
    choice is the default again: on, on a CPU."""
    torch.manual_seed(0)
    model = build_model(SPECS["robust"]).eval()
    randomise_batchnorm(model, torch.Generator().manual_seed(1))
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(34))
    with torch.no_grad():
        expected = model(x)
        with pytest.raises(Boom):
            with fused_blocks(model, False) as outer:
                with fused_blocks(model) as inner:
                    assert outer == inner == [] and own_forwards(model) == []
                    assert torch.equal(model(x), expected)
                assert own_forwards(model) == []
                raise Boom
        with fused_blocks(model) as default:
            assert ids(default) == ids(tagged(model))
            with fused_blocks(model) as inner:  # within an enabled span: the outer's forwards, none of its own
                assert inner == [] and len(own_forwards(model)) == len(default)
            assert len(own_forwards(model)) == len(default)
    assert own_forwards(model) == []


@pytest.mark.parametrize("name", ["robust_small_v0", "basic_small_v0"])
def test_disabled_span_switches_legacy_model_files_to_plain(name):
    """A model file of the previous emitter carries its fused code behind a `fused` flag per block:
    `enabled=False` turns every flag off inside the span (the file's plain formulation, bit for bit)
    and restores each as it was after it, exception or not; an enabled span leaves them on, installs
    nothing (no tags) and enters the file's own `constant_folds`."""
    model = load_model_file(LEGACY / f"{name}.py").eval()
    flagged = [m for m in model.modules() if isinstance(m.__dict__.get("fused"), bool)]
    assert len(flagged) == 4 and all(m.fused for m in flagged)  # three blocks and the network
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(35))
    with torch.no_grad():
        for m in flagged:
            m.fused = False
        plain = model(x)
        for m in flagged:
            m.fused = True
        fused = model(x)
        assert not torch.equal(plain, fused)  # the flags matter
        flagged[1].fused = False  # a user's choice, kept
        with fused_blocks(model, False) as installed:
            assert installed == [] and not any(m.fused for m in flagged)
            assert torch.equal(model(x), plain)
        assert [m.fused for m in flagged] == [True, False, True, True]
        with pytest.raises(Boom), fused_blocks(model, False):
            raise Boom
        assert [m.fused for m in flagged] == [True, False, True, True]
        caches = type(model).__init__.__globals__["FOLD_CACHES"]
        with fused_blocks(model, True) as installed:
            assert installed == [] and [m.fused for m in flagged] == [True, False, True, True]
            assert caches  # the file's own constant_folds span
        assert not caches and [m.fused for m in flagged] == [True, False, True, True]


def test_subclass_with_a_forward_of_its_own_is_not_fused():
    """A user's subclass of an emitted block that overrides `forward` inherits the class tag, but
    computes another function: its forward must be kept."""
    model = build_model(ArchSpec(**ROBUST)).eval()
    block = model.stage1[0]

    class Halved(type(block)):
        def forward(self, x):
            return super().forward(x) / 2

    block.__class__ = Halved
    z = torch.rand(1, block.conv1.in_channels, 8, 8, generator=torch.Generator().manual_seed(36))
    with torch.no_grad():
        expected = block(z)
        with fused_blocks(model, True) as installed:
            assert block not in installed and fused_forward(block) is None
            torch.testing.assert_close(block(z), expected)


def test_disabled_span_inside_an_enabled_one_runs_plain():
    """`enabled=False` forces the blocks as emitted, also inside an enabled span; on its exit the
    enclosing span's forwards are back."""
    model = build_model(ArchSpec(**ROBUST)).eval()
    with fused_blocks(model, True) as outer:
        assert outer
        with fused_blocks(model, False):
            assert own_forwards(model) == []
        assert len(own_forwards(model)) == len(outer)


def test_graph_gradients_are_partial_and_skip_inputs_frozen_since_the_forward():
    """The written-out backward: partial derivatives (an input computed from another one is not
    differentiated through), and None for an input that stopped wanting a gradient (frozen_eval)."""
    h = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    derived = h * 2  # depends on h: its gradient must not flow into h's partial
    got = folds.graph_gradients(lambda h, d: h * d, (h, derived), (True, True), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(got[0], derived.detach())  # d/dh of h * derived, derived held
    torch.testing.assert_close(got[1], h.detach())
    frozen = torch.tensor([5.0, 5.0], dtype=torch.float64)
    assert folds.graph_gradients(lambda a: a * 2, (frozen,), (True,), torch.ones(2)) == [None]
