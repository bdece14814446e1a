"""Checkpoints from other codebases: detection, renaming, refusal, run directories, eval, export.

The fixtures list every state-dict entry (key, shape, dtype) of the public implementations of the
published models (copied, compacted, from ../shared/fixtures/upstream-state-dicts). Tests build
state dicts with exactly those keys and shapes and random values.
"""

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from scaler.codegen import render
from scaler.errors import ScalerError
from scaler.layouts import LAYOUTS, check_spec, detect, export_target, plan_import
from scaler.presets import PRESETS
from scaler.spec import NORMALIZATIONS, ArchSpec
from scaler_cli.app import main
from trainers.checkpoint import load_trained
from trainers.interop import export_run, import_checkpoint, meta_model, strip_prefixes

FIXTURES = Path(__file__).parent / "fixtures" / "upstream-state-dicts"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "upstream-state-dicts"
C10 = NORMALIZATIONS["cifar10"]
SILU_C10 = {"activation": "silu", "mean": C10[0], "std": C10[1]}

# fixture: (preset, spec changes, layout detected, dropped keys, export target that gives the source keys back)
CASES = {
    "robustbench-wideresnet-28-10": ("wrn-28-10", {}, "wideresnet", 0, "robustbench"),
    "robustbench-wideresnet-34-10": ("wrn-34-10", {}, "wideresnet", 0, "robustbench"),
    "robustbench-wideresnet-34-10-subblock1": ("wrn-34-10", {}, "wideresnet", 61, "robustbench"),
    "robustbench-dmwideresnet-70-16-swish": (
        "wrn-70-16",
        {**SILU_C10, "padding": "same"},
        "dmwideresnet",
        0,
        "robustbench",
    ),
    "robustbench-huang2022revisiting-wrn-a4": ("wrn-a4", SILU_C10, "preactresnet", 2, "robustbench"),
    "robustbench-robustwideresnet-34-r": ("wrn-34-r", {}, "robustwideresnet", 0, "robustbench"),
    "robustwrn-robustwideresnet34": ("wrn-34-r", {}, "robustwideresnet", 0, "robustbench"),
    "robust-residual-network-robustresnet-a1": ("robustresnet-a1", {}, "preactresnet", 0, "preactresnet"),
    "robust-residual-network-wrn-a4": ("wrn-a4", {}, "preactresnet", 0, "preactresnet"),
}
QUICK = {"robust-residual-network-robustresnet-a1"}  # the richest mapping, and small enough to run always


def entries(name: str) -> list:
    return json.loads((FIXTURES / f"{name}.json").read_text())["state_dict"]


def spec_for(name: str) -> ArchSpec:
    preset, changes, *_ = CASES[name]
    return replace(PRESETS[preset].spec, **changes)


