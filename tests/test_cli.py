"""The CLI as a user meets it: outputs, JSON shape, and one-line errors for bad input."""

import json

import pytest

from scaler.presets import PRESETS
from scaler_cli.app import main


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_count_json_for_every_preset(capsys, name):
    code, out, _ = run(capsys, "count", name, "--json")
    data = json.loads(out)
    assert code == 0
    assert data["name"] == name and data["block"] == PRESETS[name].spec.block
    stages = PRESETS[name].spec.n_stages
    assert len(data["depths"]) == stages and len(data["widths"]) == stages
    assert len(data["channels"]) == (4 if PRESETS[name].spec.family == "resnet" else stages)
    assert isinstance(data["params"], int) and isinstance(data["flops"], int)
    spec = PRESETS[name].spec
    # The head's share is known in closed form: fc MACs and the global average pool's reads at the
    # last stage's resolution (residual: strides 1, 2, 2; VGG: five max-pools; DenseNet: three
    # transitions); blocks with a squeeze-and-excitation add their FCs and pools on top.
    last = {"resnet": spec.resolution // 4, "vgg": spec.resolution >> 5, "densenet": spec.resolution >> 3}[spec.family]
    head_linear, head_pool = spec.out_channels * spec.num_classes, spec.out_channels * last**2
    if not any(k.bottleneck and k.se != "none" for k in spec.knobs):
        assert (data["breakdown"]["linear"], data["breakdown"]["pool"]) == (head_linear, head_pool)
    else:
        assert data["breakdown"]["linear"] > head_linear and data["breakdown"]["pool"] > head_pool
    assert data["breakdown"]["conv"] > data["flops"] // 2


def test_count_by_flags_equals_preset(capsys):
    _, a, _ = run(capsys, "count", "--block", "robust", "--depths", "14,14,7", "--widths", "5,7,3", "--json")
    _, b, _ = run(capsys, "count", "--block", "robust", "--depths", "14,14,7", "--channels", "80,224,192", "--json")
    assert json.loads(a)["params"] == json.loads(b)["params"] == 19_222_738
    assert json.loads(a)["name"] is None


def test_zoo_lists_everything_and_explains_wrn_28_10(capsys):
    code, out, _ = run(capsys, "zoo")
    assert code == 0
    for name in PRESETS:
        assert name in out
    assert "5.20G" in out and "quoting discrepancy" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["count", "robustresnt-a1"], "did you mean 'robustresnet-a1'"),
        (["count", "--block", "basic", "--depths", "1,2", "--widths", "1,1,1"], "3 comma-separated"),
        (["count", "--block", "basic", "--depths", "a,b,c", "--widths", "1,1,1"], "whole numbers"),
        (["count", "--block", "basic", "--depths", "0,0,0", "--widths", "1,1,1"], ">= 1"),
        (["count", "--block", "basic", "--depths", "1,1,1", "--widths", "-1,1,1"], ">="),
        (["count", "--block", "robust", "--depths", "1,1,1", "--channels", "8,32,64"], "planes >= 16"),
        (["count", "--block", "basic", "--depths", "1,1,1"], "--widths"),
        (["count", "--block", "basic", "--depths", "1,1,1", "--widths", "1,1,1", "--activation", "tanh"], "activation"),
        (["count", "--nope"], "No such option"),
        (["solve", "--flops", "10X"], "not a number"),
        (["solve", "--flops", "-5G"], "negative"),
        (["solve", "--flops", "0"], "> 0"),
        (["solve", "--flops", "abc"], "not a number"),
        (["solve", "--flops", "nan"], "not a number"),
        (["solve", "--flops", "inf"], "not a number"),
        (["solve", "--flops", "1e400"], "out of range"),
        (["solve", "--flops", ""], "empty"),
        (["solve", "--flops", "1M"], "smallest network costs"),
        (["solve", "--flops", "10G", "--rule", "magic"], "unknown rule"),
        (["solve", "--flops", "10G", "--params", "40M"], "one target"),
        (["solve"], "give a budget"),
        (["solve", "--flops", "1e17"], "beyond"),
        (["emit", "wrn-a1"], "-o PATH"),
        # Invalid knob combinations: one line from every command.
        (["count", "--block", "robust", "--depths", "1,1,1", "--widths", "1,1,1", "--norm", "group"], "4 channels"),
        (["count", "--block", "basic", "--depths", "1,1,1", "--widths", "1,1,1", "--scales", "4"], "bottleneck"),
        (["count", "--block", "basic", "--depths", "1,1,1", "--widths", "1,1,1", "--kernel-size", "4"], "1, 3, 5, 7"),
        (["count", "--block", "basic,robust", "--depths", "1,1,1", "--widths", "1,1,1"], "1 or 3 values"),
        (["count", "--block", "basic", "--depths", "1,1,1", "--widths", "1,1,1", "--se", "none"], "bottleneck"),
        (["count", "--block", "basic", "--depths", "1,1,1", "--widths", "1,1,1", "--se", "residual"], "--se applies"),
        (["count", "--block", "robust", "--depths", "1,1,1", "--widths", "1,1,1", "--se", "x"], "unknown se"),
        (["count", "--block", "vgg", "--depths", "1,1,2,2,2", "--widths", "1,1,1"], "--channels"),
        (["count", "--block", "basic", "--depths", "1,1,1", "--widths", "1,1,1", "--norm", "a,b,c,d,e,f"], "one per"),
        (["count", "--block", "basic", "--depths", "1,1,1", "--widths", "1,1,1", "--scales", "x"], "whole numbers"),
        (["emit", "robustresnet-a1", "--se-reduction", "1000", "-o", "x.py"], "no hidden unit"),
        (["solve", "--flops", "5G", "--se-reduction", "100000"], "no hidden unit"),
        (["solve", "--flops", "1G", "--block", "basic", "--se", "residual"], "--se applies to the bottleneck"),
        (["solve", "--flops", "5G", "--arch", "vgg11"], "robustwrn rule"),
        (["solve", "--params", "4M", "--rule", "robustwrn", "--arch", "vgg12"], "unknown --arch"),
        (["solve", "--params", "4M", "--rule", "robustwrn", "--arch", "vgg11", "--block", "robust"], "vgg block"),
        (["solve", "--flops", "5G", "--rule", "uniform", "--block", "dense"], "--rule robustwrn --arch densenet121"),
        (["solve", "--flops", "0.01G", "--norm", "group"], "too small"),
        (
            ["train", "--block", "robust", "--depths", "1,1,1", "--widths", "1,1,1", "--norm", "group", "--out", "r"],
            "4 ch",
        ),
    ],
)
def test_bad_input_is_one_line(capsys, args, message):
    code, out, err = run(capsys, *args)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert message in err
    assert "Traceback" not in err + out


