"""A study's four figures, written as SVG: optimisation history, parameter importances, parallel coordinates, learning curves.

The parent run of every study gets them when the study ends (:mod:`workers.study.report`). Drawn
with Optuna's matplotlib views and saved as PNG they took about 1 s of CPU at the end of every
study (more than half of it rendering the PNGs; the importances computed twice), between a study's
last trial and its end: 1.15 s of a 10.5 s study of 30 one-epoch ``digits`` trials on this
project's 2-core CI machine. As SVG text they take about 5 ms (``bench/study_figures.py``), and the
MLflow UI shows them like the trials' own figures (:mod:`workers.trial.figures`, whose primitives
these share).

The inputs are plain values, so this module knows neither Optuna nor MLflow:

- history: ``(trial number, value)`` of each trial that completed, in the study's direction;
- importances: ``{param: importance}`` as Optuna's evaluator returned them;
- parallel coordinates: ``(value, {param: value})`` of each completed trial and an :class:`Axis` per param;
- learning curves: ``(trial number, [(epoch, value)], completed)`` of each trial that reported any.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import escape

from workers.trial.figures import FONT, blend, bounds, svg_document, ticks

__all__ = ["Axis", "intermediate_values_svg", "optimization_history_svg", "parallel_coordinate_svg", "param_importances_svg"]

BLUE, RED, GREY = "#1f77b4", "#d62728", "#999999"


@dataclass(frozen=True)
class Axis:
    """A searched parameter's axis: numeric (``log`` for a log-uniform one) or its ``choices`` in the space's order."""

    name: str
    log: bool = False
    choices: tuple[str, ...] | None = None


class _Plot:
    """A plot area (``left``, ``top``, ``width`` x ``height`` pixels) with linear scales."""

    def __init__(self, left: float, top: float, width: float, height: float, x: tuple[float, float], y: tuple[float, float]):
        self.left, self.top, self.width, self.height = left, top, width, height
        self.x_range, self.y_range = x, y

    def x(self, value: float) -> float:
        low, high = self.x_range
        return self.left + 10 + (self.width - 20) * (value - low) / ((high - low) or 1.0)

    def y(self, value: float) -> float:
        return self.top + self.height - 10 - (self.height - 20) * _fraction(value, *self.y_range, log=False)

    def frame(self, title: str, x_label: str, y_label: str, x_ticks: Sequence[float]) -> list[str]:
        bottom = self.top + self.height
        out = [
            f'<text x="{self.left + self.width / 2}" y="{self.top - 15}" text-anchor="middle" font-size="15" {FONT}>{escape(title)}</text>',
            f'<rect x="{self.left}" y="{self.top}" width="{self.width}" height="{self.height}" fill="none" stroke="#444"/>',
            f'<text x="{self.left + self.width / 2}" y="{bottom + 38}" text-anchor="middle" font-size="12" {FONT}>{escape(x_label)}</text>',
            f'<text x="{self.left - 55}" y="{self.top + self.height / 2}" text-anchor="middle" font-size="12" '
            f'transform="rotate(-90 {self.left - 55} {self.top + self.height / 2})" {FONT}>{escape(y_label)}</text>',
        ]
        for value in ticks(*self.y_range):
            y = self.y(value)
            out.append(f'<line x1="{self.left}" x2="{self.left + self.width}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
            out.append(f'<text x="{self.left - 5}" y="{y + 4:.1f}" text-anchor="end" font-size="10" {FONT}>{_label(value)}</text>')
        for value in x_ticks:
            out.append(f'<text x="{self.x(value):.1f}" y="{bottom + 16}" text-anchor="middle" font-size="10" {FONT}>{_label(value)}</text>')
        return out

    def legend(self, entries: Sequence[tuple[str, str]]) -> list[str]:
        x0, y0 = self.left + self.width - 156, self.top + 5
        out = [f'<rect x="{x0}" y="{y0}" width="150" height="{16 * len(entries) + 6}" fill="white" opacity="0.85" stroke="#ccc"/>']
        for i, (label, color) in enumerate(entries):
            x, y = self.left + self.width - 150, self.top + 16 + 16 * i
            out.append(f'<line x1="{x}" x2="{x + 18}" y1="{y}" y2="{y}" stroke="{color}" stroke-width="2"/>')
            out.append(f'<text x="{x + 24}" y="{y + 4}" font-size="11" {FONT}>{escape(label)}</text>')
        return out


def optimization_history_svg(points: Sequence[tuple[int, float]], metric: str, maximize: bool) -> str:
    """Each completed trial's value against its number, and the best so far."""
    points = sorted((n, v) for n, v in points if math.isfinite(v))
    numbers = [n for n, _ in points] or [0]
    plot = _Plot(90, 50, 760, 320, (min(numbers), max(max(numbers), min(numbers) + 1)), bounds([v for _, v in points]))
    parts = plot.frame("Optimization history", "trial", metric, _integer_ticks(*plot.x_range))
    best: list[tuple[int, float]] = []
    for n, v in points:
        better = not best or (v > best[-1][1] if maximize else v < best[-1][1])
        best.append((n, v if better else best[-1][1]))
    if best:
        steps = [f"{plot.x(best[0][0]):.1f},{plot.y(best[0][1]):.1f}"]
        for (_, previous), (n, v) in zip(best, best[1:], strict=False):
            steps += [f"{plot.x(n):.1f},{plot.y(previous):.1f}", f"{plot.x(n):.1f},{plot.y(v):.1f}"]
        parts.append(f'<polyline points="{" ".join(steps)}" fill="none" stroke="{RED}" stroke-width="2"/>')
    parts += [f'<circle cx="{plot.x(n):.1f}" cy="{plot.y(v):.1f}" r="3.5" fill="{BLUE}"><title>trial #{n}: {v:.6g}</title></circle>' for n, v in points]
    parts += plot.legend([(metric, BLUE), (f"best so far ({'max' if maximize else 'min'})", RED)])
    return svg_document(880, 420, parts)


