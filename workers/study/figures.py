"""A study's figures, written as SVG: optimisation history, parameter importances, parallel coordinates, learning curves, Pareto front.

The parent run of every study gets them when the study ends (:mod:`workers.study.report`), drawn
with :mod:`workers.drawing` as the trials' own figures are: SVG text costs a fraction of a rendered
image at the end of every study (docs/performance.md, "The end of a study").

The inputs are plain values, so this module knows neither Optuna nor MLflow:

- history: ``(trial number, value)`` of each trial that completed, in the study's direction;
- importances: ``{param: importance}`` as Optuna's evaluator returned them;
- parallel coordinates: ``(value, {param: value})`` of each completed trial and an :class:`Axis` per param;
- learning curves: ``(trial number, [(epoch, value)], completed)`` of each trial that reported any;
- Pareto front: ``(trial number, x, y, met the budgets)`` of each trained trial, the front's numbers
  and the chosen one's, and an :class:`Axis` per objective.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from workers.drawing import Plot, Scale, blend, escape, label, svg_document, text

__all__ = ["Axis", "intermediate_values_svg", "optimization_history_svg", "parallel_coordinate_svg", "param_importances_svg", "pareto_front_svg"]

BLUE, RED, GREY, ORANGE = "#1f77b4", "#d62728", "#999999", "#ff7f0e"


@dataclass(frozen=True)
class Axis:
    """A searched parameter's or an objective's axis: numeric (``log`` for a log scale) or its ``choices`` in the space's order."""

    name: str
    log: bool = False
    choices: tuple[str, ...] | None = None


def optimization_history_svg(points: Sequence[tuple[int, float]], metric: str, maximize: bool) -> str:
    """Each completed trial's value against its number, and the best so far."""
    points = sorted((n, v) for n, v in points if math.isfinite(v))
    numbers = [n for n, _ in points] or [0]
    x = Scale(min(numbers), max(max(numbers), min(numbers) + 1))
    plot = Plot(90, 50, 760, 320, x, Scale.fit([v for _, v in points]))
    parts = plot.frame("Optimization history", "trial", metric, _integer_ticks(x))
    best: list[tuple[int, float]] = []
    for n, v in points:
        better = not best or (v > best[-1][1] if maximize else v < best[-1][1])
        best.append((n, v if better else best[-1][1]))
    if best:
        steps = [best[0]]
        for (_, previous), (n, v) in zip(best, best[1:], strict=False):
            steps += [(n, previous), (n, v)]
        parts.append(plot.line(steps, RED))
    parts += plot.dots(points, BLUE, r=3.5, titles=lambda p: f"trial #{p[0]}: {p[1]:.6g}")
    parts += plot.legend([(metric, BLUE), (f"best so far ({'max' if maximize else 'min'})", RED)])
    return svg_document(880, 420, parts)


def param_importances_svg(importances: Mapping[str, float], metric: str) -> str:
    """One bar per parameter, the most important on top, its importance written beside it."""
    ranked = sorted(importances.items(), key=lambda kv: kv[1], reverse=True)
    left, top, width, row = 230, 50, 560, 26
    peak = max((v for _, v in ranked), default=0.0) or 1.0
    parts = [text(left + width / 2, 30, f"Hyperparameter importances for {metric}", size=15, anchor="middle")]
    for i, (name, value) in enumerate(ranked):
        y, length = top + i * row, width * max(value, 0.0) / peak
        parts += [
            text(left - 8, y + row / 2 + 4, name, size=12, anchor="end"),
            f'<rect x="{left}" y="{y + 4}" width="{length:.1f}" height="{row - 8}" fill="{BLUE}"><title>{escape(name)}: {value:.4f}</title></rect>',
            text(left + length + 6, y + row / 2 + 4, f"{value:.2f}", size=11),
        ]
    if not ranked:
        parts.append(text(left + width / 2, top + 20, "no parameter was searched", size=12, anchor="middle"))
    return svg_document(left + width + 80, top + max(len(ranked), 1) * row + 30, parts)


