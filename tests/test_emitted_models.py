"""The emitted model file as shipped supports everything users do with a model, on every block family
(basic pre/post, robust, robust-post, inverted, VGG, DenseNet, and a per-stage mix): fvcore ==
`scaler count` == the file's header, exactly; forward hooks fire on every leaf module in train and
eval mode; torch.fx.symbolic_trace, torch.jit.script and torch.export.export give the model's
output; a norm can be swapped for another module (GroupNorm, Identity) and convert_sync_batchnorm
works; torch.compile gives the eager output. The files are plain: one `forward` per block, no fused
path, no device switches, short enough to read."""

from __future__ import annotations

import ast
import copy
import math
import re
import shutil
import warnings
from functools import cache
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from scaler.builder import build_model, load_source
from scaler.codegen import render
from scaler.cost import count
from scaler.spec import ArchSpec
from scaler.verify import fvcore_flops

ROOT = Path(__file__).resolve().parent.parent
R = dict(depths=(2, 1, 1), planes=(16, 32, 64))  # stage 1 has an identity block after its projection block

# case -> (spec, the norm a user would swap: a used norm inside a block, strided where the family has one)
CASES = {
    "basic": (ArchSpec("basic", **R), "stage2.0.bn2"),
    "basic-post": (ArchSpec("basic-post", **R), "stage2.0.bn2"),
    "basic-same": (ArchSpec("basic", padding="same", **R), "stage2.0.bn2"),
    "robust": (ArchSpec("robust", **R), "stage2.0.bn2"),  # se "residual", the default
    "robust-se-standard": (ArchSpec("robust", se="standard", **R), "stage2.0.bn2"),
    "robust-se-identity": (ArchSpec("robust", se="identity", se_reduction=4, **R), "stage2.0.bn2"),
    "robust-se-conv3x3": (ArchSpec("robust", se="conv3x3", se_reduction=4, **R), "stage2.0.bn2"),
    "robust-se-none": (ArchSpec("robust", se="none", **R), "stage2.0.bn2"),
    "robust-s1": (ArchSpec("robust", scales=1, cardinality=1, base_width=160, **R), "stage2.0.bn2"),
    "robust-post": (ArchSpec("robust-post", **R), "stage2.0.bn3"),
    "robust-same": (ArchSpec("robust", padding="same", **R), "stage2.0.bns.0"),
    "inverted": (ArchSpec("inverted", **R), "stage2.0.bn3"),
    "vgg": (ArchSpec("vgg", (1, 1, 1, 1, 1), (16, 32, 64, 64, 64)), "features.2.1"),
    "dense": (ArchSpec("dense", (1, 1, 1, 1), (32, 48, 64, 80)), "stage2.0.bn2"),
    "mixed": (
        ArchSpec(("basic", "robust", "robust"), (1, 1, 1), (16, 32, 64), se=("none", "residual", "standard")),
        "stage3.0.bn2",
    ),
}
NAMES = list(CASES)
ATOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these models are tiny (batch 2, 32x32), and two threads spinning on two
    busy cores made the quick run ~30x slower whenever anything else ran on the machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def spec_of(name: str) -> ArchSpec:
    return CASES[name][0]


