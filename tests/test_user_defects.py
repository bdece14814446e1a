"""Defects a new user hit (issue 27), each checked through what the user sees: outputs, exit
codes, files. Every error is one line on stderr with exit code 2."""

from __future__ import annotations

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
