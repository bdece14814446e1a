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
