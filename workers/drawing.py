"""Every chart convtune draws, written as SVG text: line plots, scatter plots and a heat-map matrix.

A trial's figures are drawn on the trial's path and a study's at its end, so no plotting library
is imported: SVG text is cheap to write (docs/performance.md), renders sharp at any zoom in the
MLflow UI's artifact view and stays small. The pieces:

- :class:`Scale`: a linear or log axis fitted to the values, with its ticks;
- :class:`Plot`: a plot area with an x and a y scale: its frame, lines, dots, vertical marks, legend;
- :func:`heatmap`: a matrix of counts, each cell shaded and titled;
- :func:`svg_document`: the parts in one ``<svg>``.

A value that cannot be placed (NaN, infinite, zero or negative on a log axis) is left out, never
raised on: a figure is a bonus beside the run's metrics, and a diverged trial still gets one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape

__all__ = ["FONT", "Plot", "Scale", "blend", "bounds", "escape", "heatmap", "label", "svg_document", "text", "ticks"]

FONT = 'font-family="DejaVu Sans, Arial, sans-serif"'

Point = tuple[float, float]


@dataclass(frozen=True)
class Scale:
    """An axis from ``low`` to ``high``, linear or (``log``) logarithmic."""

    low: float
    high: float
    log: bool = False

    @classmethod
    def fit(cls, values: Sequence[float], log: bool = False) -> Scale:
        """The scale that shows every placeable value with a margin; (0, 1), or (1, 10) on a log axis, when none is."""
        shown = [v for v in values if placeable(v, log)]
        if log:
            return cls(*_log_bounds(shown), log=True) if shown else cls(1.0, 10.0, log=True)
        return cls(*bounds(shown))

    def fraction(self, value: float) -> float | None:
        """Where ``value`` sits from ``low`` (0) to ``high`` (1), clamped; None when it cannot be placed."""
        if not placeable(value, self.log):
            return None
        low, high = self.low, self.high
        if self.log:
            value, low, high = (math.log10(max(v, 1e-300)) for v in (value, low, high))
        return min(max((value - low) / ((high - low) or 1.0), 0.0), 1.0)

    def ticks(self) -> list[float]:
        """Round values inside the scale: 1-2-5 steps on a linear one; decades (or 1-2-5 within them over a short range) on a log one."""
        if not self.log:
            return ticks(self.low, self.high)
        low, high = self.low, self.high
        decades = [10.0**e for e in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)]
        multiples = (1,) if math.log10(high / low) > 2.5 else (1, 2, 5)  # decades over a long range, 1-2-5 over a short one
        marks = [d * m for d in decades for m in multiples if low <= d * m <= high]
        return marks or [low, high]


def placeable(value: float, log: bool) -> bool:
    """Whether ``value`` has a place on an axis: a finite number, and positive on a log one."""
    return isinstance(value, (int, float)) and math.isfinite(value) and (value > 0 or not log)


class Plot:
    """A plot area, ``left``, ``top``, ``width`` x ``height`` pixels, with a scale for each axis."""

    def __init__(self, left: float, top: float, width: float, height: float, x: Scale, y: Scale):
        self.left, self.top, self.width, self.height = left, top, width, height
        self.x_scale, self.y_scale = x, y

    def x(self, value: float) -> float | None:
        at = self.x_scale.fraction(value)
        return None if at is None else self.left + 10 + (self.width - 20) * at

    def y(self, value: float) -> float | None:
        at = self.y_scale.fraction(value)
        return None if at is None else self.top + self.height - 10 - (self.height - 20) * at

    def place(self, points: Sequence[Point]) -> list[Point]:
        """The pixel positions of the points that can be placed on both axes, in order."""
        placed = [(self.x(a), self.y(b)) for a, b in points]
        return [(px, py) for px, py in placed if px is not None and py is not None]

    def frame(self, title: str, x_label: str, y_label: str, x_ticks: Sequence[float] | None = None) -> list[str]:
        """The title, the box, the axis labels, the y grid and the tick labels (``x_ticks``, else the x scale's)."""
        bottom = self.top + self.height
        out = [
            text(self.left + self.width / 2, self.top - 15, title, size=15, anchor="middle"),
            f'<rect x="{self.left}" y="{self.top}" width="{self.width}" height="{self.height}" fill="none" stroke="#444"/>',
            text(self.left + self.width / 2, bottom + 38, x_label, size=12, anchor="middle"),
            text(self.left - 55, self.top + self.height / 2, y_label, size=12, anchor="middle", rotate=-90),
        ]
        for value in self.y_scale.ticks():
            y = self.y(value)
            if y is not None:
                out.append(f'<line x1="{self.left}" x2="{self.left + self.width}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
                out.append(text(self.left - 5, y + 4, label(value), size=10, anchor="end"))
        for value in self.x_scale.ticks() if x_ticks is None else x_ticks:
            x = self.x(value)
            if x is not None:
                out.append(text(x, bottom + 16, label(value), size=10, anchor="middle"))
        return out

    def line(self, points: Sequence[Point], color: str, width: float = 2, title: str | None = None, dashed: bool = False, opacity: float = 1.0) -> str:
        """A polyline through the points that can be placed (the others skipped), with a ``title`` to hover."""
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in self.place(points))
        dash = ' stroke-dasharray="6,4"' if dashed else ""
        fade = f' opacity="{opacity}"' if opacity < 1 else ""
        hover = f"<title>{escape(title)}</title>" if title else ""
        return f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="{width}"{dash}{fade}>{hover}</polyline>'

    def dots(self, points: Sequence[Point], color: str, r: float = 3, titles: Callable[[Point], str] | None = None, stroke: str | None = None) -> list[str]:
        """A circle per point that can be placed; ``titles`` names each (shown on hover)."""
        out = []
        for point in points:
            placed = self.place([point])
            if placed:
                (x, y), edge = placed[0], f' stroke="{stroke}"' if stroke else ""
                hover = f"<title>{escape(titles(point))}</title>" if titles else ""
                out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{color}"{edge}>{hover}</circle>')
        return out

    def mark(self, value: float, color: str, title: str) -> str | None:
        """A dashed vertical line across the area at x = ``value``, named by ``title``; None when it cannot be placed."""
        x = self.x(value)
        if x is None:
            return None
        return (f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{self.top}" y2="{self.top + self.height}" stroke="{color}" stroke-width="1.5" '
                f'stroke-dasharray="6,4"><title>{escape(title)}</title></line>')

    def legend(self, entries: Sequence[tuple[str, str]], box_width: float = 150) -> list[str]:
        """A ``(label, color)`` line per entry, in the area's top right corner."""
        x0 = self.left + self.width - box_width - 6
        out = [f'<rect x="{x0}" y="{self.top + 5}" width="{box_width}" height="{16 * len(entries) + 6}" fill="white" opacity="0.85" stroke="#ccc"/>']
        for i, (name, color) in enumerate(entries):
            x, y = x0 + 6, self.top + 16 + 16 * i
            out.append(f'<line x1="{x}" x2="{x + 18}" y1="{y}" y2="{y}" stroke="{color}" stroke-width="2"/>')
            out.append(text(x + 24, y + 4, name, size=11))
        return out


def heatmap(matrix: Sequence[Sequence[float]], rows: Sequence[str], columns: Sequence[str], title: str, row_label: str, column_label: str) -> str:
    """A cell per value, shaded white (0) to dark blue (the largest), titled with its row and column; annotated up to 30 rows."""
    n_rows, n_columns = len(matrix), max((len(row) for row in matrix), default=0)
    cell = max(8, min(48, 560 // max(n_rows, n_columns, 1)))
    left, top = 130, 60
    width, height = cell * n_columns, cell * n_rows
    peak = max((v for row in matrix for v in row if math.isfinite(v)), default=0) or 1
    parts = [text(left + width / 2, 30, title, size=16, anchor="middle")]
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            shade = min(max(value / peak, 0.0), 1.0) if math.isfinite(value) else 0.0
            x, y = left + j * cell, top + i * cell
            hover = f"{row_label} {_name(rows, i)}, {column_label} {_name(columns, j)}: {value:g}"
            parts.append(f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{blend(shade)}"><title>{escape(hover)}</title></rect>')
            if n_rows <= 30:
                color = "white" if shade > 0.5 else "black"
                parts.append(text(x + cell / 2, y + cell / 2 + 4, f"{value:g}", size=min(12, cell // 3 + 2), anchor="middle", fill=color))
    label_size = min(12, cell - 1)
    for i in range(n_rows):
        parts.append(text(left - 6, top + i * cell + cell / 2 + 4, _name(rows, i), size=label_size, anchor="end"))
    for j in range(n_columns):
        center = left + j * cell + cell / 2
        parts.append(text(center, top + height + 14, _name(columns, j), size=label_size, anchor="end", rotate=-45))
    parts += [
        f'<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="none" stroke="#444"/>',
        text(left + width / 2, top + height + 95, column_label, size=13, anchor="middle"),
        text(20, top + height / 2, row_label, size=13, anchor="middle", rotate=-90),
    ]
    return svg_document(left + max(width, 200) + 40, top + height + 110, parts)


def text(x: float, y: float, content: str, size: float, anchor: str = "start", rotate: float = 0, fill: str | None = None) -> str:
    """A ``<text>`` element, its content escaped; ``rotate`` degrees about its anchor."""
    turn = f' transform="rotate({rotate:g} {x:.1f} {y:.1f})"' if rotate else ""
    color = f' fill="{fill}"' if fill else ""
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size:g}"{color}{turn} {FONT}>{escape(str(content))}</text>'


def bounds(values: Sequence[float]) -> tuple[float, float]:
    """A linear range showing every finite value with a 5 % margin; (0, 1) when there is none."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    low, high = min(finite), max(finite)
    if high - low < 1e-12 * max(1.0, abs(high)):
        return low - 0.5 * max(1.0, abs(low)), high + 0.5 * max(1.0, abs(high))
    margin = 0.05 * (high - low)
    return low - margin, high + margin


def ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round values (1-2-5 steps) from ``low`` to ``high``."""
    if not (math.isfinite(low) and math.isfinite(high) and high > low):
        return [low] if math.isfinite(low) else []
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step) + 1)]


def blend(shade: float) -> str:
    """White (0) to dark blue (1)."""
    low, high = (247, 251, 255), (8, 48, 107)
    r, g, b = (round(a + (z - a) * shade) for a, z in zip(low, high, strict=True))
    return f"#{r:02x}{g:02x}{b:02x}"


def label(value: float) -> str:
    return f"{value:.3g}"


def svg_document(width: float, height: float, parts: Sequence[str]) -> str:
    """The parts on a white ``width`` x ``height`` page."""
    body = "\n".join(parts)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}">\n'
            f'<rect width="100%" height="100%" fill="white"/>\n{body}\n</svg>\n')


def _log_bounds(values: Sequence[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    return (low / 2, high * 2) if high / low < 1.0001 else (low / 1.2, high * 1.2)


def _name(names: Sequence[str], i: int) -> str:
    return names[i] if i < len(names) else str(i)
