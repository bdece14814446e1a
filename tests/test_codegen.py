"""Emitted files: drift of generated/, standalone import, exactness, determinism, safe writes."""

import site
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch

from scaler.codegen import emit, render
from scaler.cost import count
from scaler.errors import ScalerError
from scaler.presets import PRESETS
from scaler.spec import ArchSpec

ROOT = Path(__file__).resolve().parents[1]
GENERATED = [
    "wrn-28-10",
    "wrn-34-10",
    "wrn-34-12",
    "wrn-46-14",
    "wrn-70-16",
    "wrn-34-r",
    "robustresnet-a1",
    "robustresnet-a2",
    "robustresnet-a3",
    "robustresnet-a4",
    "vgg-11",
    "vgg-11-r",
    "densenet-121",
    "densenet-121-r",
]


def generated_path(name: str) -> Path:
    return ROOT / "generated" / (name.replace("-", "_") + ".py")


@pytest.mark.parametrize("name", GENERATED)
def test_generated_files_match_templates(name):
    assert generated_path(name).read_text() == render(PRESETS[name].spec), (
        f"generated/ drifted: run `scaler emit {name} -o {generated_path(name).relative_to(ROOT)} --force`"
    )


def test_generated_has_no_strays():
    expected = {generated_path(n).name for n in GENERATED}
    assert {p.name for p in (ROOT / "generated").glob("*.py")} == expected


def test_render_is_deterministic_and_documents_itself():
    spec = PRESETS["robustresnet-a1"].spec
    a, b = render(spec), render(spec)
    assert a == b
    assert '"planes": [80, 224, 192]' in a and "params: 19,222,738" in a
    assert "def build_model(num_classes: int = 10)" in a
    imports = [line for line in a.splitlines() if line.startswith(("import ", "from "))]
    assert imports == [
        "import math",
        "import torch",
        "import torch.nn.functional as F",
        "from torch import nn",
    ]


KNOB_SPECS = [
    ArchSpec("robust", (2, 1, 1), (16, 32, 64), activation="silu", mean=(0.49, 0.48, 0.45), std=(0.2, 0.2, 0.2)),
    ArchSpec(
        ("basic-post", "robust-post", "inverted"),
        (1, 1, 1),
        (16, 32, 64),
        activation=("prelu", "mish", "gelu"),
        norm="layer",
        kernel_size=(1, 5, 7),
        scales=1,
        se="conv3x3",
        se_reduction=4,
    ),
    ArchSpec("vgg", (1, 1, 1, 1, 1), (8, 8, 16, 16, 16), norm="instance", activation="leaky_relu"),
    ArchSpec("dense", (1, 2, 1, 1), (16, 16, 24, 16), growth=8, norm="group", activation="elu"),
]


@pytest.mark.parametrize("spec", KNOB_SPECS, ids=lambda s: s.describe())
def test_ruff_clean(tmp_path, spec):
    pytest.importorskip("ruff")
    path = emit(spec, tmp_path / "m.py")
    ruff = [sys.executable, "-m", "ruff"]
    assert subprocess.run([*ruff, "check", "--no-cache", str(path)], capture_output=True).returncode == 0
    fmt = subprocess.run(
        [*ruff, "format", "--check", "--no-cache", "--line-length", "120", str(path)], capture_output=True
    )
    assert fmt.returncode == 0, fmt.stdout


STANDALONE = textwrap.dedent(
    """
    import importlib.util, io, sys, torch
    spec = importlib.util.spec_from_file_location("m", sys.argv[1])
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
    assert not any(k.startswith("scaler") for k in sys.modules), "emitted file imported scaler"
    torch.manual_seed(0)
    net = m.build_model().eval()
    print(sum(p.numel() for p in net.parameters()))
    x = torch.rand(2, 3, 32, 32)
    y = net(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    buf = io.BytesIO(); torch.save(net.state_dict(), buf); buf.seek(0)
    other = m.build_model().eval(); other.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(other(x), y)
    ep = torch.export.export(net, (x,))
    assert torch.allclose(ep.module()(x), y, atol=1e-5)
    print("ok")
    """
)


