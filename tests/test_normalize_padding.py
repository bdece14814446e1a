"""Input normalisation and "same" padding: spec round trip, exact costs, emitted behaviour, CLI."""

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from scaler.builder import build_model
from scaler.codegen import render
from scaler.cost import count
from scaler.errors import ScalerError
from scaler.presets import PRESETS
from scaler.spec import NORMALIZATIONS, ArchSpec
from scaler.verify import fvcore_flops, numel
from scaler_cli.app import main

CIFAR10 = NORMALIZATIONS["cifar10"]


def test_reference_mean_std_are_exact():
    assert NORMALIZATIONS["cifar10"] == ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
    assert NORMALIZATIONS["cifar100"] == ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
    assert NORMALIZATIONS["none"] is None


def test_padding_round_trips_and_old_specs_load_unchanged():
    spec = ArchSpec("basic", (1, 1, 1), (16, 32, 64), padding="same", mean=CIFAR10[0], std=CIFAR10[1])
    again = ArchSpec.from_json(spec.to_json())
    assert again == spec and again.padding == "same" and again.normalization == "cifar10"
    old = {"block": "basic", "depths": [1, 1, 1], "planes": [16, 32, 64], "mean": None, "std": None}
    loaded = ArchSpec.from_dict(old)
    assert loaded.padding == "symmetric" and loaded.normalization == "none"
    # the default is not written, so specs (and generated files embedding them) stay byte-identical
    assert "padding" not in loaded.to_dict() and json.loads(spec.to_json())["padding"] == "same"
    assert replace(loaded, mean=(0.1, 0.2, 0.3), std=(1, 1, 1)).normalization == "custom"
    with pytest.raises(ScalerError, match="unknown padding"):
        ArchSpec("basic", (1, 1, 1), (16, 32, 64), padding="valid")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_padding_and_normalisation_change_no_cost(name):
    spec = PRESETS[name].spec
    varied = replace(spec, padding="same", mean=CIFAR10[0], std=CIFAR10[1])
    assert count(varied) == count(spec)


@pytest.mark.parametrize("block, planes", [("basic", (8, 16, 24)), ("robust", (16, 32, 48))])
@pytest.mark.parametrize("resolution", [32, 30, 13])
def test_same_padded_normalised_models_equal_fvcore(block, planes, resolution):
    # 30 and 13 give odd inputs to strided convs, where "same" pads (1, 1): sizes still ceil(R/2)
    spec = ArchSpec(block, (2, 1, 2), planes, resolution=resolution, padding="same", mean=CIFAR10[0], std=CIFAR10[1])
    model = build_model(spec)
    total, by_op = fvcore_flops(model, resolution)
    cost = count(spec)
    assert total == cost.flops and numel(model) == cost.params
    assert by_op.get("conv", 0) == cost.conv


def test_same_padding_pads_right_and_bottom_on_even_inputs():
    """Stride-2 convs of a same-padded model see (0, 1, 0, 1); stride-1 convs are unchanged."""
    spec = ArchSpec("basic", (1, 1, 1), (8, 16, 16), padding="same")
    torch.manual_seed(0)
    model = build_model(spec).eval()
    sym = build_model(replace(spec, padding="symmetric")).eval()
    sym.load_state_dict(model.state_dict())
    block = model.stage2[0]
    assert block.conv1.padding == (0, 0) and model.stage1[0].conv1.padding == (1, 1)
    x = torch.rand(2, 8, 32, 32)
    pre = block.act1(block.bn1(x))
    expected = F.conv2d(F.pad(pre, (0, 1, 0, 1)), block.conv1.weight, stride=2)
    assert torch.allclose(block.conv1(F.pad(pre, (0, 1, 0, 1))), expected)
    with torch.no_grad():
        y = model(torch.rand(2, 3, 32, 32))
        assert y.shape == (2, 10)
        z = torch.rand(2, 3, 32, 32)
        assert not torch.allclose(model(z), sym(z), atol=1e-4)  # another function, same weights