@cache
def _built(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(spec_of(name))
    randomise_norms(model, torch.Generator().manual_seed(1))
    return model.eval()


def model_of(name: str) -> nn.Module:
    """A fresh copy (tests change modes, buffers and submodules) of the case's model, in eval mode,
    its BatchNorms moved away from their init so that eval mode is no identity map."""
    return copy.deepcopy(_built(name))


def randomise_norms(model: nn.Module, gen: torch.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)


def batch(seed: int = 0) -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def leaves(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if not any(True for _ in m.children())}


def header_counts(source: str) -> tuple[int, int]:
    """(params, flops) as the emitted file's docstring states them."""
    params = re.search(r"^params: ([\d,]+)$", source, re.M)
    flops = re.search(r"^flops: ([\d,]+) \(fvcore multiply-adds", source, re.M)
    assert params and flops, "the header states no params/flops line"
    return int(params.group(1).replace(",", "")), int(flops.group(1).replace(",", ""))


def unused_by_design(spec: ArchSpec) -> set[str]:
    """The leaves documented not to run, derived from the spec alone: `bn1` of a pre-activation
    robust block without a shortcut (stride 1, input channels == 4 * planes) exists for upstream's
    state-dict layout, but only the shortcut reads it."""
    out, cin = set(), spec.stem
    if spec.family != "resnet":
        return out
    for i, (k, planes, depth) in enumerate(zip(spec.knobs, spec.planes, spec.depths)):
        cout = planes * 4 if k.bottleneck else planes
        for j in range(depth):
            stride = spec.strides[i] if j == 0 else 1
            if k.block == "robust" and stride == 1 and cin == cout:
                out.add(f"stage{i + 1}.{j}.bn1")
            cin = cout
    return out


# ----------------------------------------------------------------------------- 1. exact counts


def check_counts(spec: ArchSpec) -> None:
    model = build_model(spec)
    source = render(spec)
    cost = count(spec)
    header_params, header_flops = header_counts(source)
    assert fvcore_flops(model, spec.resolution)[0] == cost.flops == header_flops
    assert sum(p.numel() for p in model.parameters()) == cost.params == header_params


@pytest.mark.parametrize("name", NAMES)
def test_fvcore_equals_count_equals_header(name):
    check_counts(spec_of(name))


@st.composite
def residual_specs(draw):
    """Small residual specs: a random block per stage, depths 1-2, random planes, strides,
    padding and kernel size; SE knobs where a stage is a bottleneck."""
    blocks = tuple(
        draw(st.sampled_from(["basic", "basic-post", "robust", "robust-post", "inverted"])) for _ in range(3)
    )
    knobs = {}
    if any(b.startswith("robust") for b in blocks):
        knobs = dict(se=draw(st.sampled_from(["residual", "standard", "identity", "conv3x3", "none"])), se_reduction=4)
        if draw(st.booleans()):
            knobs.update(scales=draw(st.sampled_from([1, 2, 4])), cardinality=draw(st.sampled_from([1, 2])))
    return ArchSpec(
        blocks,
        tuple(draw(st.integers(1, 2)) for _ in range(3)),
        tuple(draw(st.integers(16, 40)) for _ in range(3)),
        stem=draw(st.sampled_from([8, 16])),
        strides=(1, *(draw(st.sampled_from([1, 2])) for _ in range(2))),
        padding=draw(st.sampled_from(["symmetric", "same"])),
        kernel_size=draw(st.sampled_from([3, 5])),
        resolution=draw(st.sampled_from([16, 32])),
        **knobs,
    )


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(residual_specs())
def test_random_residual_specs_counts_and_hooks(spec):
    """Any spec, not only the ones above (every drawn spec validates: planes >= 16, SE reduction 4):
    the counts agree, and hooks fire on every leaf but the documented unused bn1s."""
    check_counts(spec)
    model = build_model(spec)
    x = torch.rand(2, 3, spec.resolution, spec.resolution)
    for train in (True, False):
        check_hooks(model.train(train), spec, x)


# ----------------------------------------------------------------------------- 2. hooks


def check_hooks(model: nn.Module, spec: ArchSpec, x: torch.Tensor) -> set[str]:
    """Forward hooks fire on every leaf module but those `unused_by_design` (returned), which are
    exactly the documented ones: norms in shortcut-less pre-activation robust blocks."""
    fired = set()
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: fired.add(n)) for n, m in leaves(model).items()]
    model(x)
    for h in handles:
        h.remove()
    exempt = unused_by_design(spec)
    assert set(leaves(model)) - fired == exempt
    for n in exempt:
        block = model.get_submodule(n.rsplit(".", 1)[0])
        assert type(block).__name__ == "RobustResBlock" and block.preact and block.shortcut is None
        assert isinstance(model.get_submodule(n), nn.BatchNorm2d)
    return exempt


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", NAMES)
def test_forward_hooks_fire_on_every_leaf(name, train):
    exempt = check_hooks(model_of(name).train(train), spec_of(name), batch())
    if spec_of(name).blocks[0] == "robust":  # the exemption is in use: stage 1's second block
        assert exempt == {"stage1.1.bn1"}
    else:
        assert not exempt