def random_state(rows: list, seed: int = 0) -> dict:
    """A state dict with the fixture's keys, shapes and dtypes and random values (mu/sigma: CIFAR-10)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape, dtype in rows:
        if key in ("mu", "sigma"):
            state[key] = torch.tensor(C10[0 if key == "mu" else 1]).view(*shape)
        elif dtype == "int64":
            state[key] = torch.randint(0, 1000, shape, generator=g)
        else:
            state[key] = torch.randn(shape, generator=g)
    return state


def test_fixtures_are_the_shared_ones():
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} absent: the copies in tests/fixtures are used as they are")
    for path in SHARED.glob("*.json"):
        assert json.loads(path.read_text()) == json.loads((FIXTURES / path.name).read_text()), path.name
    assert {p.name for p in SHARED.glob("*.json")} == {f"{n}.json" for n in CASES}


@pytest.mark.parametrize("name", sorted(CASES))
def test_fixture_maps_one_to_one_in_module_order(name):
    """Detection picks the layout; every kept tensor maps to the model tensor at the same position
    in module order with the same shape (the reference's verified correspondence)."""
    rows = entries(name)
    _, _, layout_name, n_dropped, _ = CASES[name]
    source = {k: tuple(s) for k, s, _ in rows}
    layout = detect(source)
    assert layout.name == layout_name
    spec = spec_for(name)
    model = meta_model(render(spec), spec.num_classes, name)
    target = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    plan = plan_import(layout, source, target)
    assert len(plan.dropped) == n_dropped
    assert all(k.startswith("sub_block1.") or k in ("mu", "sigma") for k in plan.dropped)
    kept = [k for k in source if k not in plan.dropped]
    assert list(plan.mapping.values()) == kept  # position i of theirs is position i of ours
    assert all(source[plan.mapping[k]] == target[k] for k in target)
    params = json.loads((FIXTURES / f"{name}.json").read_text())["params"]
    buffers = ("running_mean", "running_var", "num_batches_tracked", "mu", "sigma")
    dropped_params = sum(math.prod(source[k]) for k in plan.dropped if not k.endswith(buffers))
    assert sum(p.numel() for p in model.parameters()) == params - dropped_params


def _import_and_check(name, tmp_path):
    rows = entries(name)
    state = random_state(rows)
    ckpt = tmp_path / "upstream.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, ckpt)
    spec = spec_for(name)
    run = tmp_path / "run"
    result = import_checkpoint(ckpt, run, source=render(spec), spec=spec, label=CASES[name][0])
    assert result["format"] == CASES[name][2]
    saved = torch.load(run / "best.pt", weights_only=True)
    ours = list(saved["model"].items())
    kept = [k for k, _, _ in rows if k not in result["dropped"]]
    assert len(ours) == len(kept)
    for (our_key, value), theirs in zip(ours, kept):  # every source tensor, bit for bit, in its place
        assert torch.equal(value, state[theirs]), (our_key, theirs)
    assert ArchSpec.from_dict(json.loads((run / "config.json").read_text())["spec"]) == spec
    exported = tmp_path / "export.pt"
    export_run(run, exported, to=CASES[name][4])
    back = torch.load(exported, weights_only=True)
    expected = [k for k, _, _ in rows if not k.startswith("sub_block1.")]
    assert list(back) == expected
    assert all(torch.equal(back[k], state[k]) for k in expected)


@pytest.mark.parametrize("name", sorted(QUICK))
def test_fixture_import_places_every_tensor_and_exports_back(name, tmp_path):
    _import_and_check(name, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(CASES) - QUICK))
def test_large_fixture_import_places_every_tensor_and_exports_back(name, tmp_path):
    _import_and_check(name, tmp_path)


# --------------------------------------------------------------------------- DMWideResNet, by hand
def _dm_state(depths, widths, classes=10, seed=0) -> dict:
    """A DMWideResNet state dict written from its description: init_conv, layer.i.block.j.
    {batchnorm_0, conv_0, batchnorm_1, conv_1, shortcut}, batchnorm, logits."""
    g = torch.Generator().manual_seed(seed)

    def bn(prefix, c):
        return {
            f"{prefix}.weight": torch.rand(c, generator=g) + 0.5,
            f"{prefix}.bias": torch.randn(c, generator=g) * 0.1,
            f"{prefix}.running_mean": torch.randn(c, generator=g) * 0.1,
            f"{prefix}.running_var": torch.rand(c, generator=g) + 0.5,
            f"{prefix}.num_batches_tracked": torch.tensor(7),
        }

    def conv(cout, cin, k):
        return torch.randn(cout, cin, k, k, generator=g) * (2 / (k * k * cout)) ** 0.5

    state = {"init_conv.weight": conv(16, 3, 3)}
    cin = 16
    for i, (depth, cout) in enumerate(zip(depths, widths)):
        for j in range(depth):
            p = f"layer.{i}.block.{j}"
            state.update(bn(f"{p}.batchnorm_0", cin))
            state[f"{p}.conv_0.weight"] = conv(cout, cin, 3)
            state.update(bn(f"{p}.batchnorm_1", cout))
            state[f"{p}.conv_1.weight"] = conv(cout, cout, 3)
            if cin != cout:
                state[f"{p}.shortcut.weight"] = conv(cout, cin, 1)
            cin = cout
    state.update(bn("batchnorm", cin))
    state["logits.weight"] = torch.randn(classes, cin, generator=g) * 0.1
    state["logits.bias"] = torch.randn(classes, generator=g) * 0.1
    return state


