"""What a user meets around a run directory: progress output, locks, interrupts, broken model
files and unusable --out paths. Every failure is one line and leaves nothing half-written."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from scaler.errors import ScalerError
from scaler_cli.app import main
from tests_support import TINY_ARGS, tiny_config
from trainers import checkpoint
from trainers.run import resume, train


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_every_with_progress_completes_and_prints_every_epoch(tmp_path, capsys):
    code, out, err = run(capsys, "train", *TINY_ARGS, "--epochs", "3", "--eval-every", "2", "--out", tmp_path / "r")
    assert code == 0, err
    lines = [line for line in err.splitlines() if re.match(r"epoch \d+: ", line)]
    assert [line.split(":")[0] for line in lines] == ["epoch 1", "epoch 2", "epoch 3"]
    assert "val clean" not in lines[0] and "val clean" in lines[1] and "val clean" in lines[2]
    records = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert ["val_clean" in r for r in records] == [False, True, True]


def test_a_live_lock_refuses_a_second_run_and_a_stale_one_is_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / checkpoint.LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename}))
        with pytest.raises(ScalerError, match=f"in use by process {holder.pid}"):
            train(tiny_config(epochs=1), out, progress=False)
        assert [p.name for p in out.iterdir()] == [checkpoint.LOCK_NAME]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    train(tiny_config(epochs=1), out, progress=False)  # the holder died: its lock is stale
    assert (out / "last.pt").is_file() and not (out / checkpoint.LOCK_NAME).exists()


def test_a_second_run_into_a_live_run_not_yet_checkpointed_is_told_it_is_in_use(tmp_path):
    out = tmp_path / "run"
    train(tiny_config(epochs=1), out, progress=False, stop_after=0)  # as a run before its first checkpoint
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / checkpoint.LOCK_NAME).write_text(json.dumps({"pid": holder.pid, "host": os.uname().nodename}))
        before = sorted(p.name for p in out.iterdir())
        with pytest.raises(ScalerError, match=f"in use by process {holder.pid}"):
            train(tiny_config(epochs=1), out, progress=False)
        assert sorted(p.name for p in out.iterdir()) == before
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(ScalerError, match="pass --resume to start it again"):  # a stale lock: as before
        train(tiny_config(epochs=1), out, progress=False)


def test_resume_is_refused_while_the_run_is_owned(tmp_path):
    out = tmp_path / "run"
    train(tiny_config(epochs=1), out, progress=False)
    with checkpoint.RunLock(out):
        with pytest.raises(ScalerError, match="in use by process"):
            resume(out, epochs=2, progress=False)
    resume(out, epochs=2, progress=False)
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 2


def test_stop_after_zero_leaves_a_resumable_run(tmp_path):
    out = tmp_path / "run"
    train(tiny_config(epochs=1), out, progress=False, stop_after=0)
    assert (out / "config.json").is_file() and not (out / "last.pt").exists()
    with pytest.raises(ScalerError, match="pass --resume to start it again"):
        train(tiny_config(epochs=1), out, progress=False)
    resume(out, progress=False)
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1


def test_interrupt_says_what_was_saved_and_how_to_continue(tmp_path, capsys, monkeypatch):
    import trainers.loop as loop

    real = loop.checkpoint.append_metrics

    def interrupt_after_epoch_1(out, record):
        real(out, record)
        if record["epoch"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop.checkpoint, "append_metrics", interrupt_after_epoch_1)
    out = tmp_path / "r"
    code, _, err = run(capsys, "train", *TINY_ARGS, "--epochs", "2", "--quiet", "--out", out)
    assert code == 130
    assert err.strip().splitlines()[-1] == (
        f"interrupted: stopped during epoch 2; last.pt holds epoch 1. Continue with: scaler train --resume --out {out}"
    )
    monkeypatch.undo()
    assert run(capsys, "train", "--resume", "--quiet", "--out", out)[0] == 0
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 2


def test_an_interrupt_mid_epoch_clears_the_progress_bar_first(tmp_path, capsys, monkeypatch):
    """The message stands on its own line (it was printed onto the epoch's bar)."""
    from trainers.step import Stepper

    real, calls = Stepper.step, []

    def interrupt_at_step_3(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Stepper, "step", interrupt_at_step_3)
    code, _, err = run(capsys, "train", *TINY_ARGS, "--epochs", "2", "--out", tmp_path / "r")
    assert code == 130 and "epoch 1/2" in err
    assert err.split("\r")[-1].startswith("interrupted: stopped during epoch 1; no epoch finished yet.")


BROKEN_FILES = {
    "syntax.py": ("def build_model(:\n", "syntax.py, line 1: syntax error"),
    "raises.py": (
        "def build_model(num_classes=10):\n    raise ValueError('bad width')\n",
        "build_model() in {path} failed, line 2: ValueError: bad width",
    ),
    "notmodule.py": ("def build_model(num_classes=10):\n    return 42\n", "returned int, not a torch nn.Module"),
    "typeerror.py": (
        "def build_model(num_classes=10):\n    return len(None)\n",
        "failed, line 2: TypeError",  # a bug inside the constructor is reported, not retried
    ),
    "nobuild.py": ("x = 1\n", "defines no build_model() function"),
}


@pytest.mark.parametrize("name", sorted(BROKEN_FILES))
def test_broken_model_files_are_one_line(tmp_path, capsys, name):
    source, message = BROKEN_FILES[name]
    path = tmp_path / name
    path.write_text(source)
    code, _, err = run(capsys, "train", path, "--dataset", "synthetic", "--out", tmp_path / "r")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert message.format(path=path) in err
    assert not (tmp_path / "r").exists()


MODEL_FILE = "import torch\ndef build_model(num_classes=10):\n    return torch.nn.Linear(3, num_classes)\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "foo"], "unknown dataset 'foo'"),
        (["--dataset", "cifar10"], "cifar10 needs --data-dir"),
        (["--dataset", "cifar10", "--data-dir", "/nonexistent"], "data directory /nonexistent does not exist"),
        (["--dataset", "cifar10", "--data-dir", "{tmp}"], "cifar10 not found"),
        (["--dataset", "cifar10.1", "--data-dir", "{tmp}"], "only a test split"),
        (["--dataset", "digits", "--val", "cifar10.1"], "CIFAR-10.1 validation applies to --dataset cifar10"),
        (["--dataset", "digits", "--val", "nope"], "unknown validation set"),
        (["{model}", "--dataset", "tinyimagenet", "--data-dir", "{tmp}"], "tinyimagenet"),
    ],
)
def test_refused_dataset_settings_create_no_run_directory(tmp_path, capsys, args, message):
    (tmp_path / "model.py").write_text(MODEL_FILE)
    arch = [] if "{model}" in args else ["--block", "basic", "--depths", "1,1,1", "--widths", "2,2,2"]
    args = [a.replace("{tmp}", str(tmp_path)).replace("{model}", str(tmp_path / "model.py")) for a in args]
    out = tmp_path / "runs" / "e3"
    code, _, err = run(capsys, "train", *arch, "--epochs", "1", *args, "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "runs").exists()


def test_data_refused_once_opened_removes_only_the_directories_this_run_created(tmp_path, capsys):
    from tests_support import write_cifar10

    write_cifar10(tmp_path / "data", corrupt="data_batch_3")
    args = ["train", *TINY_ARGS, "--dataset", "cifar10", "--data-dir", tmp_path / "data"]
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "other").write_text("keep me")
    code, _, err = run(capsys, *args, "--out", tmp_path / "runs" / "new" / "e3")
    assert code == 2 and "corrupt CIFAR file" in err
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["other"]  # runs/new and runs/new/e3 gone
    (tmp_path / "runs" / "empty").mkdir()
    code, _, err = run(capsys, *args, "--out", tmp_path / "runs" / "empty")
    assert code == 2 and "corrupt CIFAR file" in err
    assert (tmp_path / "runs" / "empty").is_dir()  # it was there before: kept
    assert (tmp_path / "runs" / "other").read_text() == "keep me"


