"""Training runs on tiny data: run directory contents, exact resume, divergence, CLI errors."""

import json

import pytest
import torch

from scaler.errors import ScalerError
from scaler.spec import ArchSpec
from tests_support import TINY, tiny_config
from trainers.config import RECIPES, make_config
from trainers.run import resume, train
from trainers.schedule import lr_at


def test_run_directory_contents(tmp_path):
    out = tmp_path / "run"
    train(tiny_config(epochs=2, save_epochs=(1,)), out, progress=False)
    assert {p.name for p in out.iterdir()} == {
        "model.py",
        "config.json",
        "metrics.jsonl",
        "last.pt",
        "best.pt",
        "epoch_1.pt",
    }
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    for key in (
        "train_loss",
        "train_acc",
        "val_clean",
        "val_pgd20",
        "val_cw40",
        "val_stable",
        "val_lip",
        "lr",
        "lambda",
        "seconds",
    ):
        assert key in lines[-1]
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and "optimizer" in ckpt and "rng" in ckpt and "model" in ckpt
    config = json.loads((out / "config.json").read_text())
    assert config["spec"] == TINY and config["dataset"] == "synthetic" and config["seed"] == 0
    assert "class WideResNet" in (out / "model.py").read_text()


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.parametrize("method", ["pgd-at", "trades"])
def test_resume_is_bit_identical(tmp_path, method):
    cfg = dict(method=method, ema=0.9) if method == "trades" else dict(method=method)
    train(tiny_config(**cfg), tmp_path / "full", progress=False)
    train(tiny_config(**cfg), tmp_path / "broken", progress=False, stop_after=2)
    assert torch.load(tmp_path / "broken" / "last.pt", weights_only=True)["epoch"] == 2
    resume(tmp_path / "broken", progress=False)
    a, b = _weights(tmp_path / "full" / "last.pt"), _weights(tmp_path / "broken" / "last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    broken = (tmp_path / "broken" / "metrics.jsonl").read_text().splitlines()
    strip = [{k: v for k, v in json.loads(line).items() if "seconds" not in k and k != "images_per_s"} for line in full]
    assert strip == [
        {k: v for k, v in json.loads(line).items() if "seconds" not in k and k != "images_per_s"} for line in broken
    ]


def test_refuses_to_clobber_a_run_and_resume_needs_one(tmp_path):
    out = tmp_path / "run"
    train(tiny_config(epochs=1), out, progress=False)
    with pytest.raises(ScalerError, match="not empty"):
        train(tiny_config(epochs=1), out, progress=False)
    with pytest.raises(ScalerError, match="already finished"):
        resume(out, progress=False)
    with pytest.raises(ScalerError, match="nothing to resume"):
        resume(tmp_path / "nothing", progress=False)


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    import trainers.losses as losses

    real = losses.LOSSES["pgd-at"]
    calls = {"n": 0}

    def flaky(model, x, x_adv, y, beta=None):
        calls["n"] += 1
        total, *rest = real(model, x, x_adv, y, beta)
        return (total * float("nan") if calls["n"] > 4 else total, *rest)  # 4 steps = epoch 1

    monkeypatch.setitem(losses.LOSSES, "pgd-at", flaky)
    out = tmp_path / "run"
    with pytest.raises(ScalerError, match="diverged at epoch 2"):
        train(tiny_config(), out, progress=False)
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1


def test_schedules():
    cfg = make_config("bat", {"model": "x"})
    assert lr_at(cfg, 0, 10) == 0.1
    assert lr_at(cfg, 750, 10) == pytest.approx(0.01)
    assert lr_at(cfg, 900, 10) == pytest.approx(0.001)
    cos = make_config(None, {"model": "x", "schedule": "cosine", "epochs": 10})
    assert lr_at(cos, 50, 10) == pytest.approx(0.05)
    one = make_config(None, {"model": "x", "schedule": "onecycle", "epochs": 10, "warmup_epochs": 1})
    assert lr_at(one, 4, 10) == pytest.approx(0.05) and lr_at(one, 10, 10) == pytest.approx(0.1)


def test_recipes_follow_the_reference():
    nares = make_config("nares", {"model": "x"})
    assert nares.attack_steps == 7 and nares.weight_decay == 5e-4 and nares.wd_exclude_bn_bias
    assert nares.best_metric == "cw40" and nares.milestone_epochs() == [75, 90]
    trades = make_config("trades-paper", {"model": "x", "epochs": 10})  # explicit flags win
    assert trades.method == "trades" and trades.eps == 0.031 and trades.epochs == 10
    assert make_config("mart-paper", {"model": "x"}).weight_decay == 7e-4
    assert set(RECIPES) == {"bat", "nares", "trades-paper", "mart-paper"}


def test_weight_decay_exclusion():
    from scaler.builder import build_model
    from trainers.step import make_optimizer

    model = build_model(ArchSpec.from_dict(TINY))
    opt = make_optimizer(model, make_config("nares", {"model": "x"}))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert all(p.ndim == 4 or p.ndim == 2 for p in model.parameters() if id(p) in decayed)
    assert id(model.fc.bias) not in decayed and id(model.bn.weight) not in decayed


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "wrn-34-10"], "--out"),
        (["train", "wrn-99", "--out", "x"], "did you mean"),
        (["train", "wrn-a1", "--out", "{tmp}/r", "--method", "magic"], "unknown method"),
        (["train", "wrn-a1", "--out", "{tmp}/r", "--recipe", "fast"], "unknown recipe"),
        (["train", "wrn-a1", "--out", "{tmp}/r", "--eps", "8/0"], "fraction"),
        (["train", "wrn-a1", "--out", "{tmp}/r", "--dataset", "cifar10"], "--data-dir"),
        (["train", "wrn-a1", "--out", "{tmp}/r", "--method", "pgd-at", "--war-zeta", "30"], "WAR applies"),
        (["train", "nofile.py", "--out", "{tmp}/r"], "not found"),
        (["train", "--out", "{tmp}/r", "--resume"], "nothing to resume"),
        (["eval", "{tmp}/missing"], "no checkpoint"),
        (["eval", "{tmp}", "--attacks", "pgd7"], "unknown attack"),
        (["eval", "{tmp}/junk.pt"], "not a torch checkpoint"),
    ],
)
def test_train_eval_bad_input(tmp_path, capsys, args, message):
    from scaler_cli.app import main

    (tmp_path / "junk.pt").write_bytes(b"\x80\x04 not a checkpoint")
    code = main([a.replace("{tmp}", str(tmp_path)) for a in args])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "r").exists()


