"""Every command in the README runs as written, from an empty directory, as a new user would.

The README's bash blocks are parsed (continuation lines joined, comments dropped), and its YAML
blocks whose first line names a file (`# space.yaml`) are written to that file. Quick commands (the
compiler's, `scaler space`, `python -c`) run in the quick suite exactly as written; training,
evaluation, study and search commands run in the slow suite in order, with only their sizes
shrunk (fewer epochs, points, steps, queries and runs; a tiny model in place of a 19M-parameter
one) and `~/data` holding a small CIFAR-10 folder in the standard layout. A line commented
`# refused...` must fail with one line. Set-up and test lines (make, pip, pytest) are what CI
itself runs, `torchrun` is covered by the DDP test, and blocks that start `# needs:` (a user's
checkpoints, a cluster) or `#!` (a script to save) say in the README why they cannot run here.
"""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests_support import write_cifar10, write_tiny_imagenet

ROOT = Path(__file__).resolve().parents[1]
SETUP = {"make", "pip", "torchrun"}
QUICK = {"zoo", "count", "solve", "compare", "emit", "space", "--help", "-h", "--version"}
SMALLER = [  # (pattern, replacement) applied to slow commands only
    (r"--epochs (\d+)", lambda m: f"--epochs {min(int(m[1]), 2)}"),
    (r"--eval-every \d+", "--eval-every 1"),
    (r"--n \d+", "--n 4"),
    (r"--steps \d+", "--steps 1"),
    (r"--batch-size \d+", "--batch-size 16"),
    (r"--attack-steps \d+", "--attack-steps 1"),
    (r"--runs \d+", "--runs 1"),
    (r"--queries \d+", "--queries 40"),
    (r"(--live .*)--queries \d+", r"\1--queries 3"),  # after the line above: live queries train
    (r"(--live .*)--epochs \d+", r"\1--epochs 1 --attack-steps 1 --val-n 32 --test-n 64"),  # as the sweep's
    (r"\brobustresnet-a1\b", "--block robust --depths 1,1,1 --widths 1,1,1"),
    (r"--recipe bat", "--recipe bat --epochs 2 --stop-after 1 --batch-size 16 --attack-steps 1 --val-n 8"),
]


def readme_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def readme_commands() -> list[str]:
    """Runnable command lines; a line commented `# refused...` is kept with a `!` in front."""
    commands = []
    for block in readme_blocks("bash"):
        if block.startswith(("# needs:", "#!")):
            continue
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] not in SETUP and words[:3] != ["python", "-m", "pytest"]:
                refused = re.search(r"#\s*refused", line) is not None
                commands.append(("!" if refused else "") + shlex.join(words))
    return commands


def write_readme_files(work: Path) -> None:
    for block in readme_blocks("yaml"):
        first = block.splitlines()[0]
        if re.fullmatch(r"# [\w.-]+\.ya?ml", first):
            (work / first[2:]).write_text(block)


def is_quick(command: str) -> bool:
    words = shlex.split(command.lstrip("!"))
    if "--results" in words:  # the measured rule reads a benchmark written by the slow commands
        return False
    return words[0] == "python" or (words[0] == "scaler" and words[1] in QUICK)


def as_run(command: str) -> str:
    """The command with `scaler`/`python` bound to this interpreter (no PATH or venv assumptions)."""
    words = shlex.split(command.lstrip("!"))
    head = [sys.executable, "-m", "scaler_cli"] if words[0] == "scaler" else [sys.executable]
    return shlex.join(head + words[1:])


def run_all(commands: list[str], cwd: Path, env=None) -> None:
    write_readme_files(cwd)
    for command in commands:
        line = as_run(command)
        if env is not None:  # shlex.join quotes `~`: expand it to this run's HOME
            line = re.sub(r"'~/", "'" + env["HOME"] + "/", line)
        done = subprocess.run(line, shell=True, cwd=cwd, capture_output=True, text=True, env=env)
        assert "Traceback" not in done.stderr, f"{command}\n{done.stderr[-2000:]}"
        if command.startswith("!"):
            assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, f"{command}\n{done.stderr}"
        else:
            assert done.returncode == 0, f"{command}\n{done.stderr[-2000:]}"


def test_the_readme_has_commands_of_both_kinds():
    commands = readme_commands()
    assert any(is_quick(c) for c in commands) and any(not is_quick(c) for c in commands)
    assert "scaler solve --flops 10G --emit models/a2ish.py --parents" in commands


def test_quick_readme_commands_run_as_written(tmp_path):
    run_all([c for c in readme_commands() if is_quick(c)], tmp_path)


@pytest.mark.slow
def test_training_readme_commands_run_with_small_settings(tmp_path):
    import os

    home = tmp_path / "home"
    write_cifar10(home / "data", n=16)
    write_tiny_imagenet(home / "data")
    work = tmp_path / "work"
    work.mkdir()
    commands = []  # all of them, in order: later commands use what earlier ones wrote
    for command in readme_commands():
        if not is_quick(command):
            for pattern, small in SMALLER:
                command = re.sub(pattern, small, command)
        commands.append(command)
    run_all(commands, work, env={**os.environ, "HOME": str(home)})
    assert (work / "runs" / "a1" / "last.pt").is_file()


@pytest.mark.slow
def test_the_python_api_example_runs_as_written(tmp_path):
    """The README's first python block (its API tour), as written, in an empty directory."""
    api = readme_blocks("python")[0]
    assert "trainers.train(" in api
    done = subprocess.run([sys.executable, "-c", api], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "wrn_34_10.py").is_file() and (tmp_path / "runs" / "api" / "last.pt").is_file()
