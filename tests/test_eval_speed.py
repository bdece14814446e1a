"""The fast evaluation path (channels_last, folded eval BN, bf16 option), --val-precision and
`scaler bench eval`."""

import json

import pytest
import torch

from scaler.builder import build_model
from scaler.cost import count
from scaler.errors import ScalerError
from scaler.spec import ArchSpec
from tests_support import tiny_config
from trainers.config import TrainConfig, make_config
from trainers.evaluation import evaluate, resolve_val_precision

BASIC = ArchSpec("basic", (1, 1, 1), (16, 32, 64))
ROBUST = ArchSpec("robust", (1, 1, 1), (16, 32, 64))
ATTACKS = ("clean", "fgsm", "pgd20", "cw40")


def trained_looking(spec):
    """An emitted model whose BatchNorms are not the identity (as after training), in eval mode."""
    torch.manual_seed(0)
    model = build_model(spec)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def data(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)


@pytest.mark.parametrize("spec", [BASIC, ROBUST], ids=["basic", "robust"])
def test_fast_fp32_evaluation_equals_the_plain_path(spec):
    model = trained_looking(spec)
    x, y = data(12)  # a full and a partial batch
    # the blocks as the papers write them (as emitted), NCHW, native BatchNorm
    plain = evaluate(model, x, y, ATTACKS, batch_size=8, channels_last=False, fold_bn=False, fused=False)
    fast = evaluate(model, x, y, ATTACKS, batch_size=8)  # fused blocks, channels_last, folded BN, fp32
    for name in ATTACKS:
        assert fast[name]["accuracy"] == plain[name]["accuracy"], name
        assert fast[name]["stable"] == plain[name]["stable"], name
        assert fast[name]["lip"] == pytest.approx(plain[name]["lip"], rel=1e-3, abs=1e-6), name
        assert fast[name]["loss"] == pytest.approx(plain[name]["loss"], rel=1e-5), name
    # the model comes back as it was: eval mode, NCHW, parameters trainable, BN unpatched
    assert not model.training and all(p.requires_grad for p in model.parameters())
    assert all(p.is_contiguous() for p in model.parameters())
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_channels_last_model_stays_channels_last_and_hazard_runs_nchw():
    from trainers.evaluation import eval_layout

    model = trained_looking(BASIC).to(memory_format=torch.channels_last)
    x, y = data(8)
    evaluate(model, x, y, ("clean", "fgsm"), batch_size=8)
    assert model.stem.weight.is_contiguous(memory_format=torch.channels_last)  # a training model's layout
    tiny = build_model(ArchSpec("basic", (1, 1, 1), (8, 16, 32)))  # 1x1 strided shortcut on 8 channels
    assert not eval_layout(tiny, x)
    assert eval_layout(model, x) and not eval_layout(model, x, channels_last=False)
    assert not eval_layout(torch.nn.Linear(3, 2), torch.rand(4, 3))


def test_bf16_evaluation_runs_and_is_close():
    model = trained_looking(BASIC)
    x, y = data(32)
    fp32 = evaluate(model, x, y, ATTACKS, batch_size=16)
    bf16 = evaluate(model, x, y, ATTACKS, batch_size=16, precision="bf16")
    for name in ATTACKS:
        assert abs(bf16[name]["accuracy"] - fp32[name]["accuracy"]) <= 100 * 3 / 32, name
        assert abs(bf16[name]["stable"] - fp32[name]["stable"]) <= 100 * 3 / 32, name
        assert bf16[name]["lip"] == pytest.approx(fp32[name]["lip"], rel=0.15, abs=0.05), name
        assert bf16[name]["loss"] == pytest.approx(fp32[name]["loss"], rel=0.02), name
    with pytest.raises(ScalerError, match="unknown precision"):
        evaluate(model, x, y, ATTACKS, precision="fp16")


def test_batchnorm_folding_nests_and_takes_any_rank():
    from trainers.attacks import folded_batchnorm

    model = torch.nn.Sequential(torch.nn.BatchNorm1d(4)).eval()
    with torch.no_grad():
        model[0].running_mean.uniform_(-1, 1)
        model[0].running_var.uniform_(0.5, 2)
    x = torch.randn(5, 4)
    expected = model(x)
    with folded_batchnorm(model):
        outer = model[0].forward
        with folded_batchnorm(model):
            assert torch.allclose(model(x), expected, atol=1e-6)
        assert model[0].forward is outer and torch.allclose(model(x), expected, atol=1e-6)
    assert "forward" not in model[0].__dict__