def test_normalisation_is_inside_the_model():
    spec = ArchSpec("basic", (1, 1, 1), (8, 16, 16), mean=CIFAR10[0], std=CIFAR10[1])
    torch.manual_seed(0)
    model = build_model(spec).eval()
    plain = build_model(replace(spec, mean=None, std=None)).eval()
    plain.load_state_dict(model.state_dict())  # buffers are non-persistent: same state dict
    assert set(model.state_dict()) == set(plain.state_dict())
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(CIFAR10[0]).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10[1]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), plain((x - mean) / std), atol=1e-5)


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_flags_reach_emit(capsys, tmp_path):
    path = tmp_path / "m.py"
    code, _, err = run(capsys, "emit", "wrn-a1", "--normalize", "cifar100", "--padding", "same", "-o", str(path))
    assert code == 0, err
    text = path.read_text()
    assert text == render(
        replace(
            PRESETS["wrn-a1"].spec,
            padding="same",
            mean=NORMALIZATIONS["cifar100"][0],
            std=NORMALIZATIONS["cifar100"][1],
        )
    )
    assert "def same_pad(" in text and "0.5071" in text and '"padding": "same"' in text
    code, _, err = run(
        capsys, "emit", "wrn-a1", "--mean", "0.5,0.5,0.5", "--std", "0.25,0.25,0.25", "-o", str(tmp_path / "c.py")
    )
    assert code == 0 and "0.25" in (tmp_path / "c.py").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--normalize", "imagenet"], "unknown normalisation"),
        (["--mean", "0.5,0.5,0.5"], "both --mean and --std"),
        (["--normalize", "cifar10", "--mean", "0,0,0", "--std", "1,1,1"], "not both"),
        (["--mean", "0,0", "--std", "1,1,1"], "3 comma-separated"),
        (["--mean", "0,0,0", "--std", "1,0,1"], "std values must be > 0"),
        (["--padding", "valid"], "unknown padding"),
    ],
)
def test_cli_bad_normalisation_or_padding_is_one_line(capsys, args, message):
    code, out, err = run(capsys, "count", "wrn-28-10", *args)
    assert code == 2 and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("block", ["basic", "robust"])
def test_same_padded_emitted_file_is_ruff_clean(tmp_path, block):
    import subprocess
    import sys

    pytest.importorskip("ruff")
    spec = ArchSpec(block, (1, 1, 1), (16, 32, 64), padding="same", mean=CIFAR10[0], std=CIFAR10[1])
    path = tmp_path / "m.py"
    path.write_text(render(spec))
    ruff = [sys.executable, "-m", "ruff"]
    assert subprocess.run([*ruff, "check", "--no-cache", str(path)], capture_output=True).returncode == 0
    fmt = [*ruff, "format", "--check", "--no-cache", "--line-length", "120", str(path)]
    assert subprocess.run(fmt, capture_output=True).returncode == 0


def test_count_reports_normalisation_and_padding(capsys):
    code, out, _ = run(capsys, "count", "wrn-70-16", "--normalize", "cifar10", "--padding", "same", "--json")
    data = json.loads(out)
    assert code == 0 and data["normalize"] == "cifar10" and data["padding"] == "same"
    assert data["flops"] == count(PRESETS["wrn-70-16"].spec).flops
    code, out, _ = run(capsys, "count", "wrn-70-16", "--mean", "0.5,0.5,0.5", "--std", "0.2,0.2,0.2")
    assert code == 0 and "normalize custom" in out and "padding" not in out


# --------------------------------------------------------------------------- with the design space
@pytest.mark.parametrize(
    "block, planes, knobs",
    [
        ("basic-post", (8, 16, 24), {"kernel_size": 5}),
        ("robust-post", (32, 64, 96), {"norm": "group", "activation": "gelu"}),
        ("robust", (16, 32, 48), {"scales": 1, "cardinality": 1, "base_width": 160, "se": "standard"}),
        ("robust", (16, 32, 48), {"kernel_size": 7, "se": "conv3x3", "se_reduction": 4}),
        ("inverted", (8, 16, 24), {"kernel_size": 5, "activation": "prelu"}),
        (("basic", "inverted", "robust"), (8, 16, 32), {"kernel_size": (3, 5, 3)}),
    ],
)
@pytest.mark.parametrize("resolution", [32, 13])
def test_same_padding_on_every_residual_block_is_exact(block, planes, knobs, resolution):
    """Every strided k x k conv of every residual block pads "same" (k 1..7); costs stay the
    symmetric model's, equal to fvcore and numel; on even sizes the function differs from the
    symmetric one (on odd ones "same" pads k // 2 each side, which is symmetric)."""
    spec = ArchSpec(block, (2, 1, 2), planes, resolution=resolution, padding="same", **knobs)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    total, _ = fvcore_flops(model, resolution)
    cost = count(spec)
    assert cost == count(replace(spec, padding="symmetric"))
    assert total == cost.flops and numel(model) == cost.params
    strided = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)]
    assert strided and all(m.padding == (0, 0) for m in strided)
    sym = build_model(replace(spec, padding="symmetric")).eval()
    sym.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, resolution, resolution)
    with torch.no_grad():
        assert torch.allclose(model(x), sym(x), atol=1e-5) == (resolution % 2 == 1)