def _dm_forward(state, x, depths, mean, std):
    """DMWideResNet's forward (Swish): normalise; stride-2 3x3 convs see the input padded
    (0, 1, 0, 1), stride-1 ones (1, 1, 1, 1); pre-activation blocks whose projection shortcut reads
    the activated input; BN-Swish-8x8 average pool-linear head."""

    def bn(prefix, h):
        s = state
        return F.batch_norm(
            h, s[f"{prefix}.running_mean"], s[f"{prefix}.running_var"], s[f"{prefix}.weight"], s[f"{prefix}.bias"]
        )

    act = F.silu
    h = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    h = F.conv2d(h, state["init_conv.weight"], padding=1)
    for i, depth in enumerate(depths):
        for j in range(depth):
            p = f"layer.{i}.block.{j}"
            stride = 2 if (i > 0 and j == 0) else 1
            pre = act(bn(f"{p}.batchnorm_0", h))
            projected = f"{p}.shortcut.weight" in state
            v = F.pad(pre, (0, 1, 0, 1) if stride == 2 else (1, 1, 1, 1))
            out = F.conv2d(v, state[f"{p}.conv_0.weight"], stride=stride)
            out = F.conv2d(act(bn(f"{p}.batchnorm_1", out)), state[f"{p}.conv_1.weight"], padding=1)
            skip = F.conv2d(pre, state[f"{p}.shortcut.weight"], stride=stride) if projected else h
            h = skip + out
    h = F.avg_pool2d(act(bn("batchnorm", h)), 8).flatten(1)
    return F.linear(h, state["logits.weight"], state["logits.bias"])


DM_SPEC = ArchSpec("basic", (2, 2, 2), (32, 64, 128), activation="silu", mean=C10[0], std=C10[1], padding="same")


def test_dmwideresnet_import_computes_deepminds_function(tmp_path):
    state = _dm_state((2, 2, 2), (32, 64, 128))
    ckpt = tmp_path / "dm.pt"
    torch.save({"model_state_dict": state}, ckpt)
    run = tmp_path / "run"
    import_checkpoint(ckpt, run, source=render(DM_SPEC), spec=DM_SPEC, label="dm")
    model, _, info = load_trained(run)
    assert info["imported"]["format"] == "dmwideresnet"
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = _dm_forward(state, x, (2, 2, 2), *C10)
        got = model(x)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (got - expected).abs().max()
    # the same weights with symmetric padding load but compute another function: refused instead
    sym = replace(DM_SPEC, padding="symmetric")
    with pytest.raises(ScalerError, match="--padding same"):
        import_checkpoint(ckpt, tmp_path / "sym", source=render(sym), spec=sym, label="dm")
    assert not (tmp_path / "sym").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dm.pt", "run"]  # no temp directory left


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "layout, changes, stored, message",
    [
        ("dmwideresnet", {"padding": "same"}, None, "give --normalize cifar10|cifar100"),
        ("dmwideresnet", {"mean": C10[0], "std": C10[1]}, None, "give --padding same"),
        ("wideresnet", {"mean": C10[0], "std": C10[1]}, None, "drop --normalize"),
        ("wideresnet", {"activation": "silu"}, None, "uses relu"),
        ("wideresnet", {"block": "robust"}, None, "basic blocks"),
        ("robustwideresnet", {"padding": "same"}, None, "give --padding symmetric"),
        ("robustwideresnet", {"strides": (1, 1, 2)}, None, "strides"),
        ("preactresnet", {}, C10, "give --normalize cifar10"),
        ("preactresnet", {"mean": NORMALIZATIONS["cifar100"][0], "std": NORMALIZATIONS["cifar100"][1]}, C10, "cifar10"),
        ("preactresnet", {"mean": C10[0], "std": C10[1]}, None, "holds no mu/sigma"),
        ("preactresnet", {}, ((0.5, 0.5, 0.5), (0.2, 0.2, 0.2)), "--mean 0.5,0.5,0.5 --std 0.2,0.2,0.2"),
    ],
)
def test_contradicting_spec_is_refused(layout, changes, stored, message):
    spec = ArchSpec("basic", (1, 1, 1), (16, 32, 64))
    spec = replace(spec, **changes)
    with pytest.raises(ScalerError, match=message.replace("|", r"\|")):
        check_spec(LAYOUTS[layout], spec, stored)