def test_bf16_autoattack_runs():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 10),  # the targeted DLR loss needs >= 4 classes
    ).eval()
    x = torch.rand(4, 3, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)  # every point clean-correct: AutoAttack attacks them all
    r = evaluate(model, x, y, ("clean", "aa-compact"), precision="bf16")
    assert r["clean"]["accuracy"] == 100 and r["aa-compact"]["accuracy"] <= 100 and r["aa-compact"]["n"] == 4


def test_default_batch_sizes(monkeypatch):
    import trainers.evaluation as evaluation

    seen = {}

    def fake_autoattack(model, x, y, *, batch_size, **kwargs):
        seen["aa"] = batch_size
        return x.clone(), []

    monkeypatch.setattr(evaluation, "autoattack", fake_autoattack)
    model = trained_looking(BASIC)
    x, y = data(4)
    evaluate(model, x, y, ("aa",))
    assert seen["aa"] == 256  # AutoAttack seeds its restarts per batch: it keeps the batches it had
    evaluate(model, x, y, ("aa",), batch_size=8)
    assert seen["aa"] == 8
    assert evaluation.default_batch_size("cpu") == 32 and evaluation.default_batch_size("cuda") == 256


def test_val_precision_resolution(monkeypatch):
    import trainers.step as step

    cpu = torch.device("cpu")
    monkeypatch.setattr(step, "cpu_has_bf16", lambda: True)
    assert resolve_val_precision("auto", "auto", cpu) == "bf16"
    assert resolve_val_precision("auto", "fp32", cpu) == "fp32"
    assert resolve_val_precision("fp32", "auto", cpu) == "fp32"
    monkeypatch.setattr(step, "cpu_has_bf16", lambda: False)
    assert resolve_val_precision("auto", "auto", cpu) == "fp32"
    assert resolve_val_precision("auto", "bf16", cpu) == "bf16"
    assert resolve_val_precision("bf16", "fp32", cpu) == "bf16"
    with pytest.raises(ScalerError):
        resolve_val_precision("half", "auto", cpu)


def test_val_precision_config_round_trip_and_old_configs():
    cfg = make_config(None, {"model": "m", "val_precision": "fp32"})
    again = TrainConfig.from_dict(json.loads(cfg.to_json()))
    assert again == cfg and again.val_precision == "fp32"
    assert make_config(None, {"model": "m"}).val_precision == "auto"
    with pytest.raises(ScalerError, match="val-precision"):
        make_config(None, {"model": "m", "val_precision": "fp16"})
    old = json.loads(cfg.to_json())
    del old["val_precision"]  # a config.json written before the field existed
    loaded = TrainConfig.from_dict(old)
    loaded.validate()
    assert loaded.val_precision == "auto"