def parallel_coordinate_svg(rows: Sequence[tuple[float, Mapping[str, Any]]], axes: Sequence[Axis], metric: str, maximize: bool) -> str:
    """One vertical axis for the objective and one per parameter; each completed trial a line across them, darker the better."""
    rows = [(v, params) for v, params in rows if math.isfinite(v)]
    left, top, height = 80, 60, 320
    gap = 760 / max(len(axes), 1)
    columns: list[tuple[Axis, Scale]] = [(Axis(metric), Scale.fit([v for v, _ in rows]))]
    for axis in axes:
        numbers = [float(p[axis.name]) for _, p in rows if axis.choices is None and _is_number(p.get(axis.name))]
        if axis.log and not any(n > 0 for n in numbers):
            axis = Axis(axis.name)  # nothing to place on a log scale
        columns.append((axis, Scale.fit(numbers, log=axis.log)))

    def position(axis: Axis, scale: Scale, value: Any) -> float | None:
        if axis.choices is not None:
            if str(value) not in axis.choices:
                return None
            return 1.0 - axis.choices.index(str(value)) / max(len(axis.choices) - 1, 1) if len(axis.choices) > 1 else 0.5
        at = scale.fraction(float(value)) if _is_number(value) else None
        return None if at is None else 1.0 - at

    objective = columns[0][1]
    parts = [text(left + gap * len(axes) / 2, 30, f"Parallel coordinates: {len(rows)} completed trials", size=15, anchor="middle")]
    for v, params in sorted(rows, key=lambda r: r[0] if maximize else -r[0]):  # the best drawn last, on top
        shade = objective.fraction(v) or 0.0
        shade = 0.15 + 0.85 * (shade if maximize else 1.0 - shade)
        points = []
        for i, (axis, scale) in enumerate(columns):
            at = position(axis, scale, v if i == 0 else params.get(axis.name))
            if at is not None:
                points.append(f"{left + i * gap:.1f},{top + at * height:.1f}")
        parts.append(f'<polyline points="{" ".join(points)}" fill="none" stroke="{blend(shade)}" stroke-width="1.5" opacity="0.85"/>')
    for i, (axis, scale) in enumerate(columns):
        x = left + i * gap
        parts += [
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + height}" stroke="#444"/>',
            text(x, top + height + 22, axis.name, size=11, anchor="middle"),
        ]
        if axis.choices is not None:
            marks = [(position(axis, scale, c), c) for c in axis.choices]
        else:
            marks = [(position(axis, scale, t), label(t)) for t in scale.ticks()]
        parts += [text(x - 4, top + at * height + 4, name, size=9, anchor="end") for at, name in marks if at is not None]
    return svg_document(left + gap * len(axes) + 80, top + height + 40, parts)


def intermediate_values_svg(curves: Sequence[tuple[int, Sequence[tuple[int, float]], bool]], metric: str) -> str:
    """Each trial's reported value against its epoch, as the pruner saw them; ``(number, points, completed)``, the others grey."""
    curves = [(n, [(s, v) for s, v in points if math.isfinite(v)], completed) for n, points, completed in curves]
    steps = [s for _, points, _ in curves for s, _ in points] or [1]
    x = Scale(min(steps), max(max(steps), min(steps) + 1))
    plot = Plot(90, 50, 760, 320, x, Scale.fit([v for _, points, _ in curves for _, v in points]))
    parts = plot.frame("Intermediate values", "epoch", metric, _integer_ticks(x))
    for n, points, completed in curves:
        color = BLUE if completed else GREY
        parts.append(plot.line(sorted(points), color, width=1.5, title=f"trial #{n}", opacity=0.8))
        if len(points) == 1:
            parts += plot.dots(points, color, r=2.5, titles=lambda _, n=n: f"trial #{n}")
    parts += plot.legend([("completed", BLUE), ("pruned or failed", GREY)])
    return svg_document(880, 420, parts)


def pareto_front_svg(trials: Sequence[tuple[int, float, float, bool]], front: Sequence[int], chosen: int | None, x: Axis, y: Axis) -> str:
    """Every trained trial (grey; over a budget: red), the front (joined, blue, numbered) and the chosen trial (a star), on two objectives."""
    trials = [t for t in trials if _is_number(t[1]) and _is_number(t[2])]
    at = {n: (a, b) for n, a, b, _ in trials}
    plot = Plot(100, 50, 740, 360, Scale.fit([a for _, a, _, _ in trials], log=x.log), Scale.fit([b for _, _, b, _ in trials], log=y.log))
    on_front = [n for n in front if n in at]
    parts = plot.frame(f"Pareto front: {len(on_front)} of {len(trials)} trained trials", x.name, y.name)
    for n, a, b, feasible in trials:
        parts += plot.dots([(a, b)], GREY if feasible else RED, r=3.5, titles=lambda p, n=n: f"trial #{n}: {label(p[0])}, {label(p[1])}")
    points = sorted(at[n] for n in on_front)
    parts.append(plot.line(points, BLUE, title="Pareto front"))
    for n in on_front:
        placed = plot.place([at[n]])
        parts += plot.dots([at[n]], BLUE, r=4, titles=lambda _, n=n: f"trial #{n} (front)")
        parts += [text(px + 5, py - 5, f"#{n}", size=9) for px, py in placed]
    if chosen is not None and chosen in at:
        parts += [_star(px, py, f"chosen: #{chosen}") for px, py in plot.place([at[chosen]])]
    entries = [("trained", GREY), ("over a budget", RED), ("Pareto front", BLUE)]
    parts += plot.legend([*entries, (f"chosen: #{chosen}", ORANGE)] if chosen is not None and chosen in at else entries)
    return svg_document(880, 460, parts)


def _star(x: float, y: float, title: str, radius: float = 11) -> str:
    corners = []
    for k in range(10):  # five points and the five notches between them
        r = radius if k % 2 == 0 else 0.45 * radius
        corners.append(f"{x + r * math.sin(k * math.pi / 5):.1f},{y - r * math.cos(k * math.pi / 5):.1f}")
    return f'<polygon points="{" ".join(corners)}" fill="{ORANGE}" stroke="black"><title>{escape(title)}</title></polygon>'


def _integer_ticks(scale: Scale) -> list[float]:
    step = max(1, math.ceil((scale.high - scale.low) / 10))
    return [float(v) for v in range(math.ceil(scale.low), math.floor(scale.high) + 1, step)]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