@pytest.mark.parametrize(
    "layout, changes, message",
    [
        ("wideresnet", {"norm": "group"}, "drop --norm/--kernel-size"),
        ("robustwideresnet", {"kernel_size": (3, 5, 3)}, "drop --norm/--kernel-size"),
        ("wideresnet", {"block": "basic-post"}, "basic blocks, the model has basic-post"),
        ("preactresnet", {"block": ("basic", "inverted", "basic")}, "the model has basic/inverted blocks"),
        ("preactresnet", {"activation": ("relu", "silu", "relu")}, "throughout, the model relu/silu"),
        ("dmwideresnet", {"activation": "gelu"}, "uses relu/silu"),
        ("preactresnet", {"block": "robust", "se": "standard"}, "--se standard"),
    ],
)
def test_design_space_knobs_no_upstream_class_has_are_refused(layout, changes, message):
    spec = replace(ArchSpec("basic", (1, 1, 1), (16, 32, 64)), **changes)
    with pytest.raises(ScalerError, match=message):
        check_spec(LAYOUTS[layout], spec, None)
    for family in (PRESETS["vgg-11"].spec, PRESETS["densenet-121"].spec):
        with pytest.raises(ScalerError, match="blocks, the model has (vgg|dense) blocks"):
            check_spec(LAYOUTS[layout], family, None)


def test_consistent_specs_pass():
    spec = ArchSpec("robust", (1, 1, 1), (16, 32, 64), mean=C10[0], std=C10[1], activation="silu")
    check_spec(LAYOUTS["preactresnet"], spec, C10)
    check_spec(LAYOUTS["preactresnet"], replace(spec, mean=None, std=None), ((0, 0, 0), (1, 1, 1)))  # identity
    check_spec(LAYOUTS["scaler"], replace(spec, padding="same"), None)


def test_detection_and_prefixes():
    assert strip_prefixes({"module._orig_mod.a": 1, "module._orig_mod.b": 2}) == {"a": 1, "b": 2}
    assert strip_prefixes({"module.a": 1, "b": 2}) == {"module.a": 1, "b": 2}
    with pytest.raises(ScalerError, match="unknown checkpoint layout"):
        detect({"features.0.weight": (1,), "classifier.weight": (1,)})
    for layout in LAYOUTS.values():
        assert detect(set(layout.signature()) | {"x"}) is layout


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


TINY = ["--block", "basic", "--depths", "1,1,1", "--channels", "16,32,64"]


@pytest.fixture
def tiny_wrn(tmp_path):
    """A WideResNet-layout (RobustBench names) checkpoint of a tiny basic model, wrapped as 'net'."""
    from scaler.builder import build_model

    torch.manual_seed(0)
    ours = build_model(ArchSpec("basic", (1, 1, 1), (16, 32, 64))).state_dict()
    state = {LAYOUTS["wideresnet"].upstream_key(k): v for k, v in ours.items()}
    path = tmp_path / "wrn.pt"
    torch.save({"net": state, "epoch": 99}, path)
    return path, state


def _one_line(code, out, err, message):
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert message in err, err
    assert "Traceback" not in out + err


@pytest.mark.parametrize(
    "mutate, args, message",
    [
        (lambda s: s.pop("block2.layer.0.conv1.weight"), [], "missing tensor block2.layer.0.conv1.weight"),
        (lambda s: s.update(extra=torch.zeros(3)), [], "unexpected tensor extra (shape [3])"),
        (lambda s: s.update({"fc.weight": torch.zeros(100, 64), "fc.bias": torch.zeros(100)}), [], "--classes 100"),
        (
            lambda s: s.update({"conv1.weight": torch.zeros(16, 3, 5, 5)}),
            [],
            "conv1.weight (our stem.weight): expected",
        ),
        (lambda s: None, ["--padding", "same"], "--padding symmetric"),
        (lambda s: None, ["--from", "dmwideresnet"], "--padding same"),
        (lambda s: None, ["--from", "nope"], "unknown checkpoint format"),
        (lambda s: s.update({"mu": torch.zeros(3, 1, 1)}), ["--from", "preactresnet"], "mu but no sigma"),
        (lambda s: None, ["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (lambda s: None, ["--dataset", "cifar100"], "--dataset cifar100 has 100 classes, the checkpoint 10"),
    ],
)
def test_bad_checkpoints_are_one_line_and_write_nothing(capsys, tmp_path, tiny_wrn, mutate, args, message):
    _, state = tiny_wrn
    state = dict(state)
    mutate(state)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    out = tmp_path / "runs" / "r"
    _one_line(*run(capsys, "import", path, *TINY, *args, "-o", out), message)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_unreadable_files_are_one_line(capsys, tmp_path, tiny_wrn):
    good, _ = tiny_wrn
    truncated = tmp_path / "trunc.pt"
    truncated.write_bytes(good.read_bytes()[:300])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], listed)
    unknown = tmp_path / "unknown.pt"
    torch.save({"features.weight": torch.zeros(1)}, unknown)
    pickled = tmp_path / "pickled.pt"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "args": argparse.Namespace(lr=0.1)}, pickled)
    for path, message in [
        (truncated, "truncated"),
        (garbage, "truncated"),
        (listed, "holds no state dict"),
        (unknown, "unknown checkpoint layout"),
        (pickled, "argparse.Namespace) that weights_only=True will not unpickle"),
        (tmp_path / "absent.pt", "not found"),
    ]:
        _one_line(*run(capsys, "import", path, *TINY, "-o", tmp_path / "r"), message)
    assert not (tmp_path / "r").exists()


