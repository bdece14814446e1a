"""DDP with 2 CPU processes (gloo) under torchrun: split batch, rank-0 writes, resume, loss curve."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ARGS = [
    "--block",
    "basic",
    "--depths",
    "1,1,1",
    "--widths",
    "1,1,1",
    "--dataset",
    "synthetic",
    "--batch-size",
    "64",
    "--lr",
    "0.05",
    "--attack-steps",
    "2",
    "--val-n",
    "32",
    "--seed",
    "0",
    "--quiet",
    "--precision",
    "fp32",
]


def torchrun(*args):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "scaler_cli",
        "train",
        *args,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1", **_env()})
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _env():
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}


def losses(run):
    return [json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_ddp_two_processes_tracks_single_process_and_resumes(tmp_path):
    from scaler_cli.app import main

    single = tmp_path / "single"
    assert main(["train", *ARGS, "--epochs", "3", "--out", str(single)]) == 0
    ddp = tmp_path / "ddp"
    torchrun(*ARGS, "--epochs", "3", "--stop-after", "2", "--distributed", "--out", str(ddp))
    assert sorted(p.name for p in ddp.iterdir()) == ["best.pt", "config.json", "last.pt", "metrics.jsonl", "model.py"]
    assert len(losses(ddp)) == 2  # one writer: rank 0 alone logs
    torchrun("--resume", "--distributed", "--quiet", "--out", str(ddp))
    config = json.loads((ddp / "config.json").read_text())
    assert config["extra"]["world_size"] == 2
    a, b = losses(single), losses(ddp)
    assert len(b) == 3
    for x, y in zip(a, b):  # BN statistics are per rank, so close but not identical
        assert abs(x - y) <= 0.1 * x
