"""Real sweeps on digits through the session's local Ray (2 CPUs): a 4-architecture study and its
rerun, a worker killed with SIGKILL mid-trial that resumes from its last.pt, and a failing trial
recorded as failed while the others finish (through `--address`, as on a cluster)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import scaler
from scaler_cli.app import main
from studies.results import load_records
from studies.store import Store

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--dataset", "digits", "--attack-steps", "1", "--val-n", "32", "--test-n", "64", "--batch-size", "256"]
FAST = [*TINY, "--test-attacks", "clean,pgd20"]  # where the test metrics are not what is checked


def space_file(tmp_path, widths: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(f"block: basic\ndepths: [1, 1, 1]\nwidths: {widths}\n")
    return path


def sweep_json(capsys, *args) -> tuple[int, dict]:
    capsys.readouterr()
    rc = main(["sweep", *args, "--quiet", "--json"])
    out = capsys.readouterr().out
    return rc, json.loads(out[out.index("{\n") :])  # Ray's driver may print a worker's death before it


def mtimes(study: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in (study / "trials").rglob("*") if p.is_file()}


def test_sweep_four_architectures_then_a_rerun_trains_nothing(ray_local, tmp_path, capsys):
    space = space_file(tmp_path, "[[1, 2], 1, [1, 2]]")
    study = tmp_path / "study"
    args = [str(space), "--out", str(study), "--epochs", "1", *TINY]
    rc, summary = sweep_json(capsys, *args)
    assert rc == 0 and (summary["complete"], summary["failed"], summary["skipped"]) == (4, 0, 0)

    assert main(["results", str(study), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["arch_id"] for r in rows] == [1, 2, 3, 4] and {r["status"] for r in rows} == {"complete"}
    for r in rows:  # exact costs equal `scaler count` of the same spec
        widths = f"{r['W1']},{r['W2']},{r['W3']}"
        assert main(["count", "--block", "basic", "--depths", "1,1,1", "--widths", widths, "--json"]) == 0
        counted = json.loads(capsys.readouterr().out)
        assert (r["params"], r["flops"]) == (counted["params"], counted["flops"])
        assert r["best_epoch"] == 1 and r["epochs"] == 1 and r["test_n"] == 64 and r["attempts"] == 1
        for key in ("test_clean", "test_fgsm", "test_pgd20", "test_cw40", "val_pgd20", "cpu_hours"):
            assert r[key] is not None
        history = [json.loads(line) for line in (study / "trials" / str(r["arch_id"]) / "metrics.jsonl").open()]
        assert r["images_per_s"] == pytest.approx(history[0]["images_per_s"]) and r["images_per_s"] > 0  # its epoch
    flops = [r["flops"] for r in rows]
    assert flops == sorted(flops)
    for arch_id in (1, 4):  # each trial trained in its own run directory
        run = study / "trials" / str(arch_id)
        assert {"config.json", "metrics.jsonl", "last.pt", "best.pt", "model.py"} <= {p.name for p in run.iterdir()}

    before = mtimes(study)
    t0 = time.perf_counter()
    rc, again = sweep_json(capsys, *args)
    assert rc == 0 and (again["complete"], again["skipped"]) == (0, 4)
    assert mtimes(study) == before and time.perf_counter() - t0 < 20

    out = tmp_path / "nares.jsonl"
    assert main(["results", str(study), "--export", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 4 and lines == load_records(study)
    first = lines[0]
    assert set(first) == {"arch_id", "arch", "MACs", "Params", "train", "test_best"}
    assert first["arch"] == {"D1": 1, "W1": 1, "D2": 1, "W2": 1, "D3": 1, "W3": 1}
    cost = scaler.count(scaler.get_spec({"block": "basic", "depths": [1, 1, 1], "planes": [16, 32, 64]}))
    assert (first["MACs"], first["Params"]) == (cost.flops, cost.params)
    assert first["train"][0]["best_epoch"] == 0 and len(first["train"][0]["pgd"]) == 1
    assert first["test_best"][0]["Linf_pgd_acc"] == rows[0]["test_pgd20"]

    # other training settings in the same study are refused, with nothing run
    capsys.readouterr()
    assert main(["sweep", *args[: -len(TINY)], *TINY[:-2], "--batch-size", "128", "--quiet"]) == 2
    assert "--batch-size: 256 then, 128 now" in capsys.readouterr().err


@pytest.mark.slow
def test_a_worker_killed_mid_trial_is_retried_and_resumes_from_its_last_pt(ray_local, tmp_path, capsys):
    space = space_file(tmp_path, "[1, 1, 1]")
    study = tmp_path / "study"
    run = study / "trials" / "1"
    seen: dict = {}

    def kill_after_first_epoch():
        deadline = time.time() + 180
        while time.time() < deadline and not seen:
            try:
                metrics = (run / "metrics.jsonl").read_text()
                pid = json.loads((run / ".lock").read_text())["pid"]
            except (OSError, ValueError, KeyError):
                time.sleep(0.02)
                continue
            if metrics.count("\n") == 1 and (run / "last.pt").is_file():
                os.kill(pid, signal.SIGKILL)
                seen.update(pid=pid, metrics=metrics)
            time.sleep(0.02)

    killer = threading.Thread(target=kill_after_first_epoch, daemon=True)
    killer.start()
    rc, summary = sweep_json(capsys, str(space), "--out", str(study), "--epochs", "3", "--retries", "1", *FAST)
    killer.join()
    assert seen, "the trial finished before it could be killed"
    assert rc == 0 and summary["complete"] == 1
    with Store.open(study) as store:
        row = store.get(1)
    assert row.status == "complete" and row.attempts == 2
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]
    assert lines[0] + "\n" == seen["metrics"]  # epoch 1 kept from before the kill, not retrained
    assert [r["epoch"] for r in row.history] == [1, 2, 3]


@pytest.mark.slow
def test_a_failing_trial_is_recorded_as_failed_while_the_others_finish(ray_local, tmp_path):
    space = space_file(tmp_path, "[1, 1, [1, 2]]")
    study = tmp_path / "study"
    broken = study / "trials" / "2"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{ not json")  # a corrupted trial directory
    address = ray_local.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "scaler_cli", "sweep", str(space), "--out", str(study), "--epochs", "1", *FAST]
    cmd += ["--retries", "1", "--address", address, "--quiet"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 1, out.stderr
    assert "1 trials completed, 1 failed" in out.stdout
    assert "failed: arch 2: cannot read" in out.stdout and "Traceback" not in out.stderr
    with Store.open(study) as store:
        ok, failed = store.get(1), store.get(2)
    assert ok.status == "complete" and ok.attempts == 1
    assert failed.status == "failed" and failed.attempts == 2 and failed.error.startswith("cannot read")
    assert "\n" not in failed.error
    log = (study / "errors" / "2.log").read_text()
    assert log.count("--- attempt") == 2 and 'File "' in log and "\x1b[" not in log  # the whole traceback


def test_a_quarter_gpu_per_trial_runs_four_trials_on_each_gpu():
    """--gpus-per-trial 0.25: Ray packs four trials onto a GPU (CPUs permitting)."""
    from studies.sweep import SweepOptions, _resources

    class Cluster:
        def __init__(self, cpus, gpus):
            self.resources = {"CPU": cpus, "GPU": gpus}

        def cluster_resources(self):
            return self.resources

    quarter = SweepOptions(gpus_per_trial=0.25, cpus_per_trial=2.0)
    assert _resources(Cluster(16, 1), quarter, "auto") == (2.0, 0.25, 4)
    assert _resources(Cluster(16, 2), quarter, "auto") == (2.0, 0.25, 8)
    assert _resources(Cluster(4, 1), quarter, "auto") == (2.0, 0.25, 2)  # CPUs hold two
    assert _resources(Cluster(16, 1), SweepOptions(gpus_per_trial=0.2), "auto")[2] == 5  # not 1 // 0.2 = 4.0
    assert _resources(Cluster(16, 1), SweepOptions(), "auto") == (1.0, 1.0, 1)


def test_trial_resources_the_cluster_cannot_hold_are_refused_in_one_line(ray_local, tmp_path, capsys):
    study = tmp_path / "study"
    args = ["sweep", "nares", "--sample", "1", "--out", str(study), *TINY, "--quiet"]
    assert main([*args, "--cpus-per-trial", "64"]) == 2
    assert "--cpus-per-trial 64 but the Ray cluster has 2 CPUs" in capsys.readouterr().err
    assert main([*args, "--gpus-per-trial", "1"]) == 2
    assert "--gpus-per-trial 1 but the Ray cluster has 0 GPUs" in capsys.readouterr().err


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_the_next_run_picks_up_where_it_stopped(ray_local, tmp_path, capsys):
    space = space_file(tmp_path, "[1, 1, 1]")
    study = tmp_path / "study"
    run = study / "trials" / "1"
    args = [str(space), "--out", str(study), "--epochs", "3", *FAST]
    address = ray_local.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "scaler_cli", "sweep", *args, "--address", address, "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 180
    while time.time() < deadline and not (run / "metrics.jsonl").is_file():
        time.sleep(0.05)
    first = (run / "metrics.jsonl").read_text()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "stopped: 0 trials completed, 1 left" in err and "Traceback" not in err
    with Store.open(study) as store:
        assert store.get(1).status == "pending" and store.get(1).attempts == 0
    rc, summary = sweep_json(capsys, *args)
    assert rc == 0 and summary["complete"] == 1
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3] and lines[0] + "\n" == first.splitlines(True)[0]


@pytest.mark.slow
@pytest.mark.parametrize("command", [["sweep"], ["search", "--live"]], ids=["sweep", "search-live"])
def test_sigterm_stops_cleanly_like_ctrl_c_and_the_next_run_picks_up_where_it_stopped(
    ray_local, tmp_path, capsys, command
):
    # SLURM and other schedulers stop a job with SIGTERM; Ray's own handler must not take it over.
    space = space_file(tmp_path, "[1, 1, 1]")
    study = tmp_path / "study"
    run = study / "trials" / "1"
    live = ["--algo", "random", "--queries", "1", "--runs", "1"] if command[0] == "search" else []
    args = [*command, str(space), "--out", str(study), *live, "--epochs", "3", *FAST, "--quiet"]
    address = ray_local.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "scaler_cli", *args, "--address", address]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 180
    while time.time() < deadline and not (run / "metrics.jsonl").is_file():
        time.sleep(0.05)
    first = (run / "metrics.jsonl").read_text()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "stopped: 0 trials completed, 1 left" in err and "Traceback" not in err and "SIGTERM" not in err
    with Store.open(study) as store:
        assert store.get(1).status == "pending" and store.get(1).attempts == 0
    capsys.readouterr()
    assert main([*args, "--json"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index("{\n") :])
    assert summary["trained" if live else "complete"] == 1
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3] and lines[0] + "\n" == first.splitlines(True)[0]