# ----------------------------------------------------------------------------- 3. fx, jit, export


@pytest.mark.parametrize("name", NAMES)
def test_fx_symbolic_trace_equals_model(name):
    model, x = model_of(name), batch()
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), model(x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_jit_script_equals_model(name):
    model, x = model_of(name), batch()
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), model(x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_torch_export_equals_model(name):
    model, x = model_of(name), batch()
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(batch(1)), model(batch(1)), atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- 4. norm swaps, SyncBN


def replacement(kind: str, channels: int) -> nn.Module:
    if kind == "identity":
        return nn.Identity()
    torch.manual_seed(2)
    norm = nn.GroupNorm(math.gcd(channels, 4), channels)
    nn.init.uniform_(norm.weight, 0.5, 1.5)
    nn.init.normal_(norm.bias, 0.0, 0.1)
    return norm


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["groupnorm", "identity"])
@pytest.mark.parametrize("name", NAMES)
def test_swapping_a_norm(name, kind, train):
    """The swapped-in module runs where the norm ran, and nothing else reads the old one: the model
    with the swap equals the original with the norm's output replaced (by a hook) by the new
    module's output on the norm's input, and differs from the original."""
    target = CASES[name][1]
    original = model_of(name).train(train)
    old = original.get_submodule(target)
    assert isinstance(old, nn.BatchNorm2d)
    new = replacement(kind, old.num_features)
    swapped, expected = copy.deepcopy(original), copy.deepcopy(original)
    swapped.set_submodule(target, new)
    shadow = copy.deepcopy(new)
    expected.get_submodule(target).register_forward_hook(lambda mod, inp, out: shadow(inp[0]))
    fired = []
    new.register_forward_hook(lambda mod, inp, out: fired.append(out.shape))
    x = batch()
    out = swapped(x)
    assert fired, f"the module swapped in for {target} never ran"
    torch.testing.assert_close(out, expected(x), atol=ATOL, rtol=0)
    assert not torch.allclose(out, original(x), atol=1e-3)


@pytest.mark.parametrize("name", NAMES)
def test_convert_sync_batchnorm(name):
    model, x = model_of(name), batch()
    n_norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) == n_norms > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in synced.modules())
    torch.testing.assert_close(synced(x), model(x), atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- 5. torch.compile


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile needs a C++ compiler")
@pytest.mark.parametrize("name", NAMES)
def test_torch_compile_equals_eager(name):
    model, x = model_of(name), batch()
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(model, fullgraph=True)
        out = compiled(x)
    torch.testing.assert_close(out, model(x), atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- 6. the shipped files

SHIPPED = {"robustresnet_a1.py": 250, "wrn_34_10.py": 180}
FORBIDDEN = ("autograd.Function", "fused", "forward_plain", "device.type")


@pytest.mark.parametrize("file", list(SHIPPED))
def test_shipped_file_is_plain_short_and_standalone(file):
    path = ROOT / "generated" / file
    source = path.read_text()
    n_lines = len(source.splitlines())
    assert n_lines <= SHIPPED[file], f"{file} has {n_lines} lines"
    for word in FORBIDDEN:
        hits = [f"{i}: {line.strip()}" for i, line in enumerate(source.splitlines(), 1) if word in line]
        assert not hits, f"{file} mentions {word!r}: " + "; ".join(hits)
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported <= {"math", "torch"}, f"{file} imports {sorted(imported - {'math', 'torch'})}"
    module = load_source(source, str(path))
    assert callable(module.build_model)
    # one forward per block class, and nothing else that switches formulation
    for cls in vars(module).values():
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            methods = {k for k, v in vars(cls).items() if callable(v) and k.startswith("forward")}
            assert methods <= {"forward"}, f"{cls.__name__} defines {sorted(methods)}"
