import json

import pytest

from scaler.errors import ScalerError
from scaler.spec import ArchSpec, widths_to_planes


def test_json_round_trip_keeps_everything():
    spec = ArchSpec(
        "robust",
        (14, 14, 7),
        (80, 224, 192),
        activation="silu",
        num_classes=100,
        resolution=64,
        mean=(0.5, 0.4, 0.3),
        std=(0.2, 0.2, 0.2),
        name="a1-silu",
    )
    again = ArchSpec.from_json(spec.to_json())
    assert again == spec and again.name == spec.name
    assert json.loads(spec.to_json())["planes"] == [80, 224, 192]


def test_widths_are_the_derived_view():
    spec = ArchSpec("basic", (5, 5, 5), (40, 80, 64))
    assert spec.widths == (2.5, 2.5, 1)
    assert spec.channels == (16, 40, 80, 64)
    assert widths_to_planes((5, 7, 3)) == (80, 224, 192)
    with pytest.raises(ScalerError, match="whole channels"):
        widths_to_planes((5.01, 7, 3))


def test_spec_is_immutable():
    spec = ArchSpec("basic", (1, 1, 1), (16, 32, 64))
    with pytest.raises(AttributeError):
        spec.depths = (2, 2, 2)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"block": "densenet"}, "unknown block"),
        ({"depths": (0, 1, 1)}, "depth >= 1"),
        ({"depths": (1, 1)}, "3 values"),
        ({"planes": (16, -1, 64)}, "channels >= 1"),
        ({"planes": (16, 32.5, 64)}, "whole numbers"),
        ({"block": "robust", "planes": (15, 32, 64)}, "planes >= 16"),
        ({"activation": "tanh"}, "unknown activation"),
        ({"num_classes": 1}, "num_classes"),
        ({"mean": (0.5, 0.5, 0.5)}, "both mean and std"),
        ({"mean": (0.5, 0.5, 0.5), "std": (0.1, 0, 0.1)}, "std values"),
        ({"name": 'x"""; import os'}, "may hold only"),
        ({"strides": (1, 3, 2)}, "strides"),
    ],
)
def test_validation_messages(kwargs, message):
    base = {"block": "basic", "depths": (1, 1, 1), "planes": (16, 32, 64)}
    with pytest.raises(ScalerError, match=message):
        ArchSpec(**{**base, **kwargs})


def test_from_json_rejects_garbage():
    with pytest.raises(ScalerError, match="not valid JSON"):
        ArchSpec.from_json("{nope")
    with pytest.raises(ScalerError, match="unknown spec field"):
        ArchSpec.from_json('{"block": "basic", "depths": [1,1,1], "planes": [16,32,64], "evil": 1}')
    with pytest.raises(ScalerError, match="missing"):
        ArchSpec.from_json('{"block": "basic"}')


def test_knobs_round_trip_and_uniform_lists_collapse():
    spec = ArchSpec(
        ("basic", "robust-post", "robust"),
        (1, 2, 3),
        (16, 64, 64),
        activation=["relu", "prelu", "silu"],
        norm=("group", "group", "group"),
        kernel_size=(3, 5, 7),
        scales=(1, 1, 4),
        se=("none", "standard", "conv3x3"),
        se_reduction=4,
    )
    assert spec.norm == "group" and spec.kernel_size == (3, 5, 7)  # a uniform list is one value
    again = ArchSpec.from_json(spec.to_json())
    assert again == spec and again.knobs == spec.knobs
    assert json.loads(spec.to_json())["activation"] == ["relu", "prelu", "silu"]
    assert spec.stage_knobs(1).block == "robust-post" and spec.stage_knobs(1).se == "standard"
    assert spec.out_channels == 256  # the bottleneck's 4 x P3


