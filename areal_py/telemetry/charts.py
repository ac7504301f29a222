"""Small, dependency-free SVG charts: data in, one ``<svg>`` string out.

Used by the end-of-run report (``areal_py.telemetry.report``) and meant for the live dashboard as well,
so every function is pure: no files, no globals, no JavaScript. Every drawn data point carries
its values as ``data-x``/``data-y`` attributes (``data-series`` names its series), so a test or a
script can read the numbers back out of the page; each ``<svg>`` is tagged ``data-chart=<id>``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

__all__ = ["PALETTE", "Segment", "Series", "bar_chart", "fmt", "line_chart", "nice_ticks", "tick_labels",
           "timeline_chart"]

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 58, 14, 30, 40


@dataclass(frozen=True)
class Series:
    """One line: ``points`` are (x, y); non-finite values are dropped.

    ``dash`` (an SVG stroke-dasharray such as "5 3"; "" = solid) draws the line dashed with hollow
    markers, so a series drawn on top of an equal one leaves the one beneath visible."""
    name: str
    points: Sequence[tuple[float, float]]
    color: str | None = None
    dash: str = ""


@dataclass(frozen=True)
class Segment:
    """A bar on a timeline lane from ``start`` to ``end``; ``value`` goes to ``data-y``,
    ``opacity`` (0..1) lets a lane shade its bars by intensity."""
    start: float
    end: float
    kind: str
    value: float = 0.0
    opacity: float = 1.0


def fmt(v: float) -> str:
    """Compact number for labels: 3 significant digits, k/M suffixes for big values."""
    if not math.isfinite(v):
        return str(v)
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:.3g}M"
    if a >= 1e3:
        return f"{v / 1e3:.3g}k"
    return f"{v:.3g}"


def _decimals(x: float) -> int:
    """Fewest decimals (at most 12) that write ``x`` exactly, up to float noise: 0.5 -> 1, 0.25 -> 2, 20 -> 0."""
    for d in range(13):
        v = abs(x) * 10 ** d
        if abs(v - round(v)) <= 1e-6 * max(1.0, v):
            return d
    return 12


def tick_labels(ticks: Sequence[float]) -> list[str]:
    """Labels for evenly spaced ticks (``nice_ticks``): distinct, and as precise as their spacing needs.

    The decimals come from the step, not from the values: 101.6..102.4 in steps of 0.2 reads 101.6,
    101.8, ..., 102.4 (``fmt``'s 3 significant digits would print 102 three times). A k or M suffix
    is used only when the step is at least 1000 resp. 10^6, and then with the decimals the step
    needs, so it never drops a digit that tells two ticks apart (1000..1003 stays 1000, 1001, ...;
    0..5000 reads 0, 1k, ..., 5k; steps of 2500 read 2.5k). Magnitudes
    of 1e9 and more, or steps below 1e-4, are written in scientific notation with the mantissa
    digits the step needs."""
    ticks = [float(t) for t in ticks]
    if len(ticks) < 2 or not _finite(*ticks) or ticks[1] == ticks[0]:
        return [fmt(t) for t in ticks]
    step = abs(ticks[1] - ticks[0])
    ticks = [0.0 if abs(t) < step * 1e-9 else t for t in ticks]  # no "-0.0"
    big = max(abs(t) for t in ticks)
    if big >= 1e9 or step < 1e-4:
        exp = math.floor(math.log10(big)) if big > 0 else math.floor(math.log10(step))
        d = _decimals(step / 10 ** exp)
        return ["0" if t == 0 else f"{t:.{d}e}" for t in ticks]
    for div, suffix in ((1e6, "M"), (1e3, "k")):
        if step >= div:
            d = _decimals(step / div)
            return ["0" if t == 0 else f"{t / div:.{d}f}{suffix}" for t in ticks]
    d = _decimals(step)
    return [f"{t:.{d}f}" for t in ticks]


def _num(v: float) -> str:
    """Attribute value: enough digits to read the data back (8 significant)."""
    return format(float(v), ".8g")


def _finite(*vals: float) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals)


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick positions (1, 2, 2.5, 5 × 10^k steps) covering [lo, hi]."""
    if not (_finite(lo, hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], start
    while t <= hi + step * 1e-9:
        ticks.append(0.0 if abs(t) < step * 1e-9 else t)
        t = start + len(ticks) * step
    return ticks


def _range(vals: Sequence[float], lo: float | None, hi: float | None, pad: float = 0.05) -> tuple[float, float]:
    vals = [v for v in vals if _finite(v)]
    a = lo if lo is not None else (min(vals) if vals else 0.0)
    b = hi if hi is not None else (max(vals) if vals else 1.0)
    if b <= a:
        half = abs(b) * 0.1 or 1.0
        if lo is None and hi is None:
            a, b = a - half, b + half
        elif hi is None:
            b = a + 2 * half
        else:
            a = b - 2 * half
    span = b - a
    return (a - span * pad if lo is None else a), (b + span * pad if hi is None else b)


class _Frame:
    """Maps data coordinates to pixels inside the plot area and draws axes."""

    def __init__(self, width: int, height: int, xr: tuple[float, float], yr: tuple[float, float]) -> None:
        self.w, self.h, self.xr, self.yr = width, height, xr, yr
        self.x0, self.x1 = MARGIN_L, width - MARGIN_R
        self.y0, self.y1 = height - MARGIN_B, MARGIN_T

    def px(self, x: float) -> float:
        return self.x0 + (x - self.xr[0]) / (self.xr[1] - self.xr[0]) * (self.x1 - self.x0)

    def py(self, y: float) -> float:
        return self.y0 - (y - self.yr[0]) / (self.yr[1] - self.yr[0]) * (self.y0 - self.y1)

    def axes(self, x_label: str, y_label: str, x_ticks: bool = True) -> list[str]:
        out = [(f'<rect class="plot" x="{self.x0}" y="{self.y1}" width="{self.x1 - self.x0}" '
                f'height="{self.y0 - self.y1}" fill="#fff" stroke="#bbb"/>')]
        yt = nice_ticks(*self.yr)
        for t, label in zip(yt, tick_labels(yt)):
            y = self.py(t)
            out.append(f'<line x1="{self.x0}" x2="{self.x1}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                       f'<text class="tick" x="{self.x0 - 4}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
        if x_ticks:
            xt = nice_ticks(*self.xr, n=max(2, (self.x1 - self.x0) // 90))
            for t, label in zip(xt, tick_labels(xt)):
                x = self.px(t)
                out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{self.y0}" y2="{self.y0 + 4}" stroke="#888"/>'
                           f'<text class="tick" x="{x:.1f}" y="{self.y0 + 16}" text-anchor="middle">{label}</text>')
        out.append(f'<text x="{(self.x0 + self.x1) / 2:.0f}" y="{self.h - 6}" text-anchor="middle" '
                   f'class="axis-label">{escape(x_label)}</text>')
        out.append(f'<text transform="translate(12 {(self.y0 + self.y1) / 2:.0f}) rotate(-90)" '
                   f'text-anchor="middle" class="axis-label">{escape(y_label)}</text>')
        return out


def _svg(chart_id: str, title: str, width: int, height: int, body: list[str]) -> str:
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" data-chart="{escape(chart_id)}" '
            f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" '
            f'font-size="11"><text x="{MARGIN_L}" y="18" font-size="13" font-weight="bold">{escape(title)}</text>')
    return head + "".join(body) + "</svg>"


def _legend(names: Sequence[tuple[str, str] | tuple[str, str, str]], width: int) -> list[str]:
    """Entries (name, color) as a swatch, or (name, color, dash) as a line sample drawn like the series."""
    out, x = [], width - MARGIN_R
    for name, color, *dash in reversed(names):
        x -= 30 + 7 * len(name) if dash else 22 + 7 * len(name)
        if dash:
            pattern = f' stroke-dasharray="{dash[0]}"' if dash[0] else ""
            out.append(f'<line x1="{x}" x2="{x + 16}" y1="14" y2="14" stroke="{color}" stroke-width="2"{pattern}/>'
                       f'<text x="{x + 19}" y="18">{escape(name)}</text>')
        else:
            out.append(f'<rect x="{x}" y="9" width="10" height="10" fill="{color}"/>'
                       f'<text x="{x + 13}" y="18">{escape(name)}</text>')
    return out


def _empty(chart_id: str, title: str, width: int, height: int) -> str:
    return _svg(chart_id, title, width, height, [
        f'<text x="{width / 2:.0f}" y="{height / 2:.0f}" text-anchor="middle" fill="#888">no data</text>'])


def line_chart(series: Sequence[Series], *, chart_id: str, title: str, x_label: str, y_label: str,
               width: int = 560, height: int = 260, y_min: float | None = None, y_max: float | None = None,
               markers: bool = True) -> str:
    """Lines with one ``<circle class="pt">`` per point (``data-series``, ``data-x``, ``data-y``).

    Series are drawn in order, later ones on top; each ``<polyline class="line">`` names its
    series in ``data-series``. When any series is dashed the legend shows line samples."""
    clean = [(s, [(float(x), float(y)) for x, y in s.points if _finite(x, y)]) for s in series]
    xs = [x for _, pts in clean for x, _ in pts]
    ys = [y for _, pts in clean for _, y in pts]
    if not xs:
        return _empty(chart_id, title, width, height)
    fr = _Frame(width, height, _range(xs, None, None, pad=0.0), _range(ys, y_min, y_max))
    body = fr.axes(x_label, y_label)
    colors: list[tuple[str, str, str]] = []
    for i, (s, pts) in enumerate(clean):
        color = s.color or PALETTE[i % len(PALETTE)]
        colors.append((s.name, color, s.dash))
        name = escape(s.name)
        if len(pts) > 1:
            path = " ".join(f"{fr.px(x):.1f},{fr.py(y):.1f}" for x, y in pts)
            style = f'stroke-width="1.5" stroke-dasharray="{escape(s.dash)}"' if s.dash else 'stroke-width="1.5"'
            body.append(f'<polyline class="line" data-series="{name}" points="{path}" fill="none" '
                        f'stroke="{color}" {style}/>')
        r = 2 if markers else 0.8
        paint = f'r="{r + 1.2}" fill="none" stroke="{color}"' if s.dash else f'r="{r}" fill="{color}"'
        body.extend(f'<circle class="pt" data-series="{name}" data-x="{_num(x)}" data-y="{_num(y)}" '
                    f'cx="{fr.px(x):.1f}" cy="{fr.py(y):.1f}" {paint}>'
                    f'<title>{name}: {fmt(x)}, {fmt(y)}</title></circle>' for x, y in pts)
    if len(series) > 1:
        body.extend(_legend(colors if any(s.dash for s in series) else [c[:2] for c in colors], width))
    return _svg(chart_id, title, width, height, body)


def bar_chart(bars: Sequence[tuple[float, float]], *, chart_id: str, title: str, x_label: str, y_label: str,
              width: int = 560, height: int = 260, color: str = PALETTE[0], series: str = "count") -> str:
    """Vertical bars at integer-like x positions; each ``<rect class="pt">`` has ``data-x``/``data-y``."""
    bars = sorted((float(x), float(y)) for x, y in bars if _finite(x, y))
    if not bars:
        return _empty(chart_id, title, width, height)
    xs = [x for x, _ in bars]
    fr = _Frame(width, height, (min(xs) - 0.5, max(xs) + 0.5), _range([y for _, y in bars] + [0.0], 0.0, None))
    body = fr.axes(x_label, y_label, x_ticks=False)
    bw = max(1.0, (fr.px(1.0) - fr.px(0.0)) * 0.8)
    for x, y in bars:
        top = fr.py(max(y, 0.0))
        body.append(f'<rect class="pt" data-series="{escape(series)}" data-x="{_num(x)}" data-y="{_num(y)}" '
                    f'x="{fr.px(x) - bw / 2:.1f}" y="{top:.1f}" width="{bw:.1f}" height="{fr.y0 - top:.1f}" '
                    f'fill="{color}"><title>{fmt(x)}: {fmt(y)}</title></rect>'
                    f'<text x="{fr.px(x):.1f}" y="{fr.y0 + 16}" text-anchor="middle">{fmt(x)}</text>')
    return _svg(chart_id, title, width, height, body)


def timeline_chart(lanes: Sequence[tuple[str, Sequence[Segment]]], colors: dict[str, str], *, chart_id: str,
                   title: str, x_label: str = "wall time (s)", width: int = 1120, lane_height: int = 26) -> str:
    """Horizontal lanes of segments along a shared time axis (a Gantt chart).

    Each ``<rect class="pt">`` carries ``data-lane``, ``data-series`` (its kind), ``data-x``
    (start), ``data-x2`` (end) and ``data-y`` (the segment's value)."""
    height = MARGIN_T + lane_height * max(1, len(lanes)) + MARGIN_B
    segs = [s for _, lane in lanes for s in lane if _finite(s.start, s.end) and s.end >= s.start]
    if not segs:
        return _empty(chart_id, title, width, height)
    label_w = 16 + 7 * max(len(name) for name, _ in lanes)
    fr = _Frame(width, height, (min(s.start for s in segs), max(s.end for s in segs)), (0.0, 1.0))
    fr.x0 = label_w
    body = [f'<rect x="{fr.x0}" y="{fr.y1}" width="{fr.x1 - fr.x0}" height="{fr.y0 - fr.y1}" fill="#fff" stroke="#bbb"/>']
    xt = nice_ticks(*fr.xr, n=12)
    for t, label in zip(xt, tick_labels(xt)):
        x = fr.px(t)
        body.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{fr.y1}" y2="{fr.y0 + 4}" stroke="#eee"/>'
                    f'<text class="tick" x="{x:.1f}" y="{fr.y0 + 16}" text-anchor="middle">{label}</text>')
    body.append(f'<text x="{(fr.x0 + fr.x1) / 2:.0f}" y="{height - 6}" text-anchor="middle" '
                f'class="axis-label">{escape(x_label)}</text>')
    for i, (lane, lane_segs) in enumerate(lanes):
        y = MARGIN_T + i * lane_height
        body.append(f'<text x="{label_w - 6}" y="{y + lane_height / 2 + 4:.0f}" text-anchor="end">{escape(lane)}</text>')
        for s in lane_segs:
            if not (_finite(s.start, s.end) and s.end >= s.start):
                continue
            x0, x1 = fr.px(s.start), fr.px(s.end)
            body.append(f'<rect class="pt" data-lane="{escape(lane)}" data-series="{escape(s.kind)}" '
                        f'data-x="{_num(s.start)}" data-x2="{_num(s.end)}" data-y="{_num(s.value)}" '
                        f'x="{x0:.2f}" y="{y + 3}" width="{max(0.5, x1 - x0):.2f}" height="{lane_height - 6}" '
                        f'fill="{colors.get(s.kind, "#999")}" fill-opacity="{min(1.0, max(0.05, s.opacity)):.2f}">'
                        f'<title>{escape(s.kind)} {fmt(s.start)}-{fmt(s.end)} s: {fmt(s.value)}</title></rect>')
    body.extend(_legend(list(colors.items()), width))
    return _svg(chart_id, title, width, height, body)
