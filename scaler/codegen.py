"""Render a spec to standalone PyTorch source through the Jinja templates, and write it safely.

The templates in the top-level `templates/` folder are the project's only model implementation:
the cost-model tests, the trainer and `scaler emit` all use what `render` returns. Only validated
numbers and fixed identifiers reach the templates, so no spec can inject code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from scaler.cost import count
from scaler.errors import ScalerError
from scaler.fileio import write_text_atomic
from scaler.spec import ArchSpec

BLOCK_TEMPLATES = {"basic": ("basic_block.py.j2", "BasicBlock"), "robust": ("robust_block.py.j2", "RobustResBlock")}
NETWORK_CLASSES = {"basic": "WideResNet", "robust": "RobustResNet"}
ACTIVATIONS = {"relu": "nn.ReLU(inplace=True)", "silu": "nn.SiLU()"}


def templates_dir() -> Path:
    """`templates/` inside an installed wheel (scaler/templates) or at the source tree's root."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "templates", here.parent / "templates"):
        if (candidate / "network.py.j2").is_file():
            return candidate
    raise ScalerError(f"model templates not found next to {here} (broken install?)")


@lru_cache(maxsize=1)
def _environment():
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(templates_dir())),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        autoescape=False,
    )


@dataclass(frozen=True)
class Provenance:
    """Where a spec came from, for the emitted docstring."""

    rule: str = "manual"
    budget: str = "none"


def render(spec: ArchSpec, provenance: Provenance | None = None) -> str:
    """The complete source of a standalone model file for `spec`; deterministic."""
    from scaler import __version__

    provenance = provenance or Provenance(rule=f"preset {spec.name}" if spec.name else "manual")
    block_template, block_class = BLOCK_TEMPLATES[spec.block]
    cost = count(spec)
    title = f"{spec.name or NETWORK_CLASSES[spec.block]}: {spec.describe()}, {cost.params / 1e6:.2f}M params, "
    title += f"{cost.flops / 1e9:.3f}G FLOPs."
    summary = (
        f"{'RobustResNet' if spec.block == 'robust' else 'Pre-activation WideResNet'}: depths "
        f"{'-'.join(map(str, spec.depths))}, planes {'-'.join(map(str, spec.planes))}, stem {spec.stem}."
    )
    text = (
        _environment()
        .get_template("network.py.j2")
        .render(
            title=title,
            summary=summary,
            version=__version__,
            block_template=block_template,
            block_class=block_class,
            class_name=NETWORK_CLASSES[spec.block],
            rule=provenance.rule,
            budget=provenance.budget,
            params=cost.params,
            flops=cost.flops,
            resolution=spec.resolution,
            spec_json=json.dumps(spec.to_dict(), sort_keys=True),
            act=ACTIVATIONS[spec.activation],
            normalize=spec.mean is not None,
            same_padding=spec.padding == "same",
            mean=list(spec.mean) if spec.mean else None,
            std=list(spec.std) if spec.std else None,
            stem=spec.stem,
            stages=spec.stage_plan(),
            out_channels=spec.out_channels,
            num_classes=spec.num_classes,
        )
    )
    return text


def write_atomic(path: Path, text: str, *, force: bool = False, parents: bool = False) -> Path:
    """Write `text` to `path` via a temp file + rename: the target is whole or untouched."""
    return write_text_atomic(path, text, force=force, parents=parents)


def emit(spec: ArchSpec, path: Path | str, *, provenance: Provenance | None = None, force=False, parents=False):
    """Render `spec` and write it to `path` atomically; refuses to overwrite unless `force`."""
    try:
        return write_atomic(Path(path), render(spec, provenance), force=force, parents=parents)
    except OSError as exc:
        raise ScalerError(f"cannot write {path}: {exc.strerror or exc}") from None


_SPEC_LINE = re.compile(r"^spec: (\{.*\})$", re.MULTILINE)


def embedded_spec(source: str) -> ArchSpec | None:
    """The spec a file rendered here records on its `spec:` line; None for other files."""
    m = _SPEC_LINE.search(source)
    if m is None:
        return None
    try:
        return ArchSpec.from_json(m.group(1))
    except ScalerError:
        return None