def test_old_spec_json_without_knobs_loads_as_the_published_model():
    from scaler.presets import PRESETS

    old = (
        '{"activation": "relu", "block": "robust", "depths": [14, 14, 7], "mean": null, "name": "a1", '
        '"num_classes": 10, "planes": [80, 224, 192], "resolution": 32, "std": null, "stem": 16, "strides": [1, 2, 2]}'
    )
    spec = ArchSpec.from_json(old)
    assert spec == PRESETS["robustresnet-a1"].spec
    assert (spec.scales, spec.base_width, spec.cardinality, spec.se, spec.se_reduction) == (8, 10, 4, "residual", 64)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"block": "robust", "norm": "group"}, "normalises 4 channels"),  # w = 4 at P 16
        ({"block": "basic", "planes": (16, 25, 64), "norm": "group"}, "divisible"),  # 25 // 8 = 3 groups
        ({"block": "robust", "se_reduction": 128}, "no hidden unit"),
        ({"block": "robust", "se": "identity", "se_reduction": 32}, "identity SE"),
        ({"block": "robust", "base_width": 5}, "planes >= 32"),
        ({"block": "basic", "scales": 4}, "--scales applies to the bottleneck blocks"),
        ({"kernel_size": 4}, "one of 1, 3, 5, 7"),
        ({"norm": "weight"}, "unknown norm"),
        ({"se": "squeeze"}, "unknown se"),
        ({"block": ("basic", "robust")}, "1 or 3 values"),
        ({"block": ("vgg", "basic", "basic")}, "one --block for all stages"),
        ({"block": "vgg"}, "5 values"),
        ({"block": "dense", "depths": (1, 1, 1, 1), "planes": (8, 8, 8, 8), "stem": 8}, "stem and strides"),
        ({"growth": 12}, "dense block"),
        ({"block": "vgg", "depths": (1,) * 5, "planes": (8,) * 5, "resolution": 16}, ">= 32 pixels"),
    ],
)
def test_knob_validation_messages(kwargs, message):
    base = {"block": "basic", "depths": (1, 1, 1), "planes": (16, 32, 64)}
    with pytest.raises(ScalerError, match=message):
        ArchSpec(**{**base, **kwargs})


@pytest.mark.parametrize("knobs", [{"se": "residual"}, {"scales": 8, "se_reduction": 64}])
def test_bottleneck_knobs_given_at_their_defaults_to_a_basic_spec_are_refused(knobs):
    """A spec cannot tell a default from a value given; get_spec (the API and the CLI) can."""
    import scaler

    base = {"block": "basic", "depths": [1, 1, 1], "planes": [16, 32, 64]}
    with pytest.raises(ScalerError, match="to the bottleneck blocks"):
        scaler.get_spec(base, **knobs)
    robust = scaler.get_spec({**base, "block": ["basic", "robust", "basic"]}, **knobs)
    assert robust.se == "residual" and robust.scales == 8


def test_spec_from_flags_is_the_python_api_the_cli_calls():
    """The spec a command's flags describe comes from scaler.api.spec_from_flags: the same spec
    from Python as from `scaler count --json`, its refusals one line each."""
    import json

    import pytest

    from scaler.api import spec_from_flags
    from scaler.errors import ScalerError
    from scaler_cli.app import main

    spec = spec_from_flags(block="robust", depths=(2, 2, 1), widths=(1, 1, 1), se=None, classes=100)
    assert spec.num_classes == 100 and spec.planes == (16, 32, 64)
    assert spec_from_flags(block="basic", depths=(1, 1, 1), channels=(32, 16, 32, 64)).stem == 32
    assert spec_from_flags(block="basic", depths=(1, 1, 1), widths=(1, 1, 1), normalize="cifar10").mean is not None
    for bad, message in [
        (dict(block="basic", depths=(1, 1, 1)), "give a preset name, or --block"),
        (dict(block="basic", depths=(1, 1, 1), widths=(1, 1, 1), channels=(16, 32, 64)), "not both"),
        (dict(block="basic", depths=(1, 1, 1), widths=(1, 1, 1), mean=(0.5,) * 3), "both --mean and --std"),
    ]:
        with pytest.raises(ScalerError, match=message):
            spec_from_flags(**bad)
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["count", "--block", "robust", "--depths", "2,2,1", "--widths", "1,1,1", "--json"]) == 0
    counted = json.loads(out.getvalue())
    from scaler.cost import count

    assert counted["params"] == count(spec_from_flags(block="robust", depths=(2, 2, 1), widths=(1, 1, 1))).params
