"""benchmarks/gpu_check.sh works before device time is spent on it: its --smoke run (tiny models,
the CPU) writes the JSON and the markdown with every section it was asked for, and refuses
unknown sections."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_smoke_writes_its_reports(tmp_path):
    cmd = ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path), "--smoke", "--sections", "table,profile"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=_env())
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    rows = report["sections"]["table"]["rows"]
    assert [(r["model"], r["precision"]) for r in rows] == [
        ("robust-tiny", "bf16"), ("robust-tiny", "fp32"), ("basic-tiny", "bf16"), ("basic-tiny", "fp32")
    ]  # fmt: skip
    for row in rows:
        for mode in ("train", "eval"):
            result = row[mode]
            assert result["images_per_s"] > 0 and result["speedup"] == pytest.approx(
                result["images_per_s"] / result["reference_images_per_s"]
            )
    assert rows[0]["train"]["fused"] is True and rows[0]["train_plain"]["fused"] is False  # with and without
    assert "eval_graphs" not in rows[0]  # CUDA graphs: a GPU's
    assert "train_plain" not in rows[2] and "train_plain" not in rows[1]  # bf16 rows of robust models
    profile = report["sections"]["profile"]
    assert profile["kernels"] and abs(sum(k["share"] for k in profile["kernels"]) - 1) < 0.5
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "| robust-tiny | bf16 |" in markdown and "## Kernel profile" in markdown


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--smoke", "--sections", "tests,bogus"],
            "--sections: unknown 'bogus'; take some of tests,table,compile,profile",
        ),
        (["--sections", "table"], "no CUDA GPU here: the check measures one (--smoke runs it"),
    ],
)
def test_gpu_check_refuses_in_one_line_and_writes_nothing(tmp_path, args, message):
    """Unknown sections; a run without a GPU (it would measure the CPU for minutes) unless --smoke."""
    if "--smoke" not in args and __import__("torch").cuda.is_available():
        pytest.skip("a GPU is here")
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(out), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=_env())
    assert done.returncode == 2 and message in done.stderr.splitlines()[-1], done.stderr
    assert not out.exists()


def test_gpu_check_writes_where_the_user_is(tmp_path):
    """A relative OUT_DIR is the caller's, not the repository's (the script does not change directory)."""
    cmd = ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "rel", "--smoke", "--sections", "profile"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=_env())
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "rel").iterdir()) == ["gpu_check.json", "gpu_check.md"]
    assert "n/a (no device profiled" in (tmp_path / "rel" / "gpu_check.md").read_text()


def _env():
    import os

    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