def test_import_eval_finetune_export_through_the_cli(capsys, tmp_path, tiny_wrn):
    path, state = tiny_wrn
    run_dir = tmp_path / "imported"
    code, out, err = run(capsys, "import", path, *TINY, "-o", run_dir, "--dataset", "digits")
    assert code == 0, err
    assert "RobustBench WideResNet" in out and f"scaler eval {run_dir}" in out
    assert sorted(p.name for p in run_dir.iterdir()) == ["best.pt", "config.json", "model.py"]
    _one_line(*run(capsys, "import", path, *TINY, "-o", run_dir), "pass --force")
    assert run(capsys, "import", path, *TINY, "-o", run_dir, "--dataset", "digits", "--force")[0] == 0

    # the emitted file's own load_state_dict takes best.pt
    namespace = {}
    exec(compile((run_dir / "model.py").read_text(), "model.py", "exec"), namespace)
    net = namespace["build_model"]()
    net.load_state_dict(torch.load(run_dir / "best.pt", weights_only=True)["model"])
    assert torch.equal(net.stem.weight, state["conv1.weight"])

    code, out, err = run(capsys, "eval", run_dir, "--n", "16", "--attacks", "clean,fgsm", "--json", "--quiet")
    assert code == 0, err
    report = json.loads(out)
    assert report["checkpoint"]["imported"]["format"] == "wideresnet" and report["checkpoint"]["n"] == 16
    from trainers.data import load_split

    x, y = load_split("digits", "test")
    with torch.no_grad():
        expected = 100.0 * (net.eval()(x[:16]).argmax(1) == y[:16]).sum().item() / 16
    assert report["clean"]["accuracy"] == pytest.approx(expected)  # the imported weights, on digits

    _one_line(*run(capsys, "train", "--resume", "--out", run_dir), "--init-from")

    ft = tmp_path / "ft"
    code, out, err = run(
        capsys, "train", "--init-from", run_dir, "--dataset", "digits", "--epochs", "1", "--batch-size", "128",
        "--method", "standard", "--attack-steps", "0", "--lr", "1e-12", "--weight-decay", "0", "--val-n", "8",
        "--out", ft, "--quiet",
    )  # fmt: skip
    assert code == 0, err
    tuned = torch.load(ft / "last.pt", weights_only=True)["model"]
    assert torch.allclose(tuned["stem.weight"], state["conv1.weight"], atol=1e-9)  # started from the import
    assert json.loads((ft / "config.json").read_text())["init_from"] == str(run_dir.resolve())
    _one_line(
        *run(capsys, "train", "--init-from", run_dir, "wrn-a1", "--dataset", "digits", "--out", tmp_path / "x"),
        "does not fit",
    )
    _one_line(*run(capsys, "train", "--init-from", tmp_path / "nope", "--out", tmp_path / "x"), "no such run directory")

    exported = tmp_path / "rb.pt"
    code, out, err = run(capsys, "export", run_dir, "--to", "robustbench", "-o", exported)
    assert code == 0 and "WideResNet(depth=10, widen_factor=1, num_classes=10)" in out, err
    back = torch.load(exported, weights_only=True)
    assert list(back) == list(state) and all(torch.equal(back[k], state[k]) for k in state)
    _one_line(*run(capsys, "export", run_dir, "-o", exported), "--force")
    _one_line(*run(capsys, "export", run_dir, "--to", "dmwideresnet", "-o", tmp_path / "dm.pt"), "--padding same")
    assert not (tmp_path / "dm.pt").exists()


