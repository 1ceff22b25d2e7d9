"""Small line charts as SVG, so ``mtpcode bench --plot`` needs no plotting library.

A chart is a list of panels side by side; a panel has series of (x, y) points
drawn as lines with markers, optional dots (e.g. one per prompt) and optional
horizontal reference lines.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")


@dataclass
class Series:
    label: str
    points: Sequence[tuple[float, float]]
    line: bool = True  # False: markers only (scatter)
    color: str | None = None


@dataclass
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: list[Series] = field(default_factory=list)
    hlines: list[tuple[float, str]] = field(default_factory=list)  # (y, label)
    xticks: Sequence[float] | None = None


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    step = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(step))
    step = min((s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= step), default=mag * 10)
    start = math.floor(lo / step) * step
    ticks = []
    t = start
    while t <= hi + step * 1e-6:
        if t >= lo - step * 1e-6:
            ticks.append(round(t, 10))
        t += step
    return ticks


def _fmt(v: float) -> str:
    return f"{v:g}" if abs(v) >= 0.01 or v == 0 else f"{v:.2g}"


def render(panels: Sequence[Panel], title: str = "", width: int = 480, height: int = 340) -> str:
    """The SVG document for ``panels`` laid out in one row."""
    top = 28 if title else 0
    total_w, total_h = width * len(panels), height + top
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{total_w}" height="{total_h}" '
           f'viewBox="0 0 {total_w} {total_h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{total_w}" height="{total_h}" fill="white"/>']
    if title:
        out.append(f'<text x="{total_w / 2}" y="19" text-anchor="middle" font-size="15">{html.escape(title)}</text>')
    for i, panel in enumerate(panels):
        out.append(_panel(panel, i * width, top, width, height))
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _panel(p: Panel, ox: float, oy: float, w: float, h: float) -> str:
    left, right, top, bottom = 56, 14, 26, 64
    pw, ph = w - left - right, h - top - bottom
    xs = [x for s in p.series for x, _ in s.points] + list(p.xticks or [])
    ys = [y for s in p.series for _, y in s.points] + [y for y, _ in p.hlines]
    if not xs or not ys:
        xs, ys = [0.0, 1.0], [0.0, 1.0]
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    pad = (x1 - x0) * 0.06
    x0, x1 = x0 - pad, x1 + pad
    y0, y1 = min(0.0, min(ys)), max(ys)
    y1 = y1 + (y1 - y0) * 0.08 if y1 > y0 else y0 + 1.0

    def sx(x: float) -> float:
        return ox + left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return oy + top + ph - (y - y0) / (y1 - y0) * ph

    g = [f'<text x="{ox + w / 2}" y="{oy + 16}" text-anchor="middle" font-size="13">{html.escape(p.title)}</text>',
         f'<rect x="{ox + left}" y="{oy + top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>']
    for t in _nice_ticks(y0, y1):
        y = sy(t)
        g.append(f'<line x1="{ox + left}" x2="{ox + left + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        g.append(f'<text x="{ox + left - 5}" y="{y + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    for t in (p.xticks if p.xticks is not None else _nice_ticks(x0, x1)):
        x = sx(t)
        g.append(f'<text x="{x:.1f}" y="{oy + top + ph + 16}" text-anchor="middle">{_fmt(t)}</text>')
    g.append(f'<text x="{ox + left + pw / 2}" y="{oy + top + ph + 34}" text-anchor="middle">'
             f'{html.escape(p.xlabel)}</text>')
    cy = oy + top + ph / 2
    g.append(f'<text x="{ox + 14}" y="{cy}" text-anchor="middle" transform="rotate(-90 {ox + 14} {cy})">'
             f'{html.escape(p.ylabel)}</text>')
    for y, label in p.hlines:
        g.append(f'<line x1="{ox + left}" x2="{ox + left + pw}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" '
                 f'stroke="#888" stroke-dasharray="5,4"/>')
        g.append(f'<text x="{ox + left + pw - 4}" y="{sy(y) - 4:.1f}" text-anchor="end" fill="#666">'
                 f'{html.escape(label)}</text>')
    legend_y = oy + top + ph + 52
    lx = ox + left
    for i, s in enumerate(p.series):
        color = s.color or PALETTE[i % len(PALETTE)]
        pts = sorted(s.points)
        if s.line and len(pts) > 1:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
            g.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        r = 4 if s.line else 2.5
        opacity = "1" if s.line else "0.55"
        for x, y in pts:
            g.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{r}" fill="{color}" fill-opacity="{opacity}"/>')
        g.append(f'<circle cx="{lx + 5}" cy="{legend_y - 4}" r="4" fill="{color}"/>')
        g.append(f'<text x="{lx + 13}" y="{legend_y}">{html.escape(s.label)}</text>')
        lx += 22 + 7 * len(s.label)
    return "\n".join(g)