def param_importances_svg(importances: Mapping[str, float], metric: str) -> str:
    """One bar per parameter, the most important on top, its importance written beside it."""
    ranked = sorted(importances.items(), key=lambda kv: kv[1], reverse=True)
    left, top, width, row = 230, 50, 560, 26
    peak = max((v for _, v in ranked), default=0.0) or 1.0
    parts = [f'<text x="{left + width / 2}" y="30" text-anchor="middle" font-size="15" {FONT}>Hyperparameter importances for {escape(metric)}</text>']
    for i, (name, value) in enumerate(ranked):
        y, length = top + i * row, width * max(value, 0.0) / peak
        parts += [
            f'<text x="{left - 8}" y="{y + row / 2 + 4}" text-anchor="end" font-size="12" {FONT}>{escape(name)}</text>',
            f'<rect x="{left}" y="{y + 4}" width="{length:.1f}" height="{row - 8}" fill="{BLUE}"><title>{escape(name)}: {value:.4f}</title></rect>',
            f'<text x="{left + length + 6:.1f}" y="{y + row / 2 + 4}" font-size="11" {FONT}>{value:.2f}</text>',
        ]
    if not ranked:
        parts.append(f'<text x="{left + width / 2}" y="{top + 20}" text-anchor="middle" font-size="12" {FONT}>no parameter was searched</text>')
    return svg_document(left + width + 80, top + max(len(ranked), 1) * row + 30, parts)


