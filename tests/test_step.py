"""The fast training step: same update as the plain path; torch.compile and precision resolution."""

import copy

import pytest
import torch

from scaler.builder import build_model
from scaler.spec import ArchSpec
from trainers.config import make_config
from trainers.step import Stepper, make_optimizer, resolve_precision

SPEC = ArchSpec("basic", (1, 1, 1), (16, 32, 64))


def one_step(model, compile_model=False, channels_last=False):
    cfg = make_config(
        "bat",
        {
            "model": "t",
            "precision": "fp32",
            "compile": compile_model,
            "channels_last": channels_last,
            "attack_steps": 3,
        },
    )
    net = model.to(memory_format=torch.channels_last) if channels_last else model
    step_model = torch.compile(net) if compile_model else net
    stepper = Stepper(
        step_model,
        make_optimizer(net, cfg),
        cfg,
        device=torch.device("cpu"),
        autocast_dtype=None,
        attack_generator=torch.Generator().manual_seed(0),
        war=None,
        attack_model=step_model,
    )
    torch.manual_seed(0)
    x, y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    stepper.step(x, y, lr=0.1)
    return net


def test_channels_last_gives_the_same_update():
    torch.manual_seed(0)
    model = build_model(SPEC)
    a = one_step(copy.deepcopy(model))
    b = one_step(copy.deepcopy(model), channels_last=True)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-4), name


@pytest.mark.slow
def test_compiled_step_matches_eager():
    torch.manual_seed(0)
    model = build_model(SPEC)
    eager = one_step(copy.deepcopy(model))
    compiled = one_step(copy.deepcopy(model), compile_model=True)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.allclose(p, q, atol=1e-4), name


def test_precision_resolution():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    assert resolve_precision("auto", cpu) in (None, torch.bfloat16)


def test_bench_cli_json(capsys):
    import json

    from scaler_cli.app import main

    assert (
        main(
            [
                "bench",
                "train",
                "--block",
                "basic",
                "--depths",
                "1,1,1",
                "--widths",
                "1,1,1",
                "--batch-size",
                "8",
                "--steps",
                "1",
                "--warmup",
                "1",
                "--json",
            ]
        )
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["images_per_s"] > 0 and data["speedup"] > 0 and data["flops_per_step"] > 0
    assert main(["bench", "train", "wrn-a1", "--method", "standard"]) == 2


def test_channels_last_hazard_is_detected():
    from trainers.step import channels_last_hazard

    cpu = torch.device("cpu")
    assert channels_last_hazard(build_model(ArchSpec("basic", (1, 1, 1), (8, 16, 32))), cpu)
    assert channels_last_hazard(build_model(SPEC), cpu) is None
    assert channels_last_hazard(build_model(ArchSpec("robust", (1, 1, 1), (16, 32, 64))), cpu) is None


def test_bench_falls_back_to_nchw_for_hazard_models():
    """Run in a subprocess: on failure this is a segfault, not an exception."""
    import json
    import subprocess
    import sys

    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "scaler_cli",
            "bench",
            "train",
            "--block",
            "basic",
            "--depths",
            "1,1,1",
            "--channels",
            "8,16,32",
            "--batch-size",
            "39",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--no-reference",
            "--precision",
            "fp32",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-500:]
    assert json.loads(res.stdout)["channels_last"] is False
