"""Derive the closed-form cost of every block symbolically (sympy) and write `_closed_forms.py`.

Each block is described once, below, as the list of layers its template builds, with symbolic
channels and resolutions. Layer costs follow fvcore's convention for an eval-mode forward pass:
  conv     Cout * Cin/groups * k^2 * Hout^2   (bias free)
  linear   in * out
  norm     2 * C * H^2                         (eval-mode BatchNorm with affine)
  pool     C * H^2                             (adaptive average pooling; fvcore skips avg_pool2d)
Summing and expanding gives polynomials with integer coefficients, emitted as plain Python so the
cost model evaluates them in microseconds without importing sympy. `tests/test_cost.py` checks
that the checked-in file equals a fresh derivation and that it equals fvcore on rendered models.

Regenerate with `python -m scaler.derive`.
"""

from __future__ import annotations

from pathlib import Path

import sympy as sp

OUTPUT = Path(__file__).with_name("_closed_forms.py")
KINDS = ("params", "conv", "linear", "norm", "pool")

# Symbols: channels and resolutions. `proj` is 1 when a block has a shortcut conv, else 0; the
# robust block evaluates its bn1 pre-activation only then (it feeds only the shortcut).
cin, cout, h, ho, proj = sp.symbols("cin cout h ho proj", integer=True, nonnegative=True)
w, wg, se, scales = sp.symbols("w wg se scales", integer=True, nonnegative=True)
classes, stem = sp.symbols("classes stem", integer=True, nonnegative=True)


def conv(c_in, c_out, k, res, per_group_in=None, times=1):
    fan_in = c_in if per_group_in is None else per_group_in
    weights = c_out * fan_in * k * k
    return {"params": times * weights, "conv": times * weights * res**2}


def norm(c, res, times=1, evaluated=1):
    return {"params": times * 2 * c, "norm": evaluated * times * 2 * c * res**2}


def linear(i, o, bias=False):
    return {"params": i * o + (o if bias else 0), "linear": i * o}


def pool(c, res):
    return {"pool": c * res**2}


def total(*layers) -> dict[str, sp.Expr]:
    out = {k: sp.Integer(0) for k in KINDS}
    for layer in layers:
        for k, v in layer.items():
            out[k] += v
    return {k: sp.expand(v) for k, v in out.items()}


def basic_block() -> dict[str, sp.Expr]:
    """Pre-activation WRN block, input cin x h x h, output cout x ho x ho."""
    return total(
        norm(cin, h),
        conv(cin, cout, 3, ho),
        norm(cout, ho),
        conv(cout, cout, 3, ho),
        {k: proj * v for k, v in conv(cin, cout, 1, ho).items()},
    )


def robust_block() -> dict[str, sp.Expr]:
    """RobustResBlock: split width w (wg = w / groups), mid = w * scales, SE hidden width se."""
    mid = w * scales
    return total(
        # bn1 exists always; its output feeds only the shortcut, so it runs only then.
        norm(cin, h, evaluated=proj),
        conv(cin, mid, 1, h),  # conv1 on the raw input, at the input resolution
        norm(mid, h),
        conv(w, w, 3, ho, per_group_in=wg, times=scales - 1),
        norm(w, ho, times=scales - 1),
        conv(mid, cout, 1, ho),
        norm(cout, ho),  # se_bn
        pool(cout, ho),  # SE squeeze
        linear(cout, se),
        linear(se, cout),
        {k: proj * v for k, v in conv(cin, cout, 1, ho).items()},
    )


def stem_layer() -> dict[str, sp.Expr]:
    return total(conv(3, stem, 3, h))


def head() -> dict[str, sp.Expr]:
    """BN -> act -> global average pool -> linear with bias, on cin x h x h."""
    return total(norm(cin, h), pool(cin, h), linear(cin, classes, bias=True))


PARTS = {
    "basic_block": (basic_block, ("cin", "cout", "h", "ho", "proj")),
    "robust_block": (robust_block, ("cin", "w", "wg", "scales", "se", "cout", "h", "ho", "proj")),
    "stem_layer": (stem_layer, ("stem", "h")),
    "head": (head, ("cin", "classes", "h")),
}


def render() -> str:
    lines = [
        '"""Closed-form block costs (params and fvcore flops by kind), derived by `scaler.derive`.',
        "",
        "Generated file: do not edit; regenerate with `python -m scaler.derive`.",
        "Each function returns (params, conv, linear, norm, pool) as polynomials in its arguments.",
        '"""',
        "",
    ]
    for fname, (fn, args) in PARTS.items():
        exprs = fn()
        lines += ["", f"def {fname}({', '.join(args)}):"]
        for kind in KINDS:
            lines.append(f"    {kind} = {sp.sstr(exprs[kind])}")
        lines.append(f"    return ({', '.join(KINDS)})")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
