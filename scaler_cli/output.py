"""Plain-text formatting shared by the commands."""

from __future__ import annotations


def table(headers: list[str], rows: list[list], right: set[int] = frozenset()) -> str:
    """A fixed-width table; columns in `right` are right-aligned."""
    cells = [[str(c) for c in r] for r in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return "\n".join([line(cells[0]), line(["-" * w for w in widths]), *map(line, cells[1:])])


def fmt_list(values) -> str:
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)


def knob_summary(spec) -> str:
    """The block knobs of a spec, 'activation relu, norm batch, ...': per-stage values joined by '/',
    bottleneck knobs only where a stage has a bottleneck block."""
    from scaler.spec import BOTTLENECK_KNOBS

    d = spec.to_dict(omit_defaults=False)
    names = ["activation", "norm", "kernel_size"]
    if any(k.bottleneck for k in spec.knobs):
        names += list(BOTTLENECK_KNOBS)
    if spec.family == "densenet":
        names.append("growth")
    return ", ".join(f"{n} {'/'.join(map(str, d[n])) if isinstance(d[n], list) else d[n]}" for n in names)