def test_solve_json_has_the_promised_keys(capsys):
    code, out, _ = run(capsys, "solve", "--flops", "10G", "--json")
    data = json.loads(out)
    for key in (
        "rule",
        "block",
        "depths",
        "widths",
        "channels",
        "params",
        "flops",
        "target",
        "r_d",
        "continuous",
        "published",
    ):
        assert key in data
    assert code == 0 and data["published"] == "robustresnet-a2"


def test_solve_text_and_compare(capsys):
    code, out, _ = run(capsys, "solve", "--flops", "5G")
    assert code == 0 and "14,14,7" in out and "robustresnet-a1" in out and "identical" in out
    code, out, _ = run(capsys, "compare", "--flops", "10G")
    assert code == 0
    for rule in ("robustscaling", "robustwrn", "uniform"):
        assert rule in out


def test_solve_emit_writes_a_model(capsys, tmp_path):
    path = tmp_path / "m.py"
    code, out, _ = run(capsys, "solve", "--params", "4.27M", "--rule", "robustwrn", "--emit", str(path))
    assert code == 0 and "rule: robustwrn" in path.read_text() and "budget: 4.270M params" in path.read_text()
    code, _, err = run(capsys, "solve", "--params", "4.27M", "--rule", "robustwrn", "--emit", str(path))
    assert code == 2 and "--force" in err


