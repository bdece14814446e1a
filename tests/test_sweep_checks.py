"""`scaler sweep` and `search --live` refuse dataset settings a trial could not load the way
`scaler train` does (one line, exit 2), before the study directory exists or Ray starts."""

from __future__ import annotations

import pytest

import studies.sweep
from scaler_cli.app import main

SPACE = "block: basic\ndepths: [1, 1, 1]\nwidths: [[1, 2], 1, 1]\n"
QUICK = ["--epochs", "1", "--attack-steps", "1", "--val-n", "32", "--test-n", "64", "--quiet"]


@pytest.fixture
def no_ray(monkeypatch):
    def started(self):
        raise AssertionError("Ray was started before the dataset settings were checked")

    monkeypatch.setattr(studies.sweep._ray_session, "__enter__", started)


@pytest.mark.parametrize("command", [["sweep"], ["search", "--live"]])
@pytest.mark.parametrize(
    "data, message",
    [
        (["--dataset", "cifar10"], "error: cifar10 needs --data-dir: a directory holding cifar-10-batches-py/"),
        (["--dataset", "cifar10", "--data-dir", "{tmp}/missing"], "error: data directory {tmp}/missing does not exist"),
        (["--dataset", "cifar100", "--data-dir", "{tmp}"], "error: cifar100 not found: expected"),
        (["--dataset", "imagenet"], "error: unknown dataset 'imagenet'; choose one of cifar10, cifar100"),
        (["--dataset", "tinyimagenet"], "error: tinyimagenet needs --data-dir"),
        (["--dataset", "digits", "--val", "cifar10.1"], "error: CIFAR-10.1 validation applies to --dataset cifar10"),
        (["--dataset", "digits", "--val", "test"], "error: unknown validation set 'test'"),
    ],
)
def test_dataset_settings_are_refused_in_one_line_before_anything_is_written(
    no_ray, tmp_path, capsys, command, data, message
):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    study = tmp_path / "study"
    data = [a.replace("{tmp}", str(tmp_path)) for a in data]
    assert main([*command, str(space), "--out", str(study), *data, *QUICK]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message.replace("{tmp}", str(tmp_path))) and err.count("\n") == 1, err
    assert not study.exists()


def test_a_refused_rerun_leaves_an_existing_study_as_it_was(no_ray, tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    study = tmp_path / "study"
    study.mkdir()
    (study / "note").write_text("kept")
    assert main(["sweep", str(space), "--out", str(study), "--dataset", "cifar10", *QUICK]) == 2
    assert "needs --data-dir" in capsys.readouterr().err
    assert [p.name for p in study.iterdir()] == ["note"]


def test_on_a_cluster_only_what_holds_on_every_node_is_checked(tmp_path, monkeypatch):
    """The trials read --data-dir on their nodes: a path missing here is not refused with --address."""
    from studies.sweep import SweepOptions, preflight
    from trainers.config import make_config

    monkeypatch.setattr(studies.sweep, "check_reachable", lambda address: None)
    cluster = SweepOptions(address="head:6379")
    here = make_config("bat", {"model": "bench", "dataset": "cifar10", "data_dir": str(tmp_path / "on-the-nodes")})
    preflight(here, cluster)
    with pytest.raises(studies.sweep.ScalerError, match="does not exist"):
        preflight(here, SweepOptions())
    for settings, message in (({"data_dir": None}, "needs --data-dir"), ({"dataset": "imagenet"}, "unknown dataset")):
        with pytest.raises(studies.sweep.ScalerError, match=message):
            preflight(make_config("bat", {"model": "bench", "dataset": "cifar10", **settings}), cluster)


@pytest.mark.parametrize("command", [["sweep"], ["search", "--live"]])
@pytest.mark.parametrize(
    "resources, message",
    [
        (["--gpus-per-trial", "nan"], "error: --gpus-per-trial must be a number >= 0"),
        (["--gpus-per-trial", "-1"], "error: --gpus-per-trial must be a number >= 0"),
        (["--gpus-per-trial", "0.00001"], "error: --gpus-per-trial takes a fraction of a GPU from 0.0001 to 1"),
        (["--gpus-per-trial", "1.5"], "error: --gpus-per-trial takes a fraction of a GPU from 0.0001 to 1"),
        (["--cpus-per-trial", "nan"], "error: --cpus-per-trial must be a number >= 0.0001"),
        (["--cpus-per-trial", "inf"], "error: --cpus-per-trial must be a number >= 0.0001"),
        (["--cpus-per-trial", "0.00001"], "error: --cpus-per-trial must be a number >= 0.0001"),
    ],
)
def test_trial_resources_ray_cannot_take_are_refused_before_it_starts(
    no_ray, tmp_path, capsys, command, resources, message
):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    study = tmp_path / "study"
    assert main([*command, str(space), "--out", str(study), "--dataset", "digits", *resources, *QUICK]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert not study.exists()
