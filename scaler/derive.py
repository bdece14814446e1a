"""Derive the closed-form cost of every layer group symbolically (sympy) and write `_closed_forms.py`.

Each block is described once, below, as the list of layers its template builds, with symbolic
channels, resolutions and knob-dependent unit costs. Layer costs follow fvcore's convention for an
eval-mode forward pass:
  conv     Cout * Cin/groups * k^2 * Hout^2   (a bias adds parameters, never flops)
  linear   in * out
  norm     nf * C * H^2, np * C parameters    (eval BatchNorm nf 2; GroupNorm/LayerNorm 5;
                                               InstanceNorm without affine 4 and np 0)
  pool     C * H^2                             (adaptive average pooling; fvcore skips avg/max_pool2d)
  act      ap parameters per module            (1 for PReLU; fvcore counts no activation)
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

# Channels and resolutions. `proj` is 1 when a block has a shortcut conv, else 0.
cin, cout, mid, h, ho, proj = sp.symbols("cin cout mid h ho proj", integer=True, nonnegative=True)
w, wg, nconv, k = sp.symbols("w wg nconv k", integer=True, nonnegative=True)
classes, stem, c, hidden, normed = sp.symbols("classes stem c hidden normed", integer=True, nonnegative=True)
n, g, j, tri = sp.symbols("n g j tri", integer=True, nonnegative=True)
# Knob-dependent unit costs: norm params per channel, norm flops per element, params per activation.
np_, nf, ap = sp.symbols("np nf ap", integer=True, nonnegative=True)
UNITS = ("k", "np", "nf", "ap")


def conv(c_in, c_out, ksize, res, per_group_in=None, times=1, bias=False):
    fan_in = c_in if per_group_in is None else per_group_in
    weights = c_out * fan_in * ksize * ksize
    return {"params": times * (weights + (c_out if bias else 0)), "conv": times * weights * res**2}


def norm(ch, res, times=1, evaluated=1):
    return {"params": times * np_ * ch, "norm": evaluated * times * nf * ch * res**2}


def act(times=1):
    return {"params": times * ap}


def linear(i, o, bias=False):
    return {"params": i * o + (o if bias else 0), "linear": i * o}


def pool(ch, res):
    return {"pool": ch * res**2}


def scaled(layer: dict, factor) -> dict:
    return {key: factor * v for key, v in layer.items()}


def total(*layers) -> dict[str, sp.Expr]:
    out = {key: sp.Integer(0) for key in KINDS}
    for layer in layers:
        for key, v in layer.items():
            out[key] += v
    return {key: sp.expand(v) for key, v in out.items()}


def basic_block() -> dict[str, sp.Expr]:
    """Pre-activation WRN block: norm-act-conv-norm-act-conv, shortcut conv on the pre-activation."""
    return total(
        norm(cin, h),
        act(),
        conv(cin, cout, k, ho),
        norm(cout, ho),
        act(),
        conv(cout, cout, k, ho),
        scaled(conv(cin, cout, 1, ho), proj),
    )


def basic_post_block() -> dict[str, sp.Expr]:
    """Post-activation ResNet block: conv-norm-act-conv-norm, + skip (conv-norm when projecting), act."""
    return total(
        conv(cin, cout, k, ho),
        norm(cout, ho),
        act(),
        conv(cout, cout, k, ho),
        norm(cout, ho),
        act(),
        scaled(total(conv(cin, cout, 1, ho), norm(cout, ho)), proj),
    )


def _bottleneck_core():
    """Layers every bottleneck shares: conv1 (1x1 to mid, at the input resolution), its norm,
    `nconv` grouped k x k convs of w channels with their norms, conv3 (1x1 mid -> cout), one act."""
    return [
        conv(cin, mid, 1, h),
        norm(mid, h),
        conv(w, w, k, ho, per_group_in=wg, times=nconv),
        norm(w, ho, times=nconv),
        conv(mid, cout, 1, ho),
        act(),
    ]


def bottleneck_block() -> dict[str, sp.Expr]:
    """Pre-activation bottleneck (RobustResBlock family) without its SE: bn1 exists always but
    runs only for the shortcut, whose conv reads it; conv1 reads the raw input."""
    return total(norm(cin, h, evaluated=proj), *_bottleneck_core(), scaled(conv(cin, cout, 1, ho), proj))


def bottleneck_post_block() -> dict[str, sp.Expr]:
    """Post-activation bottleneck without its SE: a norm after conv3, conv-norm shortcut."""
    return total(*_bottleneck_core(), norm(cout, ho), scaled(total(conv(cin, cout, 1, ho), norm(cout, ho)), proj))


def se_unit() -> dict[str, sp.Expr]:
    """Squeeze-and-excitation on c channels at res ho: GAP, FC(c, hidden), ReLU, FC back, no bias;
    `normed` adds the residual SE's norm in front."""
    return total(pool(c, ho), linear(c, hidden), linear(hidden, c), scaled(norm(c, ho), normed))