def test_export_picks_the_robustbench_class():
    def pick(spec):
        return export_target(spec, "robustbench")

    assert pick(PRESETS["wrn-34-10"].spec).layout.name == "wideresnet"
    assert pick(PRESETS["wrn-34-r"].spec).layout.name == "robustwideresnet"
    dm = pick(replace(PRESETS["wrn-70-16"].spec, **SILU_C10, padding="same"))
    assert dm.layout.name == "dmwideresnet" and "depth=70, width=16, activation_fn=Swish" in dm.constructor
    a1 = pick(PRESETS["robustresnet-a1"].spec)
    assert a1.layout.name == "preactresnet" and a1.norm_buffers  # RobustBench's class keeps mu/sigma
    with pytest.raises(ScalerError, match="DMWideResNet"):
        pick(replace(PRESETS["wrn-34-r"].spec, padding="same"))
    with pytest.raises(ScalerError, match="basic blocks"):
        export_target(PRESETS["robustresnet-a1"].spec, "wideresnet")


def test_import_into_model_files(capsys, tmp_path, tiny_wrn):
    """An emitted file carries its spec, so it is checked like one; a user's own file (no spec line)
    takes only checkpoints in its own names; spec-changing flags do not apply to files."""
    from scaler.codegen import emit

    path, state = tiny_wrn
    emitted = emit(ArchSpec("basic", (1, 1, 1), (16, 32, 64)), tmp_path / "net.py")
    code, _, err = run(capsys, "import", path, "--model", emitted, "-o", tmp_path / "a")
    assert code == 0, err
    assert (tmp_path / "a" / "model.py").read_text() == emitted.read_text()
    same = emit(ArchSpec("basic", (1, 1, 1), (16, 32, 64), padding="same"), tmp_path / "same.py")
    _one_line(*run(capsys, "import", path, "--model", same, "-o", tmp_path / "b"), "--padding symmetric")
    _one_line(*run(capsys, "import", path, "--model", emitted, "--padding", "same", "-o", tmp_path / "b"), "--padding")
    for flag, value in (("--kernel-size", "5"), ("--norm", "group"), ("--se", "none")):
        _one_line(
            *run(capsys, "import", path, "--model", emitted, flag, value, "-o", tmp_path / "b"), f"{flag} changes"
        )
    own = tmp_path / "own.py"
    own.write_text("\n".join(line for line in emitted.read_text().splitlines() if not line.startswith("spec: ")))
    _one_line(*run(capsys, "import", path, "--model", own, "-o", tmp_path / "b"), "carries no scaler spec")
    assert not (tmp_path / "b").exists()
    # a checkpoint of our own (wrapped as 'model', like the trainer's) into the user's own file
    ours = tmp_path / "ours.pt"
    torch.save({"model": torch.load(tmp_path / "a" / "best.pt", weights_only=True)["model"], "epoch": 3}, ours)
    code, out, err = run(capsys, "import", ours, "--model", own, "-o", tmp_path / "c", "--json")
    assert code == 0 and json.loads(out)["format"] == "scaler", err


def test_half_precision_and_pre_0_4_1_checkpoints_load(capsys, tmp_path, tiny_wrn):
    """fp16 tensors become the model's fp32; a checkpoint without any BatchNorm counter (saved before
    PyTorch 0.4.1) starts them at 0, but one missing only some is refused."""
    _, state = tiny_wrn
    old = {
        k: v.half() if v.is_floating_point() else v for k, v in state.items() if not k.endswith("num_batches_tracked")
    }
    path = tmp_path / "old.pt"
    torch.save(old, path)
    code, out, err = run(capsys, "import", path, *TINY, "-o", tmp_path / "r", "--json")
    assert code == 0, err
    assert json.loads(out)["zeroed_counters"] == 7  # 3 blocks x 2 BN + the head BN
    weights = torch.load(tmp_path / "r" / "best.pt", weights_only=True)["model"]
    assert weights["stem.weight"].dtype == torch.float32
    assert torch.equal(weights["stem.weight"], old["conv1.weight"].float())
    assert int(weights["bn.num_batches_tracked"]) == 0
    partial = dict(state)
    partial.pop("bn1.num_batches_tracked")
    torch.save(partial, path)
    _one_line(*run(capsys, "import", path, *TINY, "-o", tmp_path / "s"), "missing tensor bn1.num_batches_tracked")
