"""Regional compilation (`trainers.compiled`): each distinct block is compiled once and its repeats
reuse the graph, the compiled twin computes the model's function and shares its parameters and
buffers (gradients and BatchNorm statistics land on the model), and the model itself is left as
it was."""

import shutil

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from scaler.builder import build_model
from scaler.spec import ArchSpec
from trainers.compiled import compile_cache_dir, compile_model, compiled_regions, tagged_blocks


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_repeats_of_a_block_reuse_one_compiled_graph():
    """A d4-2-2 RobustResNet has 8 blocks of 6 kinds (each stage's first and its repeats): 6 graphs
    per mode, whatever the depth."""
    torch.manual_seed(0)
    model = build_model(ArchSpec("robust", (4, 2, 2), (16, 32, 64)))
    counter = CompileCounter()
    twin = compile_model(model, backend=counter, regional=True)
    assert compiled_regions(twin) == 8 and compiled_regions(model) == 0
    assert all("forward" not in b.__dict__ for b in tagged_blocks(model))
    x = torch.rand(2, 3, 16, 16)
    twin.eval(), model.eval()
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)
    assert counter.frame_count == 6
    twin.train()
    twin(x.clone().requires_grad_(True)).sum().backward()
    assert counter.frame_count == 12  # the training-mode variants
    assert model.stem.weight.grad is not None and int(model.stage1[0].bn2.num_batches_tracked) == 1


def test_compiled_twin_gradients_equal_eager():
    torch.manual_seed(0)
    model = build_model(ArchSpec("robust", (2, 1, 1), (16, 32, 64))).double()
    twin = compile_model(model, backend="aot_eager", regional=True)
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    grads = []
    for net in (twin, model):
        net.eval()
        xg = x.clone().requires_grad_(True)
        out = net(xg)
        (gx,) = torch.autograd.grad(out.square().sum(), [xg])
        grads.append((out.detach(), gx))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-10, atol=1e-12)


def test_models_without_emitted_blocks_compile_whole(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    compiled = compile_model(net, backend=CompileCounter())
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule) and compiled._orig_mod is net
    assert compile_cache_dir() == tmp_path / ".cache" / "scaler" / "inductor"
    robust = build_model(ArchSpec("robust", (1, 1, 1), (16, 32, 64)))  # on a CPU: whole (measured faster there)
    assert isinstance(compile_model(robust, backend=CompileCounter()), torch._dynamo.eval_frame.OptimizedModule)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compile_cache_dir() == tmp_path / "mine"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="inductor's CPU backend needs a C++ compiler")
def test_inductor_regional_compile_equals_eager(tmp_path, monkeypatch):
    """The real compiler, its cache in a directory of the test's."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    model = build_model(ArchSpec("robust", (2, 1, 1), (16, 32, 64))).eval()
    twin = compile_model(model, regional=True)
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(twin.eval()(x), model(x), rtol=1e-4, atol=1e-5)
    assert any(tmp_path.iterdir())  # kernels written to the cache on disk