def parallel_coordinate_svg(rows: Sequence[tuple[float, Mapping[str, Any]]], axes: Sequence[Axis], metric: str, maximize: bool) -> str:
    """One vertical axis for the objective and one per parameter; each completed trial a line across them, darker the better."""
    rows = [(v, params) for v, params in rows if math.isfinite(v)]
    left, top, height = 80, 60, 320
    gap = 760 / max(len(axes), 1)
    values = [v for v, _ in rows]
    objective = Axis(metric)
    columns: list[tuple[Axis, tuple[float, float]]] = [(objective, bounds(values))]
    for axis in axes:
        numbers = [float(p[axis.name]) for _, p in rows if axis.choices is None and _is_number(p.get(axis.name))]
        if axis.log:
            numbers = [n for n in numbers if n > 0]
            if not numbers:
                axis = Axis(axis.name)  # nothing to place on a log scale
        columns.append((axis, _log_bounds(numbers) if axis.log else bounds(numbers)))

    def position(axis: Axis, span: tuple[float, float], value: Any) -> float | None:
        if axis.choices is not None:
            label = str(value)
            if label not in axis.choices:
                return None
            return 1.0 - axis.choices.index(label) / max(len(axis.choices) - 1, 1) if len(axis.choices) > 1 else 0.5
        if not _is_number(value) or (axis.log and value <= 0):
            return None
        return 1.0 - _fraction(float(value), *span, axis.log)

    low, high = columns[0][1]
    parts = [f'<text x="{left + gap * len(axes) / 2}" y="30" text-anchor="middle" font-size="15" {FONT}>Parallel coordinates: {len(rows)} completed trials</text>']
    for v, params in sorted(rows, key=lambda r: r[0] if maximize else -r[0]):  # the best drawn last, on top
        shade = (v - low) / ((high - low) or 1.0)
        shade = 0.15 + 0.85 * (shade if maximize else 1.0 - shade)
        points = []
        for i, (axis, span) in enumerate(columns):
            at = position(axis, span, v if i == 0 else params.get(axis.name))
            if at is not None:
                points.append(f"{left + i * gap:.1f},{top + at * height:.1f}")
        parts.append(f'<polyline points="{" ".join(points)}" fill="none" stroke="{blend(shade)}" stroke-width="1.5" opacity="0.85"/>')
    for i, (axis, span) in enumerate(columns):
        x = left + i * gap
        parts += [
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + height}" stroke="#444"/>',
            f'<text x="{x:.1f}" y="{top + height + 22}" text-anchor="middle" font-size="11" {FONT}>{escape(axis.name)}</text>',
        ]
        if axis.choices is not None:
            marks = [(position(axis, span, c), c) for c in axis.choices]
        else:
            marks = [(position(axis, span, t), _label(t)) for t in _axis_ticks(*span, axis.log)]
        parts += [
            f'<text x="{x - 4:.1f}" y="{top + at * height + 4:.1f}" text-anchor="end" font-size="9" {FONT}>{escape(str(label))}</text>'
            for at, label in marks if at is not None and -1e-9 <= at <= 1 + 1e-9
        ]
    return svg_document(left + gap * len(axes) + 80, top + height + 40, parts)


def intermediate_values_svg(curves: Sequence[tuple[int, Sequence[tuple[int, float]], bool]], metric: str) -> str:
    """Each trial's reported value against its epoch, as the pruner saw them; ``(number, points, completed)``, the others grey."""
    curves = [(n, [(s, v) for s, v in points if math.isfinite(v)], completed) for n, points, completed in curves]
    steps = [s for _, points, _ in curves for s, _ in points] or [1]
    plot = _Plot(90, 50, 760, 320, (min(steps), max(max(steps), min(steps) + 1)), bounds([v for _, points, _ in curves for _, v in points]))
    parts = plot.frame("Intermediate values", "epoch", metric, _integer_ticks(*plot.x_range))
    for n, points, completed in curves:
        color = BLUE if completed else GREY
        path = " ".join(f"{plot.x(s):.1f},{plot.y(v):.1f}" for s, v in sorted(points))
        parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5" opacity="0.8"><title>trial #{n}</title></polyline>')
        if len(points) == 1:
            parts.append(f'<circle cx="{plot.x(points[0][0]):.1f}" cy="{plot.y(points[0][1]):.1f}" r="2.5" fill="{color}"><title>trial #{n}</title></circle>')
    parts += plot.legend([("completed", BLUE), ("pruned or failed", GREY)])
    return svg_document(880, 420, parts)


def _fraction(value: float, low: float, high: float, log: bool) -> float:
    """Where ``value`` sits between ``low`` and ``high``, clamped to [0, 1]."""
    if log:
        value, low, high = (math.log10(max(v, 1e-300)) for v in (value, low, high))
    return min(max((value - low) / ((high - low) or 1.0), 0.0), 1.0)


def _log_bounds(values: list[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    return (low / 2, high * 2) if high / low < 1.0001 else (low / 1.2, high * 1.2)


def _axis_ticks(low: float, high: float, log: bool) -> list[float]:
    if not log:
        return ticks(low, high)
    decades = [10.0**e for e in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)]
    multiples = (1,) if math.log10(high / low) > 2.5 else (1, 2, 5)  # 1-2-5 marks over a short range, decades over a long one
    marks = [d * m for d in decades for m in multiples if low <= d * m <= high]
    return marks or [low, high]


def _integer_ticks(low: float, high: float) -> list[float]:
    step = max(1, math.ceil((high - low) / 10))
    first = math.ceil(low)
    return [float(v) for v in range(first, math.floor(high) + 1, step)]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _label(value: float) -> str:
    return f"{value:.3g}"
