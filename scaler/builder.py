"""Build torch models from specs by rendering the templates and loading the result.

There is no second model implementation in Python: `build_model(spec)` executes exactly the source
`scaler emit` would write. `load_model_file(path)` and `build_from_source(source)` load any emitted
file or a user's own file with a `build_model()` function, through one loader (`call_build_model`)
that reports a broken file in one line.
"""

from __future__ import annotations

import hashlib
import inspect
import linecache
import sys
import traceback
import types
from pathlib import Path

from scaler.codegen import render
from scaler.errors import ScalerError
from scaler.spec import ArchSpec


def load_source(source: str, label: str = "model") -> types.ModuleType:
    """Execute model source as a module registered in `sys.modules` (so pickling/export can find
    its classes). The name is a content hash: the same source loads once. Its text is in linecache
    under the code's file name (`label`, or `label <hash>` where no file there holds it), so
    `inspect.getsource`, and with it `torch.jit.script`, finds it. Errors name the file and line."""
    digest = hashlib.sha1(source.encode()).hexdigest()[:16]
    name = "scaler_generated_" + digest
    if name in sys.modules:
        return sys.modules[name]
    module = types.ModuleType(name)
    module.__file__ = label
    filename = label if _holds(label, source) else f"{label} <{digest}>"
    if filename != label:
        linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    try:
        exec(compile(source, filename, "exec"), module.__dict__)
    except SyntaxError as exc:
        raise ScalerError(f"{label}, line {exc.lineno}: syntax error: {exc.msg}") from None
    except Exception as exc:  # a user's file: report, never trace back
        raise ScalerError(f"cannot import {label}{_where(exc, filename)}: {_one_line(exc)}") from None
    sys.modules[name] = module
    return module


def _holds(path: str, source: str) -> bool:
    try:
        return Path(path).read_text() == source
    except (OSError, UnicodeDecodeError, ValueError):
        return False


def call_build_model(module: types.ModuleType, num_classes: int | None, label: str):
    """`module.build_model(num_classes=...)`; without the argument only when the function's
    signature has no `num_classes` (a user's fixed-class file). The result must be an nn.Module."""
    import torch

    fn = getattr(module, "build_model", None)
    if not callable(fn):
        raise ScalerError(f"{label} defines no build_model() function")
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    takes_classes = "num_classes" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    try:
        model = fn(num_classes=num_classes) if takes_classes and num_classes is not None else fn()
    except Exception as exc:
        where = _where(exc, getattr(getattr(fn, "__code__", None), "co_filename", label))
        raise ScalerError(f"build_model() in {label} failed{where}: {_one_line(exc)}") from None
    if not isinstance(model, torch.nn.Module):
        raise ScalerError(f"build_model() in {label} returned {type(model).__name__}, not a torch nn.Module")
    return model


def build_from_source(source: str, num_classes: int | None, label: str = "model.py"):
    """A model from model-file source (a run directory's model.py, a checkpoint's copy)."""
    return call_build_model(load_source(source, label), num_classes, label)


def build_model(spec: ArchSpec, num_classes: int | None = None):
    """A freshly initialised torch model for `spec` (num_classes defaults to the spec's)."""
    return build_from_source(render(spec), num_classes or spec.num_classes, spec.name or spec.describe())


def load_model_file(path: str | Path, num_classes: int | None = None):
    """Import a model file and call its `build_model()`; one-line errors for a broken file."""
    path = Path(path)
    if not path.is_file():
        raise ScalerError(f"model file {path} not found")
    try:
        source = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ScalerError(f"cannot read model file {path}: {_one_line(exc)}") from None
    return build_from_source(source, num_classes, str(path))


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _where(exc: BaseException, label: str) -> str:
    """', line N' of the innermost frame inside the user's file, if any."""
    lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if f.filename == label]
    return f", line {lines[-1]}" if lines else ""
