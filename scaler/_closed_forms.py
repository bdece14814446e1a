"""Closed-form block costs (params and fvcore flops by kind), derived by `scaler.derive`.

Generated file: do not edit; regenerate with `python -m scaler.derive`.
Each function returns (params, conv, linear, norm, pool) as polynomials in its arguments.
"""


def basic_block(cin, cout, h, ho, proj):
    params = cin*cout*proj + 9*cin*cout + 2*cin + 9*cout**2 + 2*cout
    conv = cin*cout*ho**2*proj + 9*cin*cout*ho**2 + 9*cout**2*ho**2
    linear = 0
    norm = 2*cin*h**2 + 2*cout*ho**2
    pool = 0
    return (params, conv, linear, norm, pool)


def robust_block(cin, w, wg, scales, se, cout, h, ho, proj):
    params = cin*cout*proj + cin*scales*w + 2*cin + cout*scales*w + 2*cout*se + 2*cout + 9*scales*w*wg + 4*scales*w - 9*w*wg - 2*w
    conv = cin*cout*ho**2*proj + cin*h**2*scales*w + cout*ho**2*scales*w + 9*ho**2*scales*w*wg - 9*ho**2*w*wg
    linear = 2*cout*se
    norm = 2*cin*h**2*proj + 2*cout*ho**2 + 2*h**2*scales*w + 2*ho**2*scales*w - 2*ho**2*w
    pool = cout*ho**2
    return (params, conv, linear, norm, pool)


def stem_layer(stem, h):
    params = 27*stem
    conv = 27*h**2*stem
    linear = 0
    norm = 0
    pool = 0
    return (params, conv, linear, norm, pool)


def head(cin, classes, h):
    params = cin*classes + 2*cin + classes
    conv = 0
    linear = cin*classes
    norm = 2*cin*h**2
    pool = cin*h**2
    return (params, conv, linear, norm, pool)