def test_a_model_file_without_num_classes_is_called_without_it(tmp_path):
    from scaler.builder import load_model_file

    path = tmp_path / "fixed.py"
    path.write_text("import torch\ndef build_model():\n    return torch.nn.Linear(3, 7)\n")
    assert load_model_file(path, num_classes=100).out_features == 7


def test_out_on_a_read_only_filesystem_is_one_line(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    def read_only(self, *a, **k):
        raise OSError(30, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    code, _, err = run(capsys, "train", *TINY_ARGS, "--out", tmp_path / "run")
    assert code == 2 and err.strip() == f"error: {tmp_path / 'run'}: Read-only file system"


def test_out_naming_an_existing_file_is_refused(tmp_path, capsys):
    path = tmp_path / "taken"
    path.write_text("keep me")
    code, _, err = run(capsys, "train", *TINY_ARGS, "--out", path)
    assert code == 2 and "is a file, not a directory" in err and path.read_text() == "keep me"


def test_eval_of_an_unfinished_run_names_its_checkpoint_and_epoch(tmp_path, capsys):
    out = tmp_path / "r"
    train(tiny_config(epochs=4, eval_every=4), out, progress=False, stop_after=1)
    code, stdout, err = run(capsys, "eval", out, "--n", "8", "--attacks", "clean", "--dataset", "synthetic")
    assert code == 0
    assert f"evaluating {out / 'last.pt'}, epoch 1 of 4 (no best.pt yet" in err
    assert stdout.splitlines()[0].startswith(f"{out / 'last.pt'} (epoch 1, unfinished run;")


def test_an_interrupt_during_validation_names_the_epoch_last_pt_holds(tmp_path, capsys, monkeypatch):
    """Ctrl-C while epoch 2's validation attacks run: last.pt still holds epoch 1 (it said epoch 2)."""
    import trainers.evaluation as evaluation

    real = evaluation.adversarial

    def interrupt_validating_epoch_2(model, name, *args, **kwargs):
        if name == "pgd20" and checkpoint.last_epoch(out) == 1:
            raise KeyboardInterrupt
        return real(model, name, *args, **kwargs)

    monkeypatch.setattr(evaluation, "adversarial", interrupt_validating_epoch_2)
    out = tmp_path / "r"
    code, _, err = run(capsys, "train", *TINY_ARGS, "--epochs", "2", "--quiet", "--out", out)
    assert code == 130
    assert err.strip().splitlines()[-1].startswith("interrupted: stopped during epoch 2; last.pt holds epoch 1.")
    assert checkpoint.last_epoch(out) == 1


@pytest.mark.slow
def test_sigterm_stops_training_like_ctrl_c_and_releases_the_lock(tmp_path):
    """SLURM stops a job with SIGTERM: the same message as Ctrl-C, exit 130, no lock left behind."""
    import signal
    import time

    out = tmp_path / "r"
    args = [sys.executable, "-m", "scaler_cli", "train", *TINY_ARGS, "--epochs", "50", "--quiet", "--out", str(out)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "last.pt").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1].startswith("interrupted: stopped during epoch ")
    assert "Continue with: scaler train --resume" in err
    assert not (out / checkpoint.LOCK_NAME).exists()


def test_a_refused_resume_changes_nothing(tmp_path, capsys):
    """A truncated last.pt and --epochs 8: refused in one line, config.json not rewritten."""
    out = tmp_path / "r"
    train(tiny_config(epochs=1), out, progress=False)
    config = (out / "config.json").read_text()
    data = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(data[: len(data) // 2])
    code, _, err = run(capsys, "train", "--resume", "--epochs", "8", "--out", out)
    assert code == 2 and "cannot read checkpoint" in err and len(err.strip().splitlines()) == 1
    assert (out / "config.json").read_text() == config


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    """torch.save on a full disk raised a many-line RuntimeError; the previous last.pt is kept."""
    out = tmp_path / "r"
    train(tiny_config(epochs=1), out, progress=False)
    saved = (out / "last.pt").read_bytes()

    def full_disk(state, path):
        with open(path, "wb") as fh:
            fh.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: type("U", (), {"free": 0})())
    code, _, err = run(capsys, "train", "--resume", "--epochs", "2", "--quiet", "--out", out)
    assert code == 2
    assert err.strip() == f"error: cannot write {out / 'last.pt'}: No space left on device; the previous file is kept"
    assert (out / "last.pt").read_bytes() == saved
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tmp")) == []


def test_a_finished_run_whose_best_epoch_is_earlier_is_not_called_unfinished(tmp_path, capsys):
    out = tmp_path / "r"
    train(tiny_config(epochs=2, best_from=0.0), out, progress=False)
    best = torch.load(out / "best.pt", weights_only=True)
    best["epoch"] = 1  # adversarial training's usual case: the best epoch is not the last
    torch.save(best, out / "best.pt")
    code, out_text, err = run(capsys, "eval", out, "--attacks", "clean", "--n", "8", "--quiet")
    assert code == 0, err
    assert "(epoch 1;" in out_text and "unfinished" not in out_text
    last = torch.load(out / "last.pt", weights_only=True)
    last["epoch"] = 1  # a run stopped after epoch 1 of 2
    torch.save(last, out / "last.pt")
    code, out_text, err = run(capsys, "eval", out, "--attacks", "clean", "--n", "8", "--quiet")
    assert code == 0 and "unfinished run" in out_text


def test_an_interrupted_evaluation_prints_the_attacks_it_finished(tmp_path, capsys, monkeypatch):
    import trainers.evaluation as evaluation

    out = tmp_path / "r"
    train(tiny_config(epochs=1), out, progress=False)
    real = evaluation.adversarial

    def interrupt_in_pgd20(model, name, *args, **kwargs):
        if name == "pgd20":
            raise KeyboardInterrupt
        return real(model, name, *args, **kwargs)

    monkeypatch.setattr(evaluation, "adversarial", interrupt_in_pgd20)
    code, out_text, err = run(capsys, "eval", out, "--attacks", "clean,fgsm,pgd20,cw40", "--n", "8", "--quiet")
    assert code == 130
    rows = [line.split()[0] for line in out_text.splitlines()[3:] if line.strip()]  # header, title, rule
    assert rows[:2] == ["clean", "fgsm"] and "pgd20" not in rows and "cw40" not in rows
    assert err.strip() == "interrupted: stopped during pgd20; finished: clean, fgsm"


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--lr", "nan", "--lr must be a finite number > 0 (got nan)"),
        ("--lr", "inf", "--lr must be a finite number > 0 (got inf)"),
        ("--momentum", "2", "--momentum must be in [0, 1) (got 2.0)"),
        ("--momentum", "nan", "--momentum must be in [0, 1) (got nan)"),
        ("--beta", "-1", "--beta must be a finite number >= 0 (got -1.0)"),
        ("--beta", "nan", "--beta must be a finite number >= 0 (got nan)"),
        ("--weight-decay", "-1", "--weight-decay must be a finite number >= 0 (got -1.0)"),
        ("--grad-clip", "-1", "--grad-clip must be a finite number >= 0 (got -1.0)"),
        ("--label-smoothing", "2", "--label-smoothing must be in [0, 1) (got 2.0)"),
        ("--warmup-epochs", "-1", "--warmup-epochs must be a finite number >= 0 (got -1.0)"),
        ("--stop-after", "0", "--stop-after must be >= 1 (the epoch to end after)"),
    ],
)
def test_bad_numbers_are_refused_before_any_work(tmp_path, capsys, flag, value, message):
    out = tmp_path / "r"
    code, _, err = run(capsys, "train", *TINY_ARGS, flag, value, "--quiet", "--out", out)
    assert code == 2 and err.strip() == f"error: {message}"
    assert not out.exists()


