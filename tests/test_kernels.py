"""The Triton kernels (`trainers.kernels`) compute the emitted RobustResBlock's function: run by
Triton's interpreter on the CPU (`TRITON_INTERPRET=1`), their values and gradients agree with the
plain formulation to float64 rounding (float32: to its rounding), and a model in `fused_blocks`
that routes its blocks through them agrees with the model as emitted, BatchNorm statistics
included. CI has no GPU; these are the kernels' correctness tests there."""

import importlib

import pytest
import torch
import torch.nn.functional as F

from scaler.builder import build_model
from scaler.spec import ArchSpec
from trainers import kernels
from trainers.fused import fused_blocks

pytestmark = pytest.mark.skipif(not kernels.triton_installed(), reason="needs triton")

F64 = dict(rtol=1e-10, atol=1e-12)


@pytest.fixture
def interpreted(monkeypatch):
    """The kernel modules with their kernels run by Triton's interpreter (on CPU tensors)."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the kernels are compiled, the GPU tests check them")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SCALER_KERNELS_ON_CPU", "1")
    from trainers.kernels import conv, robust, se

    if type(conv._grouped_conv_kernel).__name__ != "InterpretedFunction":  # imported before, compiled
        conv, se = importlib.reload(conv), importlib.reload(se)
        robust = importlib.reload(robust)
    return conv, se, robust


@pytest.mark.parametrize(
    "channels, groups, k, layout",
    [(8, 2, 3, "nchw"), (20, 4, 3, "channels_last"), (12, 3, 5, "nchw"), (6, 1, 1, "channels_last")],
)
def test_grouped_conv_is_the_library_conv(interpreted, channels, groups, k, layout):
    """Forward with each prologue and the affine-ReLU epilogue, groups of 2-5 channels (A1's are 5,
    14 and 12), any layout; the output keeps x's."""
    conv = interpreted[0]
    gen = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x, r, y = (torch.randn(2, channels, 5, 6, generator=gen, dtype=torch.float64) for _ in range(3))
    x, r = x.contiguous(memory_format=fmt), r.contiguous(memory_format=fmt)
    w = torch.randn(channels, channels // groups, k, k, generator=gen, dtype=torch.float64)
    scale, shift = torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5, torch.randn(channels, generator=gen)
    shift = shift.double()
    plain = F.conv2d(x, w, padding=k // 2, groups=groups)
    out = conv.grouped_conv(x, w, groups)
    torch.testing.assert_close(out, plain, **F64)
    assert out.is_contiguous(memory_format=fmt)
    fused = conv.grouped_conv(x, w, groups, add=r, affine_relu=(scale, shift))
    want = torch.relu(F.conv2d(x + r, w, padding=k // 2, groups=groups) * scale[:, None, None] + shift[:, None, None])
    torch.testing.assert_close(fused, want, **F64)
    masked = conv.grouped_conv(x, w, groups, relu_grad_of=(y, scale))
    torch.testing.assert_close(masked, F.conv2d(x * (y > 0) * scale[:, None, None], w, padding=k // 2, groups=groups))
    x32, w32 = x.float(), w.float()
    torch.testing.assert_close(conv.grouped_conv(x32, w32, groups), F.conv2d(x32, w32, padding=k // 2, groups=groups))


def test_grouped_conv_refuses_what_it_does_not_compute(interpreted):
    conv = interpreted[0]
    with pytest.raises(ValueError, match="square odd kernels"):
        conv.grouped_conv(torch.zeros(1, 4, 3, 3), torch.zeros(4, 2, 2, 2), 2)


def _gradients(f, inputs, grad):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = f(*inputs)
    out.backward(grad)
    return out.detach(), [t.grad for t in inputs]


def test_cascade_step_values_and_gradients(interpreted):
    """relu(bn(conv(chunk + prev))) in eval mode: input, weight and BatchNorm-map gradients equal
    autograd's of the plain ops (eval-mode fine-tuning asks for all of them; attacks for the input's)."""
    conv = interpreted[0]
    gen = torch.Generator().manual_seed(1)
    chunk, prev = (torch.randn(2, 8, 5, 5, generator=gen, dtype=torch.float64) for _ in range(2))
    w = torch.randn(8, 4, 3, 3, generator=gen, dtype=torch.float64)
    scale = torch.rand(8, generator=gen, dtype=torch.float64) + 0.5
    shift = torch.randn(8, generator=gen, dtype=torch.float64) * 0.3
    grad = torch.randn(2, 8, 5, 5, generator=gen, dtype=torch.float64)

    def plain(c, p, w, a, b):
        return torch.relu(F.conv2d(c + p, w, padding=1, groups=2) * a[:, None, None] + b[:, None, None])

    def kernel(c, p, w, a, b):
        return conv.CascadeStep.apply(c, p, w, a, b, 2)

    inputs = (chunk, prev, w, scale, shift)
    out_k, grads_k = _gradients(kernel, inputs, grad)
    out_p, grads_p = _gradients(plain, inputs, grad)
    torch.testing.assert_close(out_k, out_p, **F64)
    for name, gk, gp in zip(("chunk", "prev", "weight", "scale", "shift"), grads_k, grads_p):
        torch.testing.assert_close(gk, gp, **F64, msg=name)
    x = chunk.detach().clone().requires_grad_(True)  # the first split: no previous output
    conv.CascadeStep.apply(x, None, w, scale, shift, 2).backward(grad)
    xp = chunk.detach().clone().requires_grad_(True)
    torch.relu(F.conv2d(xp, w, padding=1, groups=2) * scale[:, None, None] + shift[:, None, None]).backward(grad)
    torch.testing.assert_close(x.grad, xp.grad, **F64)


@pytest.mark.parametrize("chunk", [4096, 64], ids=["one-chunk", "chunks"])
def test_grouped_conv_function_gradients(interpreted, monkeypatch, chunk):
    """Training mode's conv (BatchNorm on the batch's statistics follows it): input and weight
    gradients, the weight's summed over pixels in one chunk or several (their partial sums added)."""
    conv = interpreted[0]
    monkeypatch.setattr(conv, "WGRAD_PIXELS", chunk)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 6, 6, 8, generator=gen, dtype=torch.float64)  # 144 pixels: three chunks of 64
    w = torch.randn(6, 2, 5, 5, generator=gen, dtype=torch.float64)
    grad = torch.randn(3, 6, 6, 8, generator=gen, dtype=torch.float64)
    out_k, grads_k = _gradients(lambda x, w: conv.GroupedConv.apply(x, w, 3), (x, w), grad)
    out_p, grads_p = _gradients(lambda x, w: F.conv2d(x, w, padding=2, groups=3), (x, w), grad)
    torch.testing.assert_close(out_k, out_p, **F64)
    for gk, gp in zip(grads_k, grads_p):
        torch.testing.assert_close(gk, gp, **F64)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_residual_se_combine_values_and_gradients(interpreted, layout):
    """h + skip + (a h + b) gate: gradients of h, skip, the BatchNorm map and the gate."""
    se = interpreted[1]
    gen = torch.Generator().manual_seed(3)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    h, skip = (torch.randn(3, 70, 5, 7, generator=gen, dtype=torch.float64).contiguous(memory_format=fmt) for _ in "hs")
    a, b = torch.rand(70, generator=gen, dtype=torch.float64) + 0.5, torch.randn(70, generator=gen, dtype=torch.float64)
    gate = torch.rand(3, 70, generator=gen, dtype=torch.float64)
    grad = torch.randn(3, 70, 5, 7, generator=gen, dtype=torch.float64)

    def plain(h, skip, a, b, gate):
        return h + skip + (h * a[:, None, None] + b[:, None, None]) * gate[:, :, None, None]

    out_k, grads_k = _gradients(se.ResidualSECombine.apply, (h, skip, a, b, gate), grad)
    out_p, grads_p = _gradients(plain, (h, skip, a, b, gate), grad)
    torch.testing.assert_close(out_k, out_p, **F64)
    assert out_k.is_contiguous(memory_format=fmt)
    for name, gk, gp in zip(("h", "skip", "a", "b", "gate"), grads_k, grads_p):
        torch.testing.assert_close(gk, gp, **F64, msg=name)


def _randomised_pair(spec):
    torch.manual_seed(0)
    plain = build_model(spec).double()
    gen = torch.Generator().manual_seed(1)
    for m in plain.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen, dtype=torch.float64) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen, dtype=torch.float64) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=gen, dtype=torch.float64) + 0.5)
    kernel = build_model(spec).double()
    kernel.load_state_dict(plain.state_dict())
    return kernel, plain


@pytest.mark.parametrize(
    "layout, train",
    [
        ("nchw", False),
        ("channels_last", True),
        pytest.param("nchw", True, marks=pytest.mark.slow),
        pytest.param("channels_last", False, marks=pytest.mark.slow),
    ],
)
def test_blocks_on_the_kernels_equal_the_emitted_model(interpreted, monkeypatch, train, layout):
    """A RobustResNet whose blocks run on the kernels (the fused runtime's route where Triton runs):
    outputs, input and parameter gradients and the BatchNorm statistics, twice (the second pass
    reads the statistics the first updated)."""
    robust = interpreted[2]
    calls = []
    real_cascade = robust.cascade
    monkeypatch.setattr(robust, "cascade", lambda block, h: calls.append(block) or real_cascade(block, h))
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    kernel, plain = (m.to(memory_format=fmt) for m in _randomised_pair(ArchSpec("robust", (2, 1, 1), (16, 32, 64))))
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(3, 3, 8, 8, generator=gen, dtype=torch.float64).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (3,), generator=gen)
    for _ in range(2 if train else 1):
        results = []
        for model, span in ((kernel, True), (plain, False)):
            model.train(train)
            xg = x.clone().requires_grad_(True)
            with fused_blocks(model, span):
                out = model(xg)
                F.cross_entropy(out, y).backward()
            results.append((out.detach(), xg.grad))
        torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-8, atol=1e-12)
    assert len(calls) == 2 * (2 if train else 1)  # stage 1's two stride-1 blocks, each pass
    for (key, p), q in zip(kernel.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-11, msg=key)
    for (key, s), t in zip(kernel.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(s, t, rtol=1e-12, atol=1e-14, msg=key)


def test_kernels_route_only_where_triton_runs(monkeypatch):
    """CPU tensors take the CPU route unless the interpreter is on; a CUDA tensor takes the kernels."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not kernels.usable(torch.zeros(1))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not kernels.usable(torch.zeros(1))  # the interpreter alone: the CPU route still
    monkeypatch.setenv("SCALER_KERNELS_ON_CPU", "1")
    assert kernels.usable(torch.zeros(1))
    assert kernels.usable(torch.empty(1, device="meta")) is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gpu_kernels_close_to_the_emitted_model(precision, train):
    """On a GPU (compiled kernels, not the interpreter): a RobustResNet's logits, input and weight
    gradients and BatchNorm statistics through the kernels against the model as emitted, in fp32
    (TF32 off) and under bf16 autocast, in eval mode (attacks) and training mode."""
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        torch.manual_seed(0)
        kernel, plain = (
            m.float().cuda().to(memory_format=torch.channels_last)
            for m in _randomised_pair(ArchSpec("robust", (2, 1, 1), (16, 32, 64)))
        )
        x = torch.rand(8, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
        results = []
        for model, span in ((kernel, True), (plain, False)):
            model.train(train)
            xg = x.clone().requires_grad_(True)
            with fused_blocks(model, span), torch.autocast("cuda", torch.bfloat16, enabled=precision == "bf16"):
                out = model(xg).float()
            out.square().mean().backward()
            results.append((out.detach(), xg.grad, model.stage1[1].convs[0].weight.grad))
        tol = dict(rtol=1e-4, atol=1e-5) if precision == "fp32" else dict(rtol=5e-2, atol=5e-2)
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, **tol)
        torch.testing.assert_close(kernel.stage1[1].bns[0].running_var, plain.stage1[1].bns[0].running_var, **tol)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


@pytest.mark.slow
def test_higher_order_gradients_through_the_kernels(interpreted):
    """A Hessian-vector product (create_graph), forward-over-reverse and batched gradients through
    blocks on the kernels equal the emitted model's: their backwards write the function out in
    differentiable ops there (partial derivatives: the SE gate depends on h)."""
    import torch.autograd.forward_ad as fwad

    kernel, plain = _randomised_pair(ArchSpec("robust", (2, 1, 1), (16, 32, 64)))
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def hvp(model):
        xr = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(model(xr).square().sum(), xr, create_graph=True)
        return torch.autograd.grad(g.square().sum(), xr)[0]

    def forward_over_reverse(model):
        xr = x.clone().requires_grad_(True)
        out = model(xr)
        tangent = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
        with fwad.dual_level():
            (g,) = torch.autograd.grad(out, xr, fwad.make_dual(torch.ones_like(out), tangent))
            return fwad.unpack_dual(g).tangent.clone()

    def batched(model):
        xr = x.clone().requires_grad_(True)
        out = model(xr)
        rows = torch.eye(out.shape[1], dtype=out.dtype)[:, None].expand(-1, *out.shape)
        return torch.autograd.grad(out, xr, rows, is_grads_batched=True)[0]

    for f in (hvp, forward_over_reverse, batched):
        kernel.eval(), plain.eval()
        with fused_blocks(kernel, True):
            got = f(kernel)
        torch.testing.assert_close(got, f(plain), rtol=1e-9, atol=1e-12, msg=f.__name__)