def test_solve_path_imports_no_torch():
    import subprocess
    import sys

    code = (
        "import sys; from scaler_cli.app import main; main(['solve', '--flops', '10G', '--json']); "
        "bad = [m for m in ('torch', 'fvcore', 'sympy') if m in sys.modules]; "
        "assert not bad, bad"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_table_1_bottleneck_row_by_flags(capsys):
    """The issue's command: the plain bottleneck at D 11, W 16 prints as 265M / 39.0G."""
    args = ["count", "--block", "robust", "--scales", "1", "--cardinality", "1", "--base-width", "160"]
    code, out, _ = run(capsys, *args, "--se", "none", "--depths", "11,11,11", "--widths", "16,16,16", "--json")
    data = json.loads(out)
    assert code == 0 and round(data["params"] / 1e6) == 265 and round(data["flops"] / 1e8) == 390
    assert data["params"] == scaler_count("ablation-bottleneck").params
    assert data["knobs"]["scales"] == 1 and data["knobs"]["se"] == "none"


def scaler_count(name):
    from scaler.cost import count

    return count(PRESETS[name].spec)


def test_per_stage_lists_reach_the_spec(capsys):
    args = ["count", "--block", "basic,basic,robust", "--depths", "2,2,1", "--widths", "1,1,1", "--json"]
    code, out, _ = run(capsys, *args, "--activation", "relu,silu,prelu", "--kernel-size", "3,5,7", "--scales", "4")
    data = json.loads(out)
    from scaler.cost import count
    from scaler.spec import ArchSpec

    spec = ArchSpec(
        ("basic", "basic", "robust"),
        (2, 2, 1),
        (16, 32, 64),
        activation=("relu", "silu", "prelu"),
        kernel_size=(3, 5, 7),
        scales=4,
    )
    assert code == 0 and data["params"] == count(spec).params and data["flops"] == count(spec).flops
    assert data["block"] == ["basic", "basic", "robust"] and data["knobs"]["kernel_size"] == [3, 5, 7]


def test_preset_with_changed_knobs_drops_the_published_numbers(capsys):
    code, out, _ = run(capsys, "count", "robustresnet-a1", "--norm", "group", "--json")
    data = json.loads(out)
    assert code == 0 and data["published"] is None and data["knobs"]["norm"] == "group"
    code, out, _ = run(capsys, "count", "robustresnet-a1", "--json")
    assert json.loads(out)["published"]["params"] == 19.2e6


def test_zoo_lists_the_ablations_and_other_architectures_with_published_numbers(capsys):
    code, out, _ = run(capsys, "zoo")
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "265.000M" in lines["ablation-bottleneck"] and "39.000G" in lines["ablation-bottleneck"]
    assert "5.830M" in lines["vgg-11-r"] and "5,830,475" in lines["vgg-11-r"]
    assert "6.000M" in lines["densenet-121-r"] and "5,999,686" in lines["densenet-121-r"]
    for name in ("ablation-aggregated", "ablation-residual-se", "ablation-se-conv3x3-r16"):
        assert lines[name].rstrip().endswith("*") and f"* {name}:" in out


@pytest.mark.parametrize(
    "args",
    [
        ["solve", "--params", "4M", "--rule", "robustwrn", "--arch", "vgg11", "--json"],
        ["solve", "--flops", "5G", "--block", "robust-post", "--norm", "group", "--resolution", "64", "--json"],
    ],
)
def test_solve_with_knobs_and_architectures_imports_no_torch(args):
    import subprocess
    import sys

    code = (
        f"import sys; from scaler_cli.app import main; assert main({args!r}) == 0; "
        "bad = [m for m in ('torch', 'fvcore', 'sympy') if m in sys.modules]; "
        "assert not bad, bad"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_version_and_short_help(capsys):
    from scaler import __version__

    assert run(capsys, "--version")[:2] == (0, f"scaler {__version__}\n")
    code, out, _ = run(capsys, "count", "-h")
    assert code == 0 and "--block" in out and "--json" in out


@pytest.mark.parametrize("name", ["train", "eval", "count", "emit", "solve"])
def test_every_option_is_described(name):
    import typer

    from scaler_cli.app import _register, app

    _register()
    command = typer.main.get_command(app).commands[name]
    undescribed = [p.name for p in command.params if not getattr(p, "help", None)]
    assert not undescribed
    if name == "train":  # defaults come from TrainConfig, shown in the help
        helps = {p.name: p.help for p in command.params}
        assert "[default: 100]" in helps["epochs"] and "[default: 8/255]" in helps["eps"]


def test_every_training_option_is_a_trainconfig_field_declared_once():
    """The train options are made from TrainConfig's fields (their help, default and flag live
    beside the field): a field that declares an option is a flag of `scaler train` and `sweep`,
    with its default in the help where shown, and none is declared twice."""
    from dataclasses import fields

    from scaler_cli.options import TRAIN_OPTIONS
    from trainers.config import TrainConfig

    declared = [f.name for f in fields(TrainConfig) if "help" in f.metadata]
    assert [o.name for o in TRAIN_OPTIONS] == declared and len(set(declared)) == len(declared)
    by_name = {o.name: o for o in TRAIN_OPTIONS}
    assert by_name["lr"].help.endswith("[default: 0.1]")
    assert by_name["fused"].decls == ("--fused/--no-fused",)
    assert by_name["wd_exclude_bn_bias"].decls == ("--wd-exclude-bn-bias/--wd-all",)
    assert by_name["eps"].parse("8/255") == pytest.approx(8 / 255)
    assert by_name["milestones"].parse("75,90") == (75, 90)
