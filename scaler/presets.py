"""Registry of published models, with the numbers their papers print beside our exact counts.

Like timm's registry: one name per model, `get_preset(name)` to look it up, a did-you-mean for
typos. Published params/FLOPs are the papers' figures (FLOPs there mean multiply-adds); `None`
where the paper prints none.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from scaler.errors import ScalerError
from scaler.spec import ArchSpec

SEED_000 = (
    "Huang et al., Exploring Architectural Ingredients of Adversarially Robust Deep Neural Networks (NeurIPS 2021)"
)
SEED_001 = "Huang et al., Revisiting Residual Networks for Adversarial Robustness (CVPR 2023)"


@dataclass(frozen=True)
class Preset:
    name: str
    spec: ArchSpec
    source: str
    table: str
    published_params: float | None = None
    published_flops: float | None = None
    note: str | None = None


WRN_28_10_NOTE = (
    "the paper prints 5.20G FLOPs, which no counter reproduces (all give 5.243-5.253G) while the "
    "params match exactly: a quoting discrepancy, not a different model; our count is not adjusted"
)


def _wrn(name, depth, k, params, flops, table, note=None) -> Preset:
    n = (depth - 4) // 6
    planes = (16 * k, 32 * k, 64 * k)
    return Preset(name, ArchSpec("basic", (n, n, n), planes, name=name), SEED_001, table, params, flops, note)


def _ab(name, block, depths, widths, params, flops, table) -> Preset:
    planes = (16 * widths[0], 32 * widths[1], 64 * widths[2])
    return Preset(name, ArchSpec(block, depths, planes, name=name), SEED_001, table, params, flops)


def _gamma(gamma: str, params: float) -> Preset:
    g = float(gamma)
    planes = (int(160 * g), int(320 * g), int(256 * g))
    name = f"robustwrn-g{gamma}"
    return Preset(
        name, ArchSpec("basic", (5, 5, 5), planes, name=name), SEED_000, "Table 1 (w 10-10-4 family)", params, None
    )


_A_CONFIGS = {
    "a1": ((14, 14, 7), (5, 7, 3), 19.2e6, 5.11e9),
    "a2": ((17, 17, 8), (7, 9, 4), 39.0e6, 10.8e9),
    "a3": ((22, 22, 11), (8, 11, 5), 75.9e6, 19.9e9),
    "a4": ((27, 28, 13), (10, 14, 6), 147e6, 39.4e9),
}

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        _wrn("wrn-28-10", 28, 10, 36.5e6, 5.20e9, "Table 6", WRN_28_10_NOTE),
        _wrn("wrn-34-10", 34, 10, 46.2e6, 6.66e9, "Table 6"),
        _wrn("wrn-34-12", 34, 12, 66.5e6, 9.60e9, "Table 6"),
        _wrn("wrn-46-14", 46, 14, 128e6, 18.6e9, "Table 6"),
        _wrn("wrn-70-16", 70, 16, 267e6, 38.8e9, "Table 6"),
        Preset(
            "wrn-34-r",
            ArchSpec("basic", (5, 5, 5), (320, 640, 512), name="wrn-34-r"),
            SEED_000,
            "WRN-34-R (w 20-20-8)",
            68.1e6,
            19.1e9,
        ),
        *(_ab(f"robustresnet-{k}", "robust", d, w, p, f, "Table 6") for k, (d, w, p, f) in _A_CONFIGS.items()),
        *(
            _ab(f"wrn-{k}", "basic", d, w, 147e6 if k == "a4" else None, 40.4e9 if k == "a4" else None, "Table 6")
            for k, (d, w, _, _) in _A_CONFIGS.items()
        ),
        _gamma("0.25", 1.07e6),
        _gamma("0.5", 4.27e6),
        _gamma("1", 17.05e6),
        _gamma("1.5", 38.33e6),
        _gamma("2", 68.12e6),
    ]
}


def get_preset(name: str) -> Preset:
    key = name.strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    close = difflib.get_close_matches(key, PRESETS, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(PRESETS)}"
    raise ScalerError(f"unknown model {name!r}{hint}")
