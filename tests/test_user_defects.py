"""Defects a new user hit (issue 27), each checked through what the user sees: outputs, exit
codes, files. Every error is one line on stderr with exit code 2."""

from __future__ import annotations

import json

import pytest

import scaler
from scaler_cli.app import main

USER_MODEL = """\
import torch.nn as nn


def build_model(num_classes=10):
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes)
    )
"""
TINY = ["--block", "basic", "--depths", "1,1,1", "--widths", "1,1,1"]


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str) -> str:
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# --------------------------------------------------------------------------- 2. one size limit
@pytest.mark.parametrize(
    "args",
    [
        ["count", "--block", "basic", "--depths", "100000,1,1", "--widths", "1,1,1"],
        ["count", "--block", "vgg", "--depths", "1,1,1,1,1001", "--channels", "8,8,8,8,8"],
        ["emit", "--block", "basic", "--depths", "1001,1,1", "--widths", "1,1,1", "-o", "deep.py"],
        [
            "train",
            "--block",
            "basic",
            "--depths",
            "1001,1,1",
            "--widths",
            "1,1,1",
            "--dataset",
            "digits",
            "--out",
            "run",
        ],
    ],
)
def test_specs_deeper_than_what_solve_builds_are_refused_everywhere(capsys, tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, *args)
    assert "deeper than 1000 blocks" in one_line_error(code, err) and not out
    assert not list(tmp_path.iterdir())  # nothing written


def test_the_depth_and_width_limits_are_the_solvers(capsys):
    from scaler import solver, spec

    assert (spec.MAX_DEPTH, spec.MAX_CHANNELS) == (solver.MAX_DEPTH, solver.MAX_CHANNELS)
    code, _, err = run(capsys, "solve", "--flops", "10000T")
    assert f"deeper than {spec.MAX_DEPTH} blocks" in one_line_error(code, err)
    code, _, err = run(capsys, "count", "--block", "basic", "--depths", "1,1,1", "--channels", "16,2000000,1")
    assert "wider than 1,000,000 channels" in one_line_error(code, err)
    with pytest.raises(scaler.ScalerError, match="deeper than 1000 blocks"):
        scaler.count({"block": "basic", "depths": [1001, 1, 1], "planes": [16, 32, 64]})
    assert scaler.count({"block": "basic", "depths": [1000, 1, 1], "planes": [16, 32, 64]}).params > 0


# --------------------------------------------------------------------------- 8. channels: one meaning
@pytest.mark.parametrize("name", ["robustresnet-a1", "wrn-34-r", "densenet-121-r", "vgg-11-r"])
def test_count_json_channels_feed_back_as_flags(capsys, name):
    code, out, _ = run(capsys, "count", name, "--json")
    data = json.loads(out)
    block = data["block"] if isinstance(data["block"], str) else ",".join(data["block"])
    flags = ["--block", block, "--depths", ",".join(map(str, data["depths"]))]
    flags += ["--channels", ",".join(map(str, data["channels"]))]
    if block == "dense":
        flags += ["--growth", str(scaler.get_spec(name).growth)]
    code, out, err = run(capsys, "count", *flags, "--json")
    again = json.loads(out)
    assert code == 0, err
    assert (again["params"], again["flops"], again["channels"]) == (data["params"], data["flops"], data["channels"])


def test_solve_json_channels_feed_back_and_set_the_stem(capsys):
    code, out, _ = run(capsys, "solve", "--params", "20M", "--rule", "robustwrn", "--json")
    data = json.loads(out)
    channels = ",".join(map(str, data["channels"]))
    code, out, _ = run(
        capsys,
        "count",
        "--block",
        "basic",
        "--depths",
        ",".join(map(str, data["depths"])),
        "--channels",
        channels,
        "--json",
    )
    assert code == 0 and json.loads(out)["params"] == data["params"]
    # the planes alone (the old form) still mean a 16-channel stem; a stem of its own is kept
    code, out, _ = run(capsys, "count", "--block", "basic", "--depths", "1,1,1", "--channels", "16,32,64", "--json")
    assert json.loads(out)["channels"] == [16, 16, 32, 64]
    code, out, _ = run(capsys, "count", "--block", "basic", "--depths", "1,1,1", "--channels", "8,16,32,64", "--json")
    assert json.loads(out)["channels"] == [8, 16, 32, 64]
    assert json.loads(out)["params"] == scaler.count(scaler.ArchSpec("basic", (1, 1, 1), (16, 32, 64), stem=8)).params
    code, _, err = run(capsys, "count", "--block", "basic", "--depths", "1,1,1", "--channels", "8,16,32,64,1")
    assert "stem,P1,P2,P3" in one_line_error(code, err)
