"""Build torch models from specs by rendering the templates and loading the result.

There is no second model implementation in Python: `build_model(spec)` executes exactly the source
`scaler emit` would write. `load_model_file(path)` loads any emitted file (or a user's own file
with a `build_model()` function).
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import types
from pathlib import Path

from scaler.codegen import render
from scaler.errors import ScalerError
from scaler.spec import ArchSpec


def load_source(source: str, label: str = "model") -> types.ModuleType:
    """Execute model source as a module registered in `sys.modules` (so pickling/export can find
    its classes). The name is a content hash: the same source loads once."""
    name = "scaler_generated_" + hashlib.sha1(source.encode()).hexdigest()[:16]
    if name in sys.modules:
        return sys.modules[name]
    module = types.ModuleType(name)
    module.__file__ = f"<{label}>"
    exec(compile(source, f"<{label}>", "exec"), module.__dict__)
    sys.modules[name] = module
    return module


def build_model(spec: ArchSpec, num_classes: int | None = None):
    """A freshly initialised torch model for `spec` (num_classes defaults to the spec's)."""
    module = load_source(render(spec), spec.name or spec.describe())
    return module.build_model(num_classes=num_classes or spec.num_classes)


def load_model_file(path: str | Path, num_classes: int | None = None):
    """Import a model file and call its `build_model()`; a clear error when it has none."""
    path = Path(path)
    if not path.is_file():
        raise ScalerError(f"model file {path} not found")
    spec = importlib.util.spec_from_file_location(f"scaler_user_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # a user's file: report, never trace back
        raise ScalerError(f"cannot import {path}: {type(exc).__name__}: {exc}") from None
    if not callable(getattr(module, "build_model", None)):
        raise ScalerError(f"{path} defines no build_model() function")
    return module.build_model(num_classes) if num_classes else module.build_model()
