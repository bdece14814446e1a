"""Studies without Ray: design spaces, the results store, NARes records and exports, the CLI's
`space` and `results` commands, and the package layering."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import scaler
from scaler.errors import ScalerError
from scaler_cli.app import main
from studies import records, spaces
from studies.results import export, load_records, select
from studies.store import SCHEMA_VERSION, Store

ROOT = Path(__file__).resolve().parent.parent
NARES_RECORD_KEYS = {"arch_id", "arch", "MACs", "Params", "train", "test_best"}
NARES_TRAIN_KEYS = {
    "seed",
    "gpu_type",
    "timestamp",
    "training_time",
    "best_epoch",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "pgd",
    "pgd_stable",
    "pgd_lip",
    "pgd_loss",
    "cw",
    "cw_stable",
    "cw_lip",
    "cw_loss",
}
NARES_TEST_KEYS = {
    "test_clean_acc",
    "test_loss",
    "Linf_fgsm_acc",
    "Linf_fgsm_stable",
    "Linf_pgd_acc",
    "Linf_pgd_stable",
    "Linf_pgd_lip",
    "Linf_cw_acc",
    "Linf_cw_stable",
    "Linf_cw_lip",
    "Linf_aa_acc",
    "corruptions",
}


def write(tmp_path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- spaces
def test_nares_space_has_15625_wrns_numbered_by_macs_with_the_presets_in_it():
    t0 = time.perf_counter()
    space = spaces.load_space("nares")
    elapsed = time.perf_counter() - t0
    assert len(space) == 15_625 and [a.arch_id for a in space.archs] == list(range(1, 15_626))
    keys = [(a.flops, a.params, a.spec.depths + a.spec.planes) for a in space.archs]
    assert [k[:2] for k in keys] == sorted(k[:2] for k in keys)  # ascending MACs, then params
    assert len({a.spec for a in space.archs}) == 15_625
    for name in ("wrn-34-10", "wrn-70-16"):
        spec = scaler.get_spec(name)
        cost = scaler.count(spec)
        (match,) = [a for a in space.archs if (a.spec.depths, a.spec.planes) == (spec.depths, spec.planes)]
        assert (match.params, match.flops) == (cost.params, cost.flops)
    assert space.archs[-1].spec.depths == (11, 11, 11) and space.archs[-1].params == 266_796_506  # WRN-70-16
    assert elapsed < 2.0, f"building nares took {elapsed:.2f}s"


def test_every_arch_costs_what_scaler_count_says():
    for name in ("rrn-depth", "rrn-width"):
        space = spaces.load_space(name)
        for a in space.archs[:: max(1, len(space) // 40)]:
            cost = scaler.count(a.spec)
            assert (a.params, a.flops) == (cost.params, cost.flops)
    assert len(spaces.load_space("rrn-depth")) == 343 and len(spaces.load_space("rrn-width")) == 512


def test_rd_space_solves_one_network_per_depth_share_at_the_budget():
    space = spaces.load_space("rd-10G")
    r_ds = [a.tags["r_d"] for a in space.archs]
    assert r_ds == sorted(r_ds) and r_ds[0] < 0.35 and r_ds[-1] > 0.9
    assert len({(a.spec.depths, a.spec.planes) for a in space.archs}) == len(space) >= 10
    assert all(abs(a.flops / 10e9 - 1) < 0.05 for a in space.archs)
    assert spaces.load_space("rd-5G-robust").archs[0].spec.block == "robust"


def test_yaml_space_expands_per_stage_choices_and_constraints(tmp_path):
    path = write(
        tmp_path,
        "block: basic\nactivation: [relu, silu]\ndepths: [[1, 2], 1, 1]\nwidths: [1, 1, [1, 2]]\n"
        "constraints: {flops: [null, 22M], params: [null, 1M]}\n",
    )
    space = spaces.load_space(str(path))
    # 2 activations x 2 depths x 2 widths = 8; the FLOPs cap keeps the 6 below 22M
    assert len(space) == 6
    assert {a.spec.activation for a in space.archs} == {"relu", "silu"}
    assert all(a.flops <= 22e6 for a in space.archs)
    ties = [a for a in space.archs if a.spec.depths == (1, 1, 1) and a.spec.widths == (1, 1, 1)]
    assert [a.spec.activation for a in ties] == ["relu", "silu"]  # documented tie-break
    assert spaces.load_space(str(path)).fingerprint() == space.fingerprint()


@pytest.mark.parametrize(
    "text, message",
    [
        ("depth: [1, 1, 1]\nwidths: [1, 1, 1]\n", "unknown key(s) depth"),
        ("depths: [[1, 2], [], 1]\nwidths: [1, 1, 1]\n", "depths stage 2 has an empty choice list"),
        ("depths: 1\nwidths: 1\nactivation: []\n", "activation has an empty choice list"),
        ("depths: 1\nwidths: 1\nconstraints: {flops: [null, 1K]}\n", "the constraints leave none of the 1"),
        ("depths: 1\nwidths: 1\nconstraints: {macs: [null, 1K]}\n", "unknown constraint(s) macs"),
        ("depths: 1\nwidths: [0.3, 1, 1]\n", "gives 4.8 channels"),
        ("depths: [1, 1]\nwidths: 1\n", "one entry per stage"),
        ("depths: [[1, 2], 1\n", "not valid YAML"),
        ("widths: 1\n", "give depths and widths"),
    ],
)
def test_bad_space_files_give_one_line_before_anything_starts(tmp_path, capsys, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ScalerError, match=None) as exc:
        spaces.load_space(str(path))
    assert message in str(exc.value) and "\n" not in str(exc.value)
    study = tmp_path / "study"
    assert main(["sweep", str(path), "--out", str(study), "--dataset", "digits", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not study.exists()  # refused before anything was written


def test_sample_is_seeded_and_keeps_ids():
    space = spaces.load_space("nares")
    a, b = space.sample(5, seed=3), space.sample(5, seed=3)
    assert [x.arch_id for x in a.archs] == [x.arch_id for x in b.archs]
    assert [x.arch_id for x in a.archs] != [x.arch_id for x in space.sample(5, seed=4).archs]
    assert all(space.by_id(x.arch_id) == x for x in a.archs)
    with pytest.raises(ScalerError, match="exceeds"):
        space.sample(20_000)


def test_space_cli_lists_json_without_torch_or_ray():
    code = (
        "import sys, json, io, contextlib; from scaler_cli.app import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf): rc = main(['space', 'nares', '--json'])\n"
        "d = json.loads(buf.getvalue())\n"
        "print(rc, d['count'], len(d['archs']), 'torch' in sys.modules, 'ray' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.stdout.split() == ["0", "15625", "15625", "False", "False"], out.stderr


def test_space_cli_table_and_sample(capsys):
    assert main(["space", "rrn-width", "--sample", "3", "--seed", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("rrn-width: 3 architectures (sampled from 512, seed 1)")
    assert len(out) == 2 + 3 + 1


# --------------------------------------------------------------------------- records
def _history(epochs: int) -> list[dict]:
    rows = []
    for e in range(1, epochs + 1):
        rows.append(
            {
                "epoch": e,
                "train_loss": 2.0 / e,
                "train_acc": 10.0 * e,
                "val_clean": 50.0 + e,
                "val_pgd20": 20.0 + e,
                "val_cw40": 19.0 + e,
                "val_stable": 70.0,
                "val_lip": 3.0,
                "val_loss": 1.5,
                "val_pgd20_loss": 2.5,
                "val_cw40_loss": 2.4,
                "val_cw40_stable": 71.0,
                "val_cw40_lip": 2.0,
            }
        )
    del rows[0]["val_clean"]  # an epoch that did not validate leaves nulls
    return rows


TEST = {
    "clean": {"accuracy": 60.0, "stable": 100.0, "lip": 0.0, "loss": 1.1, "n": 64},
    "pgd20": {"accuracy": 30.0, "stable": 70.0, "lip": 4.0, "loss": 2.0, "n": 64},
    "aa-compact": {"accuracy": 28.0, "stable": 68.0, "lip": 4.5, "loss": 2.2, "n": 64},
    "warnings": [],
}


def test_to_nares_record_has_exactly_the_reference_keys():
    spec = scaler.get_spec("wrn-34-10").to_dict()
    rec = records.to_nares_record(
        arch_id=441,
        spec=spec,
        params=46_160_474,
        flops=6_660_000_000,
        history=_history(3),
        best_epoch=3,
        test=TEST,
        seed=0,
        device="NVIDIA H100",
        finished="2026-11-22T04:00:00+00:00",
        training_days=0.5,
    )
    assert set(rec) == NARES_RECORD_KEYS and rec["arch"] == {"D1": 5, "W1": 10, "D2": 5, "W2": 10, "D3": 5, "W3": 10}
    (train,) = rec["train"]
    (test,) = rec["test_best"]
    assert set(train) == NARES_TRAIN_KEYS and set(test) == NARES_TEST_KEYS
    assert train["best_epoch"] == 2 and train["pgd"][train["best_epoch"]] == 23.0  # 0-based index
    assert train["val_acc"] == [None, 52.0, 53.0] and train["timestamp"] == "2026-11-22"
    assert test["Linf_pgd_acc"] == 30.0 and test["Linf_aa_acc"] == 28.0 and test["Linf_cw_acc"] is None
    assert test["test_loss"] == 1.1 and rec["MACs"] == 6.66e9 and rec["Params"] == 46_160_474.0
    robust = records.nares_arch(scaler.get_spec("robustresnet-a1").to_dict())
    assert robust["block"] == "robust" and "activation" not in robust


# --------------------------------------------------------------------------- store and exports
def _filled_store(study: Path) -> None:
    with Store.create(study) as store:
        store.bind({"space": "toy", "train": {"seed": 0, "epochs": 3}})
        for arch_id, spec_name in ((1, "wrn-28-10"), (2, "wrn-34-10"), (3, "wrn-70-16")):
            spec = scaler.get_spec(spec_name).to_dict()
            cost = scaler.count(spec)
            store.add(arch_id, spec, cost.params, cost.flops)
        result = {
            "device": "cpu",
            "host": "h",
            "finished": "2026-11-22T04:00:00+00:00",
            "best_epoch": 3,
            "history": _history(3),
            "test": TEST,
        }
        for arch_id in (1, 2):
            store.record_attempt(arch_id, 7200.0, 1, 4)
            store.complete(
                arch_id, {**result, "test": {**TEST, "pgd20": {**TEST["pgd20"], "accuracy": 30.0 + arch_id}}}
            )
        store.record_attempt(3, 60.0, 1, 4)
        store.fail(3, "training diverged at epoch 2 (loss nan)")


def test_store_binds_settings_and_refuses_other_ones(tmp_path):
    _filled_store(tmp_path / "s")
    with Store.create(tmp_path / "s") as store:
        assert store.counts() == {"pending": 0, "complete": 2, "failed": 1}
        assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        store.bind({"space": "toy", "train": {"seed": 0, "epochs": 3}})  # the same: fine
        with pytest.raises(ScalerError, match="epochs: 3 then, 4 now"):
            store.bind({"space": "toy", "train": {"seed": 0, "epochs": 4}})
        with pytest.raises(ScalerError, match="architecture 1 was another network"):
            store.add(1, scaler.get_spec("wrn-34-10").to_dict(), 1, 1)
        row = store.get(1)
        assert row.gpu_hours == pytest.approx(2.0) and row.cpu_hours == pytest.approx(8.0)


def test_results_records_exports_and_queries(tmp_path, capsys):
    study = tmp_path / "s"
    _filled_store(study)
    recs = load_records(study)
    assert [r["arch_id"] for r in recs] == [1, 2]
    assert recs[0]["Params"] == scaler.count("wrn-28-10").params
    assert recs[0]["train"][0]["training_time"] == pytest.approx(2.0 / 24)  # GPU-days
    assert export(study, tmp_path / "x.jsonl") == 2
    lines = [json.loads(line) for line in (tmp_path / "x.jsonl").read_text().splitlines()]
    assert lines == recs
    with pytest.raises(ScalerError, match="exists"):
        export(study, tmp_path / "x.jsonl")
    assert export(study, tmp_path / "x.csv") == 3 and export(study, tmp_path / "x.parquet") == 3
    import pandas as pd

    df = pd.read_parquet(tmp_path / "x.parquet")
    assert list(df["status"]) == ["complete", "complete", "failed"] and df["test_pgd20"].iloc[1] == 32.0
    assert list(select(df, by="test_pgd20", top=1)["arch_id"]) == [2]
    assert list(select(df, where="status == 'failed'")["arch_id"]) == [3]
    with pytest.raises(ScalerError, match="--where"):
        select(df, where="no_such_column >")
    assert main(["results", str(study), "--top", "1", "--by", "test_pgd20", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["arch_id"] == 2 and row["gpu_hours"] == pytest.approx(2.0)
    assert main(["results", str(study)]) == 0
    out = capsys.readouterr().out
    assert "failed: arch 3 after 1 attempts: training diverged at epoch 2 (loss nan)" in out
    assert main(["results", str(tmp_path / "nope")]) == 2
    assert "not a study directory" in capsys.readouterr().err


# --------------------------------------------------------------------------- layering
LAYERS = ["scaler", "trainers", "studies", "scaler_cli"]


def test_packages_never_import_upwards():
    bad = []
    for level, package in enumerate(LAYERS):
        above = set(LAYERS[level + 1 :])
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                bad += [f"{path.relative_to(ROOT)} imports {n}" for n in names if n.split(".")[0] in above]
    assert not bad, bad


def test_a_directory_that_is_not_a_study_is_not_taken_over(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ScalerError, match="holds other files"):
        Store.create(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_an_unreachable_cluster_is_one_line_and_writes_nothing(tmp_path, capsys):
    space = write(tmp_path, "depths: 1\nwidths: 1\n")
    study = tmp_path / "study"
    args = ["sweep", str(space), "--out", str(study), "--dataset", "digits", "--address", "127.0.0.1:1", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot reach a Ray cluster at 127.0.0.1:1" in err
    assert not study.exists()


def test_a_space_costed_for_other_classes_than_the_data_is_refused(tmp_path, capsys):
    space = write(tmp_path, "depths: 1\nwidths: 1\nnum_classes: 100\n")
    assert main(["space", str(space), "--json"]) == 0
    assert (
        json.loads(capsys.readouterr().out)["archs"][0]["params"]
        == scaler.count(
            scaler.get_spec({"block": "basic", "depths": [1, 1, 1], "planes": [16, 32, 64], "num_classes": 100})
        ).params
    )
    study = tmp_path / "study"
    assert main(["sweep", str(space), "--out", str(study), "--dataset", "digits", "--quiet"]) == 2
    assert "num_classes 100 but --dataset digits has 10 classes" in capsys.readouterr().err
    assert not study.exists()


def test_space_costs_carry_every_block_knob(tmp_path):
    """PReLU adds parameters and a 5x5 kernel FLOPs: a space's costs must equal `scaler count`."""
    from scaler.cost import count

    path = write(
        tmp_path, "depths: 1\nwidths: 1\nactivation: [relu, prelu, [relu, relu, prelu]]\nkernel_size: [3, 5]\n"
    )
    space = spaces.load_space(str(path))
    assert len(space) == 6
    for arch in space.archs:
        cost = count(arch.spec)
        assert (arch.params, arch.flops) == (cost.params, cost.flops)
    assert len({arch.params for arch in space.archs}) > 2