def test_validation_uses_val_precision_and_old_runs_resume(tmp_path, monkeypatch):
    """Each validated epoch's record says the precision it was measured in: --val-precision, and
    for a run whose config predates the option, auto (training's precision, fp32 here)."""
    from trainers.run import resume, train

    out = tmp_path / "run"
    train(tiny_config(epochs=2, attack_steps=1, val_n=16, val_precision="bf16"), out, progress=False, stop_after=1)
    config = json.loads((out / "config.json").read_text())
    assert config["val_precision"] == "bf16"
    del config["val_precision"]  # as an older version wrote it
    (out / "config.json").write_text(json.dumps(config))
    import trainers.step as step

    monkeypatch.setattr(step, "cpu_has_bf16", lambda: False)
    resume(out, progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_precision"] for r in records] == ["bf16", "fp32"]


def test_train_refuses_a_bad_val_precision(tmp_path, capsys):
    from scaler_cli.app import main
    from tests_support import TINY_ARGS

    code = main(["train", *TINY_ARGS, "--val-precision", "fp16", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "val-precision" in err, err


BENCH = [
    "bench",
    "eval",
    "--block",
    "basic",
    "--depths",
    "1,1,1",
    "--widths",
    "1,1,1",
    "--n",
    "16",
    "--batch-size",
    "8",
]


def test_bench_eval_cli_json(capsys):
    from scaler_cli.app import main
    from trainers.bench import evaluation_flops

    assert main([*BENCH, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for key in (
        "images_per_s",
        "reference_images_per_s",
        "speedup",
        "precision",
        "channels_last",
        "batch_size",
        "n",
        "attack",
        "device",
        "gflops_per_s",
    ):
        assert key in data, key
    assert data["attack"] == "pgd20" and data["n"] == 16 and data["batch_size"] == 8
    assert data["precision"] == "fp32" and data["channels_last"] is True and data["device"] == "cpu"
    assert evaluation_flops("pgd20", 1) == 42  # clean forward, 20 x (forward + input gradient), attacked forward
    flops = count(BASIC).flops * 42 * 16
    assert data["gflops_per_s"] == pytest.approx(flops / data["seconds"] / 1e9)
    assert data["images_per_s"] == pytest.approx(16 / data["seconds"])
    assert data["speedup"] == pytest.approx(data["images_per_s"] / data["reference_images_per_s"])
    correct, reference_correct = data["accuracy"] * 16 / 100, data["reference_accuracy"] * 16 / 100
    assert correct == round(correct) and reference_correct == round(reference_correct)  # of the 16 images
    assert abs(correct - reference_correct) <= 2  # the same attack on the same model (random starts differ)
    assert data["page_faults_per_image"] >= 0 and data["reference_page_faults_per_image"] >= 0
    assert main([*BENCH, "--attack", "clean"]) == 0
    assert "page faults per image: ours " in capsys.readouterr().out
    assert main([*BENCH, "--attack", "fgsm", "--precision", "bf16", "--no-reference"]) == 0
    out = capsys.readouterr().out
    assert "fgsm evaluation of 16 images, batch 8, bf16, channels_last" in out and "GFLOP/s" in out
    assert "reference" not in out.splitlines()[1]


def test_bench_eval_compiled(capsys, monkeypatch):
    """--compile times ours through torch.compile (here with a backend that records each graph it
    is handed and runs it eagerly), with static shapes (evaluate(compile=True): BatchNorm left to
    the compiler), and every graph compiled in the warm-up (a full and a shorter last batch): none
    while timing."""
    import trainers.bench as tb
    from scaler_cli.app import main

    compiles, timers = [], []
    real_compile, real_timer = torch.compile, tb._timer

    def recording(gm, example_inputs):
        compiles.append((len(timers), tuple(t.shape[0] for t in example_inputs if isinstance(t, torch.Tensor))))
        return gm.forward

    def compile_(fn, backend="inductor", **kw):
        assert kw == {"dynamic": False}
        return real_compile(fn, backend=recording, **kw)

    def timer(device):
        begin, finish = real_timer(device)
        return lambda: timers.append("begin") or begin(), finish

    monkeypatch.setattr(torch, "compile", compile_)
    monkeypatch.setattr(tb, "_timer", timer)
    torch._dynamo.reset()
    args = [*BENCH[:-4], "--n", "12", "--batch-size", "8", "--no-reference"]
    torch.manual_seed(0)  # the command initialises its model from the global generator
    assert main([*args, "--attack", "fgsm", "--compile", "--rounds", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["compile"] is True and data["warmup_seconds"] > 0
    assert timers == ["begin"] * 3  # the warm-up, then two timed rounds
    assert compiles and {begun for begun, _ in compiles} == {1}  # all inside the warm-up
    assert {8, 4} <= {size for _, sizes in compiles for size in sizes}  # both batch shapes
    timers.clear()
    compiles.clear()
    torch.manual_seed(0)
    assert main([*args, "--attack", "fgsm", "--json"]) == 0
    eager = json.loads(capsys.readouterr().out)
    assert eager["compile"] is False and "warmup_seconds" not in eager and not compiles
    assert eager["accuracy"] == pytest.approx(data["accuracy"], abs=100 / 12)  # the same model; a point may flip
    assert main([*args, "--compile"]) == 0
    out = capsys.readouterr().out
    assert "fp32, channels_last, compiled on cpu" in out and "compiling warm-up" in out
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--attack", "pgd7"], "unknown attack"),
        (["--attack", "aa"], "unknown attack"),
        (["--batch-size", "0"], ">= 1"),
        (["--n", "0"], ">= 1"),
        (["--precision", "x"], "unknown precision"),
    ],
)
def test_bench_eval_bad_input(capsys, extra, message):
    from scaler_cli.app import main

    code = main([*BENCH, *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err, err


def test_eval_refuses_a_bad_precision(tmp_path, capsys):
    from scaler_cli.app import main

    code = main(["eval", str(tmp_path), "--precision", "fp16"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "unknown precision" in err, err


def _recording_compile(monkeypatch):
    """torch.compile with a backend that records each graph's grad mode and image batch size and runs it
    eagerly (Inductor would take minutes here and computes the same function)."""
    graphs = []
    real_compile = torch.compile

    def recording(gm, example_inputs):
        sizes = {t.shape[0] for t in example_inputs if isinstance(t, torch.Tensor) and t.shape[-2:] == (32, 32)}
        graphs.append((torch.is_grad_enabled(), tuple(sorted(sizes))))
        return gm.forward

    def compile_(fn, backend="inductor", **kw):
        assert kw == {"dynamic": False}
        return real_compile(fn, backend=recording, **kw)

    monkeypatch.setattr(torch, "compile", compile_)
    torch._dynamo.reset()
    return graphs


def test_evaluate_compiled_equals_eager_and_leaves_autoattack_eager(monkeypatch):
    """evaluate(compile=True) runs the logits and our attacks through one compiled model (BatchNorm
    not folded: the compiler's), one graph per batch shape and grad mode, and hands AutoAttack the
    model as given; its metrics equal eager's to float rounding."""
    import trainers.attacks as ta
    import trainers.evaluation as ev
    from scaler.builder import build_model
    from scaler.spec import ArchSpec

    torch.manual_seed(0)
    model = build_model(ArchSpec("basic", (1, 1, 1), (16, 32, 64))).eval()
    x, y = torch.rand(12, 3, 32, 32), torch.randint(0, 10, (12,))
    folds, handed = [], []
    real_fold = ta.folded_batchnorm
    for module in (ta, ev):
        monkeypatch.setattr(module, "folded_batchnorm", lambda m: folds.append(m) or real_fold(m))
    eager = ev.evaluate(model, x, y, ("clean", "fgsm", "pgd20"), batch_size=8)
    assert folds  # the spy sees eager evaluation fold
    folds.clear()
    graphs = _recording_compile(monkeypatch)
    monkeypatch.setattr(ev, "autoattack", lambda m, x, y, **kw: handed.append(m) or (x.clone(), []))
    compiled = ev.evaluate(model, x, y, ("clean", "fgsm", "pgd20", "aa-compact"), batch_size=8, compile=True)
    torch._dynamo.reset()
    assert {(True, (8,)), (True, (4,)), (False, (8,)), (False, (4,))} <= set(graphs), graphs
    assert handed == [model]  # AutoAttack gets the eager model
    assert folds == []  # ours leaves BatchNorm to the compiler; fp32 AutoAttack runs the model as given
    for name in ("clean", "fgsm", "pgd20"):
        for key in ("accuracy", "stable"):
            assert compiled[name][key] == pytest.approx(eager[name][key], abs=100 / 12), name
        assert compiled[name]["lip"] == pytest.approx(eager[name]["lip"], rel=1e-3), name
        assert compiled[name]["loss"] == pytest.approx(eager[name]["loss"], rel=1e-4), name
    assert not any(isinstance(m, torch._dynamo.eval_frame.OptimizedModule) for m in model.modules())


def test_eval_cli_compile(tmp_path, capsys, monkeypatch):
    """`scaler eval --compile` compiles and says so; without a C++ compiler on a CPU it refuses in
    one line before loading anything."""
    import shutil

    from scaler_cli.app import main
    from tests_support import TINY_ARGS

    out = tmp_path / "run"
    assert main(["train", *TINY_ARGS, "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    graphs = _recording_compile(monkeypatch)
    assert main(["eval", str(out), "--n", "12", "--batch-size", "8", "--attacks", "clean,fgsm", "--compile"]) == 0
    captured = capsys.readouterr()
    torch._dynamo.reset()
    assert "torch.compile on" in captured.err and "RobustResBlock" not in captured.err
    assert "fgsm" in captured.out and {(True, (8,)), (True, (4,))} <= set(graphs)
    assert (
        main(["eval", str(out), "--n", "8", "--attacks", "clean", "--compile", "--json", "--quiet", "--cuda-graphs"])
        == 0
    )
    torch._dynamo.reset()
    info = json.loads(capsys.readouterr().out)["checkpoint"]
    assert info["compile"] is True and info["cuda_graphs"] is False  # asked for, on a CPU: nothing replayed
    monkeypatch.setattr(shutil, "which", lambda name: None)
    code = main(["eval", str(out), "--attacks", "clean", "--compile", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "C++ compiler" in err, err


@pytest.mark.parametrize("command", ["train", "bench-train", "bench-eval"])
def test_explicit_compile_without_a_cxx_compiler_is_refused(tmp_path, capsys, monkeypatch, command):
    """`--compile` where Inductor cannot build CPU code: one line, exit 2, and no run directory."""
    import shutil

    from scaler_cli.app import main
    from tests_support import TINY_ARGS

    monkeypatch.setattr(shutil, "which", lambda name: None)
    out = tmp_path / "run"
    args = {
        "train": ["train", *TINY_ARGS, "--out", str(out), "--quiet"],
        "bench-train": ["bench", "train", *TINY_ARGS[:6], "--steps", "1", "--batch-size", "4"],
        "bench-eval": BENCH,
    }[command]
    code = main([*args, "--compile", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "C++ compiler" in err, err
    assert not out.exists()


def test_minor_page_faults_count_the_pages_a_fresh_allocation_touches():
    import mmap

    from trainers.bench import minor_page_faults

    if minor_page_faults() is None:
        pytest.skip("no resource module: page faults are not counted here")
    payload = b"\x01" * (16 << 20)
    with mmap.mmap(-1, len(payload)) as fresh:  # anonymous memory: each page faults on its first write
        before = minor_page_faults()
        fresh.write(payload)
        assert minor_page_faults() - before >= 8  # 4096 4-KiB pages, or 8 huge pages


@pytest.mark.parametrize("bench", ["eval", "train"])
def test_bench_reports_page_faults_per_image_of_the_timed_work(monkeypatch, bench):
    """The faults of the timed calls only (warm-up excluded), summed over the rounds or steps and
    divided by the images timed; None where the OS does not count them. A fake counter advances by
    96 in each call of ours and 960 in each of the reference's."""
    import trainers.bench as tb

    counter = [0]

    def counting(fn, pages):
        def wrapped(*args, **kwargs):
            counter[0] += pages
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(tb, "minor_page_faults", lambda: counter[0])
    model = build_model(BASIC)
    if bench == "eval":
        monkeypatch.setattr(tb, "evaluate", counting(tb.evaluate, 96))
        monkeypatch.setattr(tb, "reference_eval", counting(tb.reference_eval, 960))
        result = tb.bench_eval(model, attack="fgsm", n=4, batch_size=2, rounds=3)
        assert result["page_faults_per_image"] == 96 * 3 / (4 * 3)  # one call per round over all 4 images
        assert result["reference_page_faults_per_image"] == 960 * 3 / (4 * 3)
    else:
        monkeypatch.setattr(tb.Stepper, "step", counting(tb.Stepper.step, 96))
        monkeypatch.setattr(tb, "reference_step", counting(tb.reference_step, 960))
        result = tb.bench_train(model, batch_size=4, steps=2, warmup=1, precision="fp32")
        assert result["page_faults_per_image"] == 96 / 4  # per step, per image of the batch
        assert result["reference_page_faults_per_image"] == 960 / 4
    monkeypatch.setattr(tb, "minor_page_faults", lambda: None)
    if bench == "eval":
        result = tb.bench_eval(model, attack="clean", n=2, batch_size=2)
    else:
        result = tb.bench_train(model, batch_size=2, steps=1, warmup=0, precision="fp32")
    assert result["page_faults_per_image"] is None and result["reference_page_faults_per_image"] is None


def test_precision_means_one_thing_in_train_eval_and_bench(monkeypatch):
    """--precision auto is bf16 where the device has it in every command (eval and bench eval took
    only fp32 or bf16), and an unknown one is refused alike."""
    import trainers.step as step
    from trainers.evaluation import precision_dtype

    for has_bf16, expected in ((True, torch.bfloat16), (False, None)):
        monkeypatch.setattr(step, "cpu_has_bf16", lambda has_bf16=has_bf16: has_bf16)
        assert step.resolve_precision("auto", torch.device("cpu")) is expected
        assert precision_dtype("auto", "cpu") is expected
    assert precision_dtype("fp32") is None and precision_dtype("bf16") is torch.bfloat16
    for resolve in (lambda p: step.resolve_precision(p, torch.device("cpu")), precision_dtype):
        with pytest.raises(ScalerError, match="unknown precision 'fp16'; choose auto, fp32, bf16"):
            resolve("fp16")