def inverted_block() -> dict[str, sp.Expr]:
    """Pre-activation inverted bottleneck (MobileNetV2): norm-act, 1x1 up to mid, norm-act,
    depthwise k x k, norm-act, 1x1 down to cout; shortcut conv on the pre-activation."""
    return total(
        norm(cin, h),
        conv(cin, mid, 1, h),
        norm(mid, h),
        conv(mid, mid, k, ho, per_group_in=1),
        norm(mid, ho),
        conv(mid, cout, 1, ho),
        act(),
        scaled(conv(cin, cout, 1, ho), proj),
    )


def vgg_layer() -> dict[str, sp.Expr]:
    """VGG: k x k conv with bias, norm, act."""
    return total(conv(cin, cout, k, h, bias=True), norm(cout, h), act())


def dense_stage() -> dict[str, sp.Expr]:
    """n DenseNet-BC layers (norm-act-1x1 conv to 4g, norm-act-k x k conv to g, concatenated) on
    cin input channels: layer j sees cin + j*g channels. Costs are linear in j, so the sum over
    j < n is n * cost(0) + tri * d cost / dj with tri = n (n - 1) / 2 (an integer argument, which
    keeps the coefficients integral)."""
    layer = total(
        norm(cin + j * g, h), act(), conv(cin + j * g, 4 * g, 1, h), norm(4 * g, h), act(), conv(4 * g, g, k, h)
    )
    assert all(sp.degree(v, j) <= 1 for v in layer.values())
    return {key: sp.expand(n * v.subs(j, 0) + tri * sp.diff(v, j)) for key, v in layer.items()}


def transition() -> dict[str, sp.Expr]:
    """DenseNet transition: norm-act-1x1 conv (the 2x2 average pool is free for fvcore)."""
    return total(norm(cin, h), act(), conv(cin, cout, 1, h))


def stem_layer() -> dict[str, sp.Expr]:
    return total(conv(3, stem, 3, h))


def head() -> dict[str, sp.Expr]:
    """norm -> act -> global average pool -> linear with bias, on cin x h x h."""
    return total(norm(cin, h), act(), pool(cin, h), linear(cin, classes, bias=True))


def vgg_head() -> dict[str, sp.Expr]:
    """VGG: global average pool (1x1 on CIFAR) -> linear with bias."""
    return total(pool(cin, h), linear(cin, classes, bias=True))


PARTS = {
    "basic_block": (basic_block, ("cin", "cout", "h", "ho", "proj", *UNITS)),
    "basic_post_block": (basic_post_block, ("cin", "cout", "h", "ho", "proj", *UNITS)),
    "bottleneck_block": (bottleneck_block, ("cin", "w", "wg", "nconv", "mid", "cout", "h", "ho", "proj", *UNITS)),
    "bottleneck_post_block": (
        bottleneck_post_block,
        ("cin", "w", "wg", "nconv", "mid", "cout", "h", "ho", "proj", *UNITS),
    ),
    "se_unit": (se_unit, ("c", "hidden", "ho", "normed", "np", "nf")),
    "inverted_block": (inverted_block, ("cin", "mid", "cout", "h", "ho", "proj", *UNITS)),
    "vgg_layer": (vgg_layer, ("cin", "cout", "h", *UNITS)),
    "dense_stage": (dense_stage, ("cin", "g", "n", "tri", "h", *UNITS)),
    "transition": (transition, ("cin", "cout", "h", "np", "nf", "ap")),
    "stem_layer": (stem_layer, ("stem", "h")),
    "head": (head, ("cin", "classes", "h", "np", "nf", "ap")),
    "vgg_head": (vgg_head, ("cin", "classes", "h")),
}


def render() -> str:
    lines = [
        '"""Closed-form layer-group costs (params and fvcore flops by kind), derived by `scaler.derive`.',
        "",
        "Generated file: do not edit; regenerate with `python -m scaler.derive`.",
        "Each function returns (params, conv, linear, norm, pool) as polynomials in its arguments.",
        '"""',
        "",
    ]
    for fname, (fn, args) in PARTS.items():
        exprs = fn()
        used = set().union(*(e.free_symbols for e in exprs.values()))
        assert {s.name for s in used} <= set(args), (fname, used)
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
