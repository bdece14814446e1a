"""The fast training step: same update as the plain path; torch.compile and precision resolution."""

import contextlib
import copy

import pytest
import torch

from scaler.builder import build_model
from scaler.cost import count
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


def test_precision_resolution(monkeypatch):
    import trainers.step as step

    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    monkeypatch.setattr(step, "cpu_has_bf16", lambda: True)
    assert resolve_precision("auto", cpu) is torch.bfloat16
    monkeypatch.setattr(step, "cpu_has_bf16", lambda: False)
    assert resolve_precision("auto", cpu) is None


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
    spec = ArchSpec("basic", (1, 1, 1), (16, 32, 64))
    attack_steps = 10  # the bat recipe's training attack: 2 forwards' worth each, the update 3
    assert data["flops_per_step"] == count(spec).flops * (2 * attack_steps + 3) * 8
    assert data["gflops_per_s"] == pytest.approx(data["flops_per_step"] / data["seconds_per_step"] / 1e9)
    assert data["fraction_of_peak"] == pytest.approx(data["gflops_per_s"] / data["peak_gflops_per_s"])
    assert 0 < data["fraction_of_peak"] < 1 and data["peak_precision"] == data["precision"]
    assert data["reference_peak_precision"] == "fp32" and 0 < data["reference_fraction_of_peak"] < 1
    assert data["reference_gflops_per_s"] == pytest.approx(data["gflops_per_s"] / data["speedup"])
    assert data["batch_size"] == 8 and data["steps"] == 1 and data["method"] == "pgd-at"
    assert data["channels_last"] is True  # no hazard: every strided shortcut sees >= 16 channels
    assert data["precision"] == ("bf16" if resolve_precision("auto", torch.device("cpu")) else "fp32")
    assert data["images_per_s"] == pytest.approx(8 / data["seconds_per_step"])
    assert data["speedup"] == pytest.approx(data["images_per_s"] / data["reference_images_per_s"])
    assert main(["bench", "train", "wrn-a1", "--method", "standard"]) == 2
    capsys.readouterr()
    assert main(["bench", "train", "wrn-a1", "--warmup", "-1"]) == 2
    err = capsys.readouterr().err
    assert "--warmup must be >= 0" in err and err.count("\n") == 1


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


@pytest.mark.parametrize("method", ["pgd-at", "trades", "mart"])
def test_training_attacks_run_with_batchnorm_folded(monkeypatch, method):
    """The Stepper's attacks enter `folded_batchnorm`, and inside it every BN runs as its affine map."""
    import trainers.attacks as attacks

    real = attacks.folded_batchnorm
    folded_counts = []

    @contextlib.contextmanager
    def spy(model):
        with real(model) as m:
            bns = [x for x in m.modules() if isinstance(x, torch.nn.BatchNorm2d)]
            folded_counts.append((len(bns), sum("forward" in x.__dict__ for x in bns)))
            yield m

    monkeypatch.setattr(attacks, "folded_batchnorm", spy)
    cfg = make_config("bat", {"model": "t", "method": method, "precision": "fp32", "attack_steps": 2})
    model = build_model(SPEC)
    stepper = Stepper(
        model,
        make_optimizer(model, cfg),
        cfg,
        device=torch.device("cpu"),
        autocast_dtype=None,
        attack_generator=torch.Generator().manual_seed(0),
        war=None,
    )
    stepper.step(torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,)), lr=0.1)
    assert folded_counts and all(n > 0 and folded == n for n, folded in folded_counts)
    assert not any("forward" in m.__dict__ for m in model.modules())  # restored after the attack


def test_training_step_flops_per_method():
    """One forward F: attack steps cost 2F (no weight gradients), trained forwards 3F; TRADES's
    attack adds a clean forward and TRADES/MART train on both batches."""
    from trainers.bench import training_step_flops

    assert training_step_flops("pgd-at", 10, 1) == 23
    assert training_step_flops("trades", 10, 1) == 27
    assert training_step_flops("mart", 10, 1) == 26
    assert training_step_flops("pgd-at", 0, 5) == 15


def test_auto_compile_only_where_it_measured_faster(monkeypatch):
    """--compile unset: on for basic-block networks on the CPU in long runs (where it won), never
    for robust-block ones (slower compiled here), short runs or unmeasured devices; a choice wins."""
    import shutil

    from trainers.step import COMPILE_MIN_STEPS, resolve_compile

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    basic = build_model(SPEC)
    robust = build_model(ArchSpec("robust", (1, 1, 1), (16, 32, 64)))
    mixed = build_model(ArchSpec(("basic", "basic", "robust"), (1, 1, 1), (16, 32, 64)))
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
    assert resolve_compile(None, basic, cpu, COMPILE_MIN_STEPS) is True
    assert resolve_compile(None, basic, cpu, COMPILE_MIN_STEPS - 1) is False
    assert resolve_compile(None, robust, cpu, 10**6) is False
    assert resolve_compile(None, mixed, cpu, 10**6) is False
    assert resolve_compile(None, basic, gpu, 10**6) is False  # unmeasured there
    assert resolve_compile(None, torch.nn.Linear(2, 2), cpu, 10**6) is False
    assert resolve_compile(True, robust, cpu, 1) is True and resolve_compile(False, basic, cpu, 10**6) is False
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no C++ compiler for Inductor
    assert resolve_compile(None, basic, cpu, 10**6) is False


@pytest.mark.parametrize("bench", ["train", "eval"])
def test_bench_reference_runs_the_plain_blocks(monkeypatch, bench):
    """The reference loops time the blocks as emitted (the papers' formulation), ours the fast
    runtime's fused blocks: a reference on fused blocks would hide what the fused code buys."""
    import trainers.bench as tb

    seen = {}
    name = "reference_step" if bench == "train" else "reference_eval"
    original = getattr(tb, name)

    def spy(model, *args, **kwargs):
        seen["fused"] = {"forward" in m.__dict__ for m in model.modules() if hasattr(type(m), "scaler_block")}
        return original(model, *args, **kwargs)

    monkeypatch.setattr(tb, name, spy)
    model = build_model(ArchSpec("robust", (1, 1, 1), (16, 32, 64)))
    if bench == "train":
        tb.bench_train(model, batch_size=2, steps=1, warmup=0, precision="fp32")
    else:
        tb.bench_eval(model, attack="fgsm", n=2, batch_size=2)
    assert seen["fused"] == {False}
    assert not any("forward" in m.__dict__ for m in model.modules())  # the caller's model untouched


def test_peak_is_taken_in_the_precision_the_convolutions_use():
    """fp32 convolutions on CUDA run as TF32 while cuDNN allows it (PyTorch's default): their
    fraction of peak is of TF32's peak, so that it is never above 1 (an H100 run reported 3.81x
    the fp32 peak). A GPU's peak matmul is large enough to saturate it."""
    from trainers.peak import PEAK_SIZE, matmul_peak, peak_precision

    assert peak_precision("cuda", "fp32", cudnn_tf32=True) == "tf32"
    assert peak_precision("cuda", "fp32", cudnn_tf32=False) == "fp32"
    assert peak_precision("cuda", "bf16", cudnn_tf32=True) == "bf16"
    assert peak_precision("cpu", "fp32", cudnn_tf32=True) == "fp32"
    assert PEAK_SIZE["cuda"] >= 8192
    allowed = torch.backends.cuda.matmul.allow_tf32
    assert matmul_peak("cpu", "tf32", size=64, repeats=1) > 0  # TF32 is a CUDA mode: on a CPU plain fp32
    assert torch.backends.cuda.matmul.allow_tf32 == allowed  # restored
