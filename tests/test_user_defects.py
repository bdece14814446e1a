"""Defects a new user hit (issue 27), each checked through what the user sees: outputs, exit
codes, files. Every error is one line on stderr with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

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


# --------------------------------------------------------------------------- 1. count MODEL_FILE
def test_count_takes_an_emitted_model_file_and_counts_it_from_its_spec(capsys, tmp_path):
    path = tmp_path / "a1.py"
    assert run(capsys, "emit", "robustresnet-a1", "-o", path)[0] == 0
    code, out, err = run(capsys, "count", path)
    assert code == 0 and not err
    assert "params     19,222,738" in out and "FLOPs      5,122,058,496" in out
    assert f"from the spec {path} records" in out
    code, out, _ = run(capsys, "count", path, "--json", "--classes", "100")
    data = json.loads(out)
    want = scaler.count(scaler.get_spec("robustresnet-a1", num_classes=100))
    assert code == 0 and (data["params"], data["flops"], data["num_classes"]) == (want.params, want.flops, 100)
    code, _, err = run(capsys, "count", path, "--norm", "group")
    assert "--norm changes a spec, not a model file" in one_line_error(code, err)
    code, _, err = run(capsys, "count", tmp_path / "missing.py")
    assert "model file" in one_line_error(code, err) and "not found" in err


def test_count_builds_a_users_own_model_file_and_says_how_it_counted(capsys, tmp_path):
    path = tmp_path / "mine.py"
    path.write_text(USER_MODEL)
    code, out, err = run(capsys, "count", path, "--json")
    data = json.loads(out)
    # conv 3*8*9 + 8, linear 8*10 + 10; FLOPs: conv 8*27*32*32, pool 8*32*32, linear 8*10
    assert code == 0 and data["params"] == 314 and data["flops"] == 221_184 + 8_192 + 80
    assert "numel" in data["counted"] and "fvcore" in data["counted"]
    code, out, _ = run(capsys, "count", path, "--resolution", "64")
    assert code == 0 and "FLOPs      917,584" in out and "numel" in out and "fvcore" in out


def test_count_builds_an_emitted_file_edited_since(capsys, tmp_path):
    path = tmp_path / "tiny.py"
    assert run(capsys, "emit", *TINY, "-o", path)[0] == 0
    source = path.read_text()
    assert "nn.Linear(" in source
    # a user widens nothing but drops the head's bias: the recorded spec no longer describes the code
    path.write_text(
        source.replace("self.fc = nn.Linear(64, num_classes)", "self.fc = nn.Linear(64, num_classes, bias=False)")
    )
    code, out, _ = run(capsys, "count", path, "--json")
    spec_count = scaler.count(scaler.get_spec({"block": "basic", "depths": [1, 1, 1], "planes": [16, 32, 64]}))
    data = json.loads(out)
    assert code == 0 and data["params"] == spec_count.params - 10 and "differs" in data["counted"]


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


# --------------------------------------------------------------------------- 3. import's run directory mode
def test_import_makes_run_directories_with_the_umask_mode_as_train_does(capsys, tmp_path):
    import os

    import torch

    from scaler.builder import build_model

    torch.manual_seed(0)
    ckpt = tmp_path / "ours.pt"
    torch.save(build_model(scaler.ArchSpec("basic", (1, 1, 1), (16, 32, 64))).state_dict(), ckpt)
    old = os.umask(0o022)
    try:
        code, _, err = run(capsys, "import", ckpt, *TINY, "-o", tmp_path / "run", "--dataset", "digits")
        assert code == 0, err
        code, _, err = run(capsys, "import", ckpt, *TINY, "-o", tmp_path / "run", "--dataset", "digits", "--force")
        assert code == 0, err
    finally:
        os.umask(old)
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours.pt", "run"]  # no temporary left behind


# --------------------------------------------------------------------------- 4. synthetic data says so
@pytest.fixture(scope="module")
def synthetic_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("synthetic") / "synth.jsonl"
    assert main(["synthetic", str(path), "--limit", "60", "--epochs", "10"]) == 0
    return path


@pytest.mark.parametrize("kind", ["analyze", "pareto", "curves", "rd", "stages"])
def test_analyze_and_plot_say_the_data_is_synthetic(capsys, tmp_path, synthetic_file, kind):
    capsys.readouterr()
    args = (
        ["analyze", synthetic_file] if kind == "analyze" else ["plot", kind, synthetic_file, "-o", tmp_path / "f.png"]
    )
    code, out, err = run(capsys, *args)
    assert code == 0 and err.count("\n") == 1 and "SYNTHETIC" in err and "not measured" in out + err
    if kind == "analyze":
        assert "SYNTHETIC" in out.splitlines()[0]  # a saved report says it too


def test_measured_data_gets_no_synthetic_note(capsys, tmp_path):
    from nares_files import write_grid

    code, out, err = run(capsys, "analyze", write_grid(tmp_path / "measured.jsonl"))
    assert code == 0 and not err and "SYNTHETIC" not in out


@pytest.mark.parametrize("kind", ["pareto", "curves", "rd", "stages"])
def test_synthetic_figures_carry_the_note_and_measured_ones_do_not(synthetic_file, tmp_path, kind):
    from nares_files import write_grid

    from studies import plots
    from studies.benchmark import load

    def texts(fig) -> str:
        found = [t.get_text() for t in fig.texts] + [fig._suptitle.get_text() if fig._suptitle else ""]
        plots.save(fig, tmp_path / f"{kind}.png", force=True)
        return " ".join(found)

    draw = {"pareto": plots.pareto, "curves": plots.curves, "rd": plots.rd, "stages": plots.stages}[kind]
    assert "SYNTHETIC" in texts(draw(load(synthetic_file)))
    assert "SYNTHETIC" not in texts(draw(load(write_grid(tmp_path / "measured.jsonl"))))


# --------------------------------------------------------------------------- 5. measured rule: validation by default
def test_the_measured_rule_picks_by_validation_and_flags_a_test_metric(capsys, tmp_path):
    from nares_files import record

    a = {"D1": 4, "W1": 8, "D2": 4, "W2": 8, "D3": 4, "W3": 8}
    b = {**a, "D1": 5}
    path = tmp_path / "two.jsonl"  # a: better on the test set, b: better on validation
    path.write_text(json.dumps(record(a, 40.0, test=50.0)) + "\n" + json.dumps(record(b, 45.0, test=45.0)) + "\n")
    args = ["solve", "--flops", "10G", "--rule", "measured", "--results", path, "--json"]
    code, out, err = run(capsys, *args)
    data = json.loads(out)
    assert code == 0 and not err
    assert data["metric"] == "val_pgd_acc" and data["best_measured"]["arch"] == b
    assert data["best_measured"]["test"]["test_pgd_acc"] == 45.0  # reported, not used to choose
    code, out, err = run(capsys, *args, "--metric", "test_pgd_acc")
    assert code == 0 and json.loads(out)["best_measured"]["arch"] == a
    assert err.count("\n") == 1 and "test metric" in err and "peeks at the test set" in err
    code, _, err = run(capsys, *args, "--metric", "val_pgd_lip")
    assert "lower-is-better" in one_line_error(code, err)


# --------------------------------------------------------------------------- 6. results table, changed settings
SPACE_YAML = "block: basic\ndepths: [[1], [1], [1, 2]]\nwidths: [[1, 2], [1], [1]]\n"


def _study(path: Path) -> Path:
    """A study of two trials as a sweep leaves it: one complete (tested clean, fgsm, pgd20, cw40), one failed."""
    from studies.store import Store

    with Store.create(path) as store:
        store.bind({"space": "toy", "train": {"seed": 0}, "test": {"attacks": ["clean", "fgsm", "pgd20", "cw40"]}})
        for arch_id, planes in ((1, [16, 32, 64]), (2, [32, 32, 64])):
            spec = scaler.get_spec({"block": "basic", "depths": [1, 1, 1], "planes": planes}).to_dict()
            cost = scaler.count(spec)
            store.add(arch_id, spec, cost.params, cost.flops)
        history = [
            {"epoch": e, "train_loss": 1.0, "val_clean": 50.0, "val_pgd20": 20.0 + e, "val_cw40": 19.0}
            for e in (1, 2, 3)
        ]
        test = {
            a: {"accuracy": acc, "stable": 70.0, "lip": 4.0, "loss": 2.0, "n": 64}
            for a, acc in (("clean", 61.0), ("fgsm", 36.5), ("pgd20", 31.0), ("cw40", 30.0))
        }
        store.record_attempt(1, 60.0, 0, 1)
        store.complete(
            1,
            {
                "device": "cpu",
                "host": "h",
                "finished": "2026-01-01T00:00:00",
                "best_epoch": 3,
                "history": history,
                "test": test,
            },
        )
        store.record_attempt(2, 6.0, 0, 1)
        store.fail(2, "training diverged at epoch 2 (loss nan)")
    return path


def test_results_shows_whole_best_epochs_and_every_attack_tested(capsys, tmp_path):
    study = _study(tmp_path / "study")
    code, out, err = run(capsys, "results", study)
    header, _, complete, failed = out.splitlines()[:4]
    assert code == 0 and not err
    assert "best ep" in header and "test fgsm" in header and "test aa" not in header  # aa was not tested
    cells = dict(
        zip(
            header.replace("best ep", "best_ep").replace("test ", "test_").replace("val ", "val_").split(),
            complete.split(),
        )
    )
    assert cells["best_ep"] == "3" and cells["test_fgsm"] == "36.50"
    assert failed.split()[1] == "failed"
    code, out, _ = run(capsys, "results", study, "--json")
    rows = json.loads(out)
    assert [type(r["best_epoch"]) for r in rows] == [int, type(None)] and rows[0]["test_fgsm"] == 36.5
    code, _, _ = run(capsys, "results", study, "--export", tmp_path / "s.csv")
    assert code == 0 and ",3,3," in (tmp_path / "s.csv").read_text().splitlines()[1]  # best_epoch,epochs


def test_a_changed_sweep_setting_is_named_by_its_flag(capsys, tmp_path):
    from scaler_cli.options import TRAIN_OPTIONS, recipe_config
    from studies.spaces import load_space
    from studies.store import Store
    from studies.sweep import SweepOptions, json_config, study_settings

    space = tmp_path / "space.yaml"
    space.write_text(SPACE_YAML)
    study = tmp_path / "study"
    cfg = recipe_config({o.name: None for o in TRAIN_OPTIONS} | {"dataset": "digits", "epochs": 1}, None)
    with Store.create(study) as store:  # a study swept before with --test-n 32
        store.bind(study_settings(load_space(str(space)), json_config(cfg), SweepOptions(test_n=32)))
    args = ["sweep", space, "--dataset", "digits", "--out", study, "--quiet"]
    code, _, err = run(capsys, *args, "--epochs", "1", "--test-n", "64")
    assert "(--test-n: 32 then, 64 now)" in one_line_error(code, err)
    code, _, err = run(capsys, *args, "--epochs", "2", "--test-n", "32", "--batch-size", "64")
    assert "--batch-size: 128 then, 64 now; --epochs: 1 then, 2 now" in one_line_error(code, err)


# --------------------------------------------------------------------------- 9. no WAL on network filesystems
def _mounts(tmp_path: Path, shared: Path, fs: str) -> Path:
    mounts = tmp_path / "mounts"
    escaped = str(shared).replace(" ", "\\040")
    mounts.write_text(f"/dev/vda / ext4 rw,relatime 0 0\nserver:/export {escaped} {fs} rw,relatime 0 0\n")
    return mounts


@pytest.mark.parametrize("fs", ["nfs4", "lustre", "gpfs", "cifs", "fuse.sshfs"])
def test_a_study_on_a_network_filesystem_keeps_a_rollback_journal(capsys, tmp_path, monkeypatch, fs):
    from studies import store

    shared = tmp_path / "shared dir"  # a mount point with a space, as /proc/mounts escapes it
    shared.mkdir()
    monkeypatch.setattr(store, "MOUNTS", _mounts(tmp_path, shared, fs), raising=False)
    study = _study(shared / "study")
    with store.Store.create(study) as s:
        assert s.conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        s.fail(1, "again")
        assert sorted(p.name for p in study.iterdir()) == ["results.sqlite"]  # no -wal, no -shm
    code, out, _ = run(capsys, "results", study)
    assert code == 0 and "failed" in out
    local = _study(tmp_path / "local")  # a local disk keeps WAL (readers while the sweep writes)
    with store.Store.create(local) as s:
        assert s.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# --------------------------------------------------------------------------- 7. plots: progress, best epoch, small studies
@pytest.mark.slow
def test_plot_lipschitz_on_a_run_shows_progress_unless_quiet(capsys, tmp_path):
    import torch

    from scaler.builder import build_model

    torch.manual_seed(0)
    ckpt = tmp_path / "ours.pt"
    torch.save(build_model(scaler.ArchSpec("basic", (1, 1, 1), (16, 32, 64))).state_dict(), ckpt)
    assert run(capsys, "import", ckpt, *TINY, "-o", tmp_path / "run", "--dataset", "digits")[0] == 0
    args = ["plot", "lipschitz", tmp_path / "run", "--n", "8", "-o", tmp_path / "lip.png"]
    code, _, err = run(capsys, *args)
    assert code == 0 and "evaluating" in err and "pgd20: " in err and "batch" in err  # the bar, on stderr
    code, out, err = run(capsys, *args, "--force", "--quiet")
    assert code == 0 and not err and out.startswith("wrote")


def _run_dir(path: Path, pgd: list[float], best_metric: str = "pgd20") -> Path:
    path.mkdir()
    rows = [
        {"epoch": e, "train_loss": 2.0 / e, "val_clean": 50.0 + e, "val_pgd20": p, "val_cw40": p - 1}
        for e, p in enumerate(pgd, 1)
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"epochs": len(pgd), "best_from": 0.5, "best_metric": best_metric}
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    "pgd, best",
    [([10.0, 30.0, 25.0, 20.0, 18.0, 17.0], 3), ([40.0, 10.0, 12.0, 11.0], 3), ([5.0, 6.0, 7.0, 8.0, 9.0], 5)],
)
def test_plot_curves_of_a_run_draws_the_best_epoch_it_promises(capsys, tmp_path, pgd, best):
    from studies import plots

    fig = plots.curves(_run_dir(tmp_path / "run", pgd))
    ax_acc = fig.axes[1]
    vertical = [line.get_xdata()[0] for line in ax_acc.lines if len(set(line.get_xdata())) == 1]
    assert vertical == [best]  # epoch 1 of [40, 10, ...] is before best_from: the trainer skips it too
    assert f"best epoch, {best}" in ax_acc.get_title()
    assert all(float(t).is_integer() for t in ax_acc.get_xticks())  # epochs, not 1.5
    plots.save(fig, tmp_path / "c.png")
    code, out, _ = run(capsys, "plot", "curves", tmp_path / "run", "-o", tmp_path / "c2.png")
    assert code == 0 and (tmp_path / "c2.png").stat().st_size > 0


def _four_archs(path: Path) -> Path:
    from nares_files import record

    lines = []
    for i, (d3, w1, macs, params) in enumerate(
        ((1, 1, 12.65e6, 77_850), (1, 2, 23.99e6, 92_762), (2, 1, 17.39e6, 151_834), (2, 2, 28.73e6, 166_746)), 1
    ):
        arch = {"D1": 1, "W1": w1, "D2": 1, "W2": 1, "D3": d3, "W3": 1}
        lines.append(
            json.dumps({**record(arch, 20.0 + i, test=31.0 + i - (i == 2) * 2, macs=macs, params=params), "arch_id": i})
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def test_plot_pareto_of_a_small_study_is_readable(capsys, tmp_path):
    from studies import plots
    from studies.benchmark import load

    fig = plots.pareto(load(_four_archs(tmp_path / "four.jsonl")))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        labels = [t for t in ax.get_xticklabels() if t.get_text() and t.get_visible()]
        lo, hi = ax.get_xlim()
        assert len(labels) >= 2 and all(lo <= t.get_position()[0] <= hi for t in labels)
        boxes = sorted((t.get_window_extent(renderer) for t in labels), key=lambda b: b.x0)
        assert all(a.x1 + 2 < b.x0 for a, b in zip(boxes, boxes[1:])), [t.get_text() for t in labels]
        points = ax.collections[0]  # every architecture, under the front
        assert min(points.get_sizes()) >= 20 and (points.get_alpha() or 1.0) >= 0.9
        assert "dotted" not in ax.get_title()  # no budget falls in a 13-29M FLOPs study: no dotted lines
    named = [t.get_text() for t in fig.legends[0].get_texts()]
    assert named == ["all 4 architectures", "Pareto front", "best"]  # nothing the figure does not draw
    assert "(M, multiply-adds)" in fig.axes[0].get_xlabel() and "(K)" in fig.axes[1].get_xlabel()
    plots.save(fig, tmp_path / "p.png")


def test_log_ticks_are_few_and_inside_the_range():
    from studies.plots import log_ticks

    for lo, hi in ((12.1, 29.9), (3.3, 9.3), (23.0, 270.0), (0.5, 5000.0), (99.0, 101.0)):
        ticks = log_ticks(lo, hi)
        assert 2 <= len(ticks) <= 7 and all(lo <= t <= hi for t in ticks), (lo, hi, ticks)