def test_same_pad_follows_tensorflow_for_every_kernel():
    """The emitted helper pads max((ceil(n/s)-1)s + k - n, 0), the odd pixel right/bottom."""
    ns = {}
    exec(compile(render(ArchSpec("basic", (1, 1, 1), (8, 16, 16), padding="same")), "m", "exec"), ns)
    for n, k, expected in [(32, 3, (0, 1)), (31, 3, (1, 1)), (32, 5, (1, 2)), (32, 7, (2, 3)), (32, 1, (0, 0))]:
        out = ns["same_pad"](torch.zeros(1, 1, n, n), 2, k)
        assert out.shape[-1] == n + sum(expected)
        ones = ns["same_pad"](torch.ones(1, 1, n, n), 2, k)[0, 0, n // 2]
        assert (int((ones[: expected[0]] == 0).sum()), int((ones[n + expected[0] :] == 0).sum())) == expected
    assert ns["same_pad"](torch.ones(1, 1, 5, 5), 1, 3).shape == (1, 1, 5, 5)


@pytest.mark.parametrize("name", ["vgg-11", "densenet-121-r"])
def test_same_padding_on_vgg_and_densenet_is_their_one_function(name):
    """VGG and DenseNet downsample by pooling and have no strided conv, where TensorFlow "same"
    padding is symmetric: the spec records it, the file says so and computes the same function."""
    spec = replace(PRESETS[name].spec, padding="same", mean=CIFAR10[0], std=CIFAR10[1])
    text, sym = render(spec), render(replace(spec, padding="symmetric"))
    assert "def same_pad(" not in text and "equals symmetric padding" in text and '"padding": "same"' in text
    strip = [line for line in text.splitlines() if not line.startswith(("spec:", 'Padding "same"'))]
    assert strip == [line for line in sym.splitlines() if not line.startswith("spec:")]


def test_default_knobs_are_left_out_of_spec_json():
    """Issue 10's knobs join OPTIONAL_FIELDS: a spec at the defaults serialises as before they existed."""
    from dataclasses import fields

    from scaler.spec import OPTIONAL_FIELDS

    defaults = {f.name: f.default for f in fields(ArchSpec)}
    assert all(defaults[k] == v for k, v in OPTIONAL_FIELDS.items())
    old = '{"activation": "relu", "block": "robust", "depths": [14, 14, 7], "mean": null, "name": "a1", '
    old += (
        '"num_classes": 10, "planes": [80, 224, 192], "resolution": 32, "std": null, "stem": 16, "strides": [1, 2, 2]}'
    )
    assert ArchSpec.from_json(old).to_json() == old
    spec = ArchSpec("robust", (1, 1, 1), (16, 32, 64), se="none", kernel_size=(3, 5, 3), padding="same")
    d = json.loads(spec.to_json())
    assert d["se"] == "none" and d["kernel_size"] == [3, 5, 3] and d["padding"] == "same" and "norm" not in d
    assert ArchSpec.from_json(spec.to_json()) == spec
    full = spec.to_dict(omit_defaults=False)
    assert full["norm"] == "batch" and full["scales"] == 8 and full["growth"] == 32


def test_count_text_shows_knobs_with_normalisation_and_padding(capsys):
    code, out, _ = run(
        capsys, "count", "robustresnet-a1", "--se", "standard", "--normalize", "cifar10", "--padding", "same"
    )
    assert code == 0 and "normalize cifar10, padding same" in out and "se standard" in out
    code, out, _ = run(capsys, "count", "vgg-11-r", "--padding", "same", "--json")
    assert code == 0 and json.loads(out)["padding"] == "same"