def test_checkpoint_read_errors_end_on_a_whole_sentence_without_torchs_advice(tmp_path):
    """torch's messages were cut at 200 characters mid-sentence, and went on to suggest
    weights_only=False: one whole first sentence, no advice to unpickle untrusted files."""
    path = tmp_path / "t.pt"
    torch.save({"a": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(ScalerError) as info:
        checkpoint.restore(path)
    message = str(info.value)
    assert message.endswith("failed finding central directory"), message
    assert "weights_only" not in message and "If you" not in message


def test_resume_with_the_runs_own_command_continues_and_names_each_differing_flag(tmp_path, capsys):
    """A user re-runs the training command with --resume added: it continues (and --epochs may
    grow); a flag that differs from the saved run is refused with both values, changing nothing."""
    out = tmp_path / "r"
    assert run(capsys, "train", *TINY_ARGS, "--lr", "0.05", "--quiet", "--out", out)[0] == 0
    config = (out / "config.json").read_text()
    code, _, err = run(capsys, "train", *TINY_ARGS, "--lr", "0.5", "--batch-size", "32", "--resume", "--out", out)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--lr 0.05 vs 0.5" in err and "--batch-size 64 vs 32" in err
    code, _, err = run(capsys, "train", *TINY_ARGS, "--widths", "2,2,2", "--resume", "--out", out)
    assert code == 2 and "the architecture flags basic d1-1-1 w1-1-1 (activation=relu) vs basic d1-1-1 w2-2-2" in err
    code, _, err = run(capsys, "train", *TINY_ARGS, "--activation", "silu", "--resume", "--out", out)
    assert code == 2 and "(activation=relu) vs basic d1-1-1 w1-1-1 (activation=silu)" in err  # a knob, same shape
    assert (out / "config.json").read_text() == config
    code, _, err = run(
        capsys, "train", *TINY_ARGS, "--lr", "0.05", "--resume", "--epochs", "2", "--quiet", "--out", out
    )
    assert code == 0, err
    assert checkpoint.last_epoch(out) == 2


def test_trainers_modules_import_one_way():
    """No trainers module imports one that imports it (at the top or inside a function): one module
    owns a run directory, and interop/run_eval, run/war_calibration no longer import each other."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "trainers"
    graph = {}
    for path in root.rglob("*.py"):
        name = ".".join(("trainers", *path.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("trainers"):
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
        graph[name] = deps
    del graph["trainers"]  # the package's lazy API facade, which every module's `from trainers import` names
    modules = set(graph)
    graph = {k: {d for d in v if d in modules and d != k} for k, v in graph.items()}

    def reaches(start, goal, seen=()):
        return any(d == goal or (d not in seen and reaches(d, goal, (*seen, d))) for d in graph[start])

    cycles = sorted(f"{a} <-> {b}" for a in graph for b in graph[a] if reaches(b, a) and a < b)
    assert cycles == []


def test_one_rule_picks_a_runs_model_source_everywhere(tmp_path):
    """The checkpoint's own source wins over the directory's model.py (its weights were trained
    with it), for evaluation, fine-tuning's model and export alike."""
    from trainers.interop import export_run

    out = tmp_path / "r"
    train(tiny_config(epochs=1), out, progress=False)
    carried = torch.load(out / "last.pt", weights_only=True)["source"]
    (out / "model.py").write_text("this model.py was edited after training and no longer builds")
    model, _, _ = checkpoint.load_trained(out)
    assert sum(p.numel() for p in model.parameters()) > 0
    source, spec = checkpoint.run_model(out)
    assert source == carried and spec is not None
    assert export_run(out, tmp_path / "wrn.pt", to="robustbench")["tensors"] > 0


@pytest.mark.parametrize("name", ["basic_small_v0.py", "robust_small_v0.py"])
def test_runs_of_model_files_with_their_own_fused_code_still_train_resume_and_evaluate(tmp_path, capsys, name):
    """Run directories made before the runtime hold a model.py that carries its fused code behind a
    `fused` flag per block: they resume and evaluate as before, --no-fused runs their plain blocks."""
    from pathlib import Path

    legacy = Path(__file__).parent / "fixtures" / "legacy" / name
    out = tmp_path / "r"
    args = TINY_ARGS[TINY_ARGS.index("--dataset") :]  # the data and recipe flags, not the spec
    code, _, err = run(capsys, "train", legacy, *args, "--epochs", "2", "--stop-after", "1", "--quiet", "--out", out)
    assert code == 0, err
    assert "class PreactBlock" in (out / "model.py").read_text() or "forward_plain" in (out / "model.py").read_text()
    assert run(capsys, "train", "--resume", "--quiet", "--out", out)[0] == 0
    assert checkpoint.last_epoch(out) == 2
    outputs = {}
    for flag in ("--fused", "--no-fused"):
        code, text, err = run(capsys, "eval", out, "--attacks", "clean,fgsm", "--n", "16", "--quiet", "--json", flag)
        assert code == 0, err
        outputs[flag] = json.loads(text)
    for attack in ("clean", "fgsm"):
        assert outputs["--fused"][attack]["accuracy"] == outputs["--no-fused"][attack]["accuracy"]