def test_war_adapts_lambda(tmp_path):
    out = tmp_path / "war"
    train(tiny_config(method="trades", war_zeta=5.0, epochs=2), out, progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["lambda"] is not None and r["lambda"] >= 0 for r in records)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert ckpt["war"]["zeta"] == 5.0 and float(ckpt["war"]["value"]) == records[-1]["lambda"]


def test_war_calibrate_measures_zeta_on_a_thin_network(tmp_path):
    out = tmp_path / "war"
    train(tiny_config(method="trades", war_calibrate=True, epochs=1), out, progress=False)
    calib = out / "war-calibration"
    thin = json.loads((calib / "config.json").read_text())["spec"]
    assert thin["planes"] == [8, 16, 32]  # halved (16, 32, 64); also the channels_last-hazard regression
    assert json.loads((calib / "config.json").read_text())["channels_last"] is False
    zeta = json.loads((calib / "war_zeta.json").read_text())["zeta"]
    assert zeta > 0 and json.loads((out / "config.json").read_text())["war_zeta"] == zeta


def test_train_a_model_file(tmp_path, capsys):
    from scaler.codegen import emit
    from scaler_cli.app import main

    path = emit(ArchSpec.from_dict(TINY), tmp_path / "net.py")
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                str(path),
                "--dataset",
                "synthetic",
                "--epochs",
                "1",
                "--val-n",
                "16",
                "--attack-steps",
                "1",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    assert (out / "model.py").read_text() == path.read_text()
    capsys.readouterr()
    assert main(["eval", str(out), "--n", "16", "--attacks", "clean,fgsm", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["clean"]["n"] == 16 and "fgsm" in res


def test_resume_that_extends_epochs_is_recorded(tmp_path):
    out = tmp_path / "run"
    train(tiny_config(epochs=1), out, progress=False)
    resume(out, progress=False, epochs=2)
    assert json.loads((out / "config.json").read_text())["epochs"] == 2
    with pytest.raises(ScalerError, match="already finished 2"):
        resume(out, progress=False)


def test_compile_also_compiles_the_attack(tmp_path, monkeypatch):
    """Attacks are most of the work: with --compile every block forward of a training step, the
    attack's and the update's, runs the compiled block (dynamo, here with its eager backend), and
    the run trains the same weights as without."""
    import trainers.compiled as compiled_mod
    import trainers.run as train_mod

    real = compiled_mod.compile_model
    forwards = []

    def compile_eagerly(model, **kwargs):
        twin = real(model, backend="eager", regional=True, **kwargs)
        for block in compiled_mod.tagged_blocks(model):  # the model's own (validation, saving)
            block.register_forward_hook(lambda m, args, out: forwards.append(("model", m.training)))
        for block in twin.modules():
            if getattr(type(block), "scaler_block", None):
                block.register_forward_hook(
                    lambda m, args, out: forwards.append(("compiled" if m._scaler_compiled else "eager", m.training))
                )
        return twin

    monkeypatch.setattr(train_mod, "compile_model", compile_eagerly)
    same = dict(epochs=1, attack_steps=2, precision="fp32", fused=False)  # what --compile implies
    train(tiny_config(compile=True, **same), tmp_path / "compiled", progress=False)
    train(tiny_config(**same), tmp_path / "plain", progress=False)
    updates = forwards.count(("compiled", True))
    assert updates >= 2 and forwards.count(("compiled", False)) == 2 * updates  # each update's 2 attack steps
    assert ("eager", True) not in forwards and ("eager", False) not in forwards
    assert ("model", True) not in forwards  # the model itself only validates
    compiled, plain = (torch.load(tmp_path / r / "last.pt", weights_only=False)["model"] for r in ("compiled", "plain"))
    for key in plain:
        torch.testing.assert_close(compiled[key], plain[key], rtol=1e-5, atol=1e-6, msg=key)


def test_auto_compile_decision_is_recorded(tmp_path, monkeypatch):
    """--compile unset resolves once per run and config.json keeps the decision (a resume follows
    it); a long basic-block run on the CPU compiles, a short one does not."""
    import trainers.run as train_mod

    monkeypatch.setattr(train_mod, "compile_model", lambda module, **kwargs: module)  # no real compilation
    train(tiny_config(epochs=1, attack_steps=1), tmp_path / "short", progress=False)
    assert json.loads((tmp_path / "short" / "config.json").read_text())["compile"] is False
    monkeypatch.setattr(train_mod, "steps_per_epoch", lambda n, cfg: 10**4)  # as long as a real run
    train(tiny_config(epochs=1, attack_steps=1), tmp_path / "long", progress=False)
    assert json.loads((tmp_path / "long" / "config.json").read_text())["compile"] is True


def test_epoch_throughput_counts_the_images_trained(tmp_path):
    """metrics.jsonl's images_per_s times the epoch's seconds is the images trained: every training
    point, with drop_last too when the set is smaller than a batch (one short batch, not a full one)."""
    images = {}
    for drop_last in (False, True):
        cfg = tiny_config(epochs=1, attack_steps=1, batch_size=4096, drop_last=drop_last)
        train(cfg, tmp_path / str(drop_last), progress=False)
        record = json.loads((tmp_path / str(drop_last) / "metrics.jsonl").read_text().splitlines()[0])
        images[drop_last] = record["images_per_s"] * record["seconds"]
    assert images[True] == pytest.approx(images[False]) and 0 < images[False] < 4096
