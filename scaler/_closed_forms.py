"""Closed-form layer-group costs (params and fvcore flops by kind), derived by `scaler.derive`.

Generated file: do not edit; regenerate with `python -m scaler.derive`.
Each function returns (params, conv, linear, norm, pool) as polynomials in its arguments.
"""


def basic_block(cin, cout, h, ho, proj, k, np, nf, ap):
    params = 2*ap + cin*cout*k**2 + cin*cout*proj + cin*np + cout**2*k**2 + cout*np
    conv = cin*cout*ho**2*k**2 + cin*cout*ho**2*proj + cout**2*ho**2*k**2
    linear = 0
    norm = cin*h**2*nf + cout*ho**2*nf
    pool = 0
    return (params, conv, linear, norm, pool)


def basic_post_block(cin, cout, h, ho, proj, k, np, nf, ap):
    params = 2*ap + cin*cout*k**2 + cin*cout*proj + cout**2*k**2 + cout*np*proj + 2*cout*np
    conv = cin*cout*ho**2*k**2 + cin*cout*ho**2*proj + cout**2*ho**2*k**2
    linear = 0
    norm = cout*ho**2*nf*proj + 2*cout*ho**2*nf
    pool = 0
    return (params, conv, linear, norm, pool)


def bottleneck_block(cin, w, wg, nconv, mid, cout, h, ho, proj, k, np, nf, ap):
    params = ap + cin*cout*proj + cin*mid + cin*np + cout*mid + k**2*nconv*w*wg + mid*np + nconv*np*w
    conv = cin*cout*ho**2*proj + cin*h**2*mid + cout*ho**2*mid + ho**2*k**2*nconv*w*wg
    linear = 0
    norm = cin*h**2*nf*proj + h**2*mid*nf + ho**2*nconv*nf*w
    pool = 0
    return (params, conv, linear, norm, pool)


def bottleneck_post_block(cin, w, wg, nconv, mid, cout, h, ho, proj, k, np, nf, ap):
    params = ap + cin*cout*proj + cin*mid + cout*mid + cout*np*proj + cout*np + k**2*nconv*w*wg + mid*np + nconv*np*w
    conv = cin*cout*ho**2*proj + cin*h**2*mid + cout*ho**2*mid + ho**2*k**2*nconv*w*wg
    linear = 0
    norm = cout*ho**2*nf*proj + cout*ho**2*nf + h**2*mid*nf + ho**2*nconv*nf*w
    pool = 0
    return (params, conv, linear, norm, pool)


def se_unit(c, hidden, ho, normed, np, nf):
    params = 2*c*hidden + c*normed*np
    conv = 0
    linear = 2*c*hidden
    norm = c*ho**2*nf*normed
    pool = c*ho**2
    return (params, conv, linear, norm, pool)


def inverted_block(cin, mid, cout, h, ho, proj, k, np, nf, ap):
    params = ap + cin*cout*proj + cin*mid + cin*np + cout*mid + k**2*mid + 2*mid*np
    conv = cin*cout*ho**2*proj + cin*h**2*mid + cout*ho**2*mid + ho**2*k**2*mid
    linear = 0
    norm = cin*h**2*nf + h**2*mid*nf + ho**2*mid*nf
    pool = 0
    return (params, conv, linear, norm, pool)


def vgg_layer(cin, cout, h, k, np, nf, ap):
    params = ap + cin*cout*k**2 + cout*np + cout
    conv = cin*cout*h**2*k**2
    linear = 0
    norm = cout*h**2*nf
    pool = 0
    return (params, conv, linear, norm, pool)


def dense_stage(cin, g, n, tri, h, k, np, nf, ap):
    params = 2*ap*n + 4*cin*g*n + cin*n*np + 4*g**2*k**2*n + 4*g**2*tri + 4*g*n*np + g*np*tri
    conv = 4*cin*g*h**2*n + 4*g**2*h**2*k**2*n + 4*g**2*h**2*tri
    linear = 0
    norm = cin*h**2*n*nf + 4*g*h**2*n*nf + g*h**2*nf*tri
    pool = 0
    return (params, conv, linear, norm, pool)


def transition(cin, cout, h, np, nf, ap):
    params = ap + cin*cout + cin*np
    conv = cin*cout*h**2
    linear = 0
    norm = cin*h**2*nf
    pool = 0
    return (params, conv, linear, norm, pool)


def stem_layer(stem, h):
    params = 27*stem
    conv = 27*h**2*stem
    linear = 0
    norm = 0
    pool = 0
    return (params, conv, linear, norm, pool)


def head(cin, classes, h, np, nf, ap):
    params = ap + cin*classes + cin*np + classes
    conv = 0
    linear = cin*classes
    norm = cin*h**2*nf
    pool = cin*h**2
    return (params, conv, linear, norm, pool)


def vgg_head(cin, classes, h):
    params = cin*classes + classes
    conv = 0
    linear = cin*classes
    norm = 0
    pool = cin*h**2
    return (params, conv, linear, norm, pool)