@pytest.mark.parametrize(
    "name",
    # A1 takes ~17 s (torch.export traces the fused blocks' autograd Functions): CI runs it, the quick subset does not
    [pytest.param("robustresnet-a1", marks=pytest.mark.slow), "wrn-34-r", "vgg-11-r", "densenet-121-r"],
)
def test_emitted_file_is_standalone_exact_and_exportable(name, tmp_path):
    script = tmp_path / "check.py"
    script.write_text(STANDALONE)
    out = subprocess.run(
        [sys.executable, "-I", str(script), str(generated_path(name))],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    params, ok = out.stdout.split()
    assert int(params) == count(PRESETS[name].spec).params and ok == "ok"


def test_normalisation_lives_inside_the_model(tmp_path):
    from scaler.builder import load_model_file

    mean, std = (0.5, 0.25, 0.125), (0.5, 0.5, 0.25)
    norm = ArchSpec("basic", (1, 1, 1), (16, 32, 64), mean=mean, std=std)
    plain = ArchSpec("basic", (1, 1, 1), (16, 32, 64))
    a = load_model_file(emit(norm, tmp_path / "a.py")).eval()
    b = load_model_file(emit(plain, tmp_path / "b.py")).eval()
    b.load_state_dict(a.state_dict())  # same keys: buffers are not persistent
    x = torch.rand(2, 3, 32, 32)
    xn = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(a(x), b(xn), atol=1e-5)


def test_state_dict_keys_are_readable():
    from scaler.builder import build_model

    keys = list(build_model(ArchSpec("robust", (2, 1, 1), (16, 32, 64))).state_dict())
    assert "stage1.0.convs.0.weight" in keys and "stage1.0.se_fc1.weight" in keys and "fc.bias" in keys
    assert "stage1.1.shortcut.weight" not in keys and "stage1.0.shortcut.weight" in keys


def test_refuses_overwrite_and_leaves_file_untouched(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("precious")
    with pytest.raises(ScalerError, match="--force"):
        emit(PRESETS["wrn-a1"].spec, path)
    assert path.read_text() == "precious"
    emit(PRESETS["wrn-a1"].spec, path, force=True)
    assert path.read_text() == render(PRESETS["wrn-a1"].spec)
    assert [p.name for p in tmp_path.iterdir()] == ["m.py"]  # no temp files left


def test_missing_parent_is_an_error_unless_asked(tmp_path):
    target = tmp_path / "new" / "dir" / "m.py"
    with pytest.raises(ScalerError, match="--parents"):
        emit(PRESETS["wrn-a1"].spec, target)
    assert not (tmp_path / "new").exists()
    emit(PRESETS["wrn-a1"].spec, target, parents=True)
    assert target.is_file()


def test_failed_render_writes_nothing(tmp_path, monkeypatch):
    import scaler.fileio as cg

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(cg.os, "replace", boom)
    with pytest.raises(RuntimeError):
        emit(PRESETS["wrn-a1"].spec, tmp_path / "m.py")
    assert list(tmp_path.iterdir()) == []


def test_cli_emit_two_runs_byte_identical(cli, tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    assert cli("emit", "--block", "robust", "--depths", "2,2,1", "--widths", "1,1,1", "-o", str(a)).returncode == 0
    assert cli("emit", "--block", "robust", "--depths", "2,2,1", "--widths", "1,1,1", "-o", str(b)).returncode == 0
    assert a.read_bytes() == b.read_bytes()
    again = cli("emit", "--block", "robust", "--depths", "2,2,1", "--widths", "1,1,1", "-o", str(a))
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "--force" in again.stderr


@pytest.mark.slow
def test_wheel_install_emits_from_elsewhere(tmp_path):
    """Build a wheel from a clean export of HEAD, install it into a fresh venv that sees the running
    environment's packages (torch, typer, jinja2, ...) through an explicit .pth file, whatever
    that environment is (a CI venv, the system site), and emit from another directory: templates
    must travel with the package."""
    export = tmp_path / "src"
    export.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(export)], input=archive, check=True)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(export),
        ],
        check=True,
        timeout=300,
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    venv_site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # Plain path entries: the running environment's own .pth hooks (e.g. an editable scaler) stay off.
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    (Path(venv_site) / "running_env.pth").write_text("\n".join(sorted(ours)) + "\n")
    wheel = next(wheels.glob("scaler-*.whl"))
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)], check=True, timeout=300
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run(
        [str(py), "-c", "import scaler, sys; print(scaler.__file__)"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert str(venv) in where, where
    out = subprocess.run(
        [str(venv / "bin" / "scaler"), "emit", "robustresnet-a1", "-o", "a1.py"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert (elsewhere / "a1.py").read_text() == generated_path("robustresnet-a1").read_text()
