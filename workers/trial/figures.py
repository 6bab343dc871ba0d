"""A trial's two figures, the learning curves and the confusion matrix, written as SVG.

Every trial gets both. Drawn with matplotlib they cost 190 ms and 230 ms of CPU per trial on this
project's 2-core CI machine (``bench/trial_overhead.py``), more than a one-epoch ``digits`` trial
trains; as SVG text they cost well under a millisecond, render sharp at any zoom in the MLflow UI's
artifact view, and stay small. The study's figures are drawn with the same primitives
(:mod:`workers.study.figures`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from xml.sax.saxutils import escape

__all__ = ["FONT", "blend", "bounds", "confusion_svg", "learning_curve_svg", "svg_document", "ticks"]

FONT = 'font-family="DejaVu Sans, Arial, sans-serif"'
COLORS = {"train": "#1f77b4", "validation": "#ff7f0e", "accuracy": "#2ca02c"}


def learning_curve_svg(history: Sequence[dict[str, float]]) -> str:
    """Loss (train and validation) and validation accuracy against the epoch, side by side."""
    epochs = list(range(1, len(history) + 1))
    loss = _Panel(x0=60, title="Loss", y_label="loss")
    accuracy = _Panel(x0=510, title="Validation accuracy", y_label="accuracy")
    losses = [h[k] for h in history for k in ("train_loss", "val_loss") if math.isfinite(h[k])]
    parts = [
        *loss.axes(epochs, bounds(losses)),
        loss.line(epochs, [h["train_loss"] for h in history], COLORS["train"]),
        loss.line(epochs, [h["val_loss"] for h in history], COLORS["validation"]),
        *loss.legend([("train", COLORS["train"]), ("validation", COLORS["validation"])]),
        *accuracy.axes(epochs, (0.0, 1.0)),
        accuracy.line(epochs, [h["val_accuracy"] for h in history], COLORS["accuracy"]),
    ]
    return svg_document(900, 360, parts)


def confusion_svg(matrix: Sequence[Sequence[int]], names: Sequence[str]) -> str:
    """Counts of true (rows) against predicted (columns) classes, each cell shaded and, up to 30 classes, annotated."""
    k = len(matrix)
    cell = max(8, min(48, 560 // max(k, 1)))
    left, top = 130, 60
    size = cell * k
    peak = max((max(row) for row in matrix if row), default=0) or 1
    parts = [f'<text x="{left + size / 2}" y="30" text-anchor="middle" font-size="16" {FONT}>Confusion matrix (validation)</text>']
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            shade = count / peak
            fill = blend(shade)
            x, y = left + j * cell, top + i * cell
            parts.append(f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{fill}"><title>true {escape(names[i])}, predicted {escape(names[j])}: {count}</title></rect>')
            if k <= 30:
                color = "white" if shade > 0.5 else "black"
                parts.append(f'<text x="{x + cell / 2}" y="{y + cell / 2 + 4}" text-anchor="middle" font-size="{min(12, cell // 3 + 2)}" fill="{color}" {FONT}>{count}</text>')
    label_size = min(12, cell - 1)
    for i, name in enumerate(names):
        center = left + i * cell + cell / 2
        parts.append(f'<text x="{left - 6}" y="{top + i * cell + cell / 2 + 4}" text-anchor="end" font-size="{label_size}" {FONT}>{escape(name)}</text>')
        parts.append(f'<text x="{center}" y="{top + size + 14}" text-anchor="end" font-size="{label_size}" transform="rotate(-45 {center} {top + size + 14})" {FONT}>{escape(name)}</text>')
    parts += [
        f'<rect x="{left}" y="{top}" width="{size}" height="{size}" fill="none" stroke="#444"/>',
        f'<text x="{left + size / 2}" y="{top + size + 95}" text-anchor="middle" font-size="13" {FONT}>predicted class</text>',
        f'<text x="20" y="{top + size / 2}" text-anchor="middle" font-size="13" transform="rotate(-90 20 {top + size / 2})" {FONT}>true class</text>',
    ]
    return svg_document(left + size + 40, top + size + 110, parts)


class _Panel:
    """One plot area, 380 x 260 pixels, its left edge at ``x0``."""

    width, height, top = 380, 260, 40

    def __init__(self, x0: float, title: str, y_label: str):
        self.x0, self.title, self.y_label = x0, title, y_label
        self.x_range, self.y_range = (1.0, 2.0), (0.0, 1.0)

    def axes(self, epochs: list[int], y_range: tuple[float, float]) -> list[str]:
        self.x_range = (1.0, float(max(len(epochs), 2)))
        self.y_range = y_range
        bottom = self.top + self.height
        out = [
            f'<text x="{self.x0 + self.width / 2}" y="25" text-anchor="middle" font-size="15" {FONT}>{self.title}</text>',
            f'<rect x="{self.x0}" y="{self.top}" width="{self.width}" height="{self.height}" fill="none" stroke="#444"/>',
            f'<text x="{self.x0 + self.width / 2}" y="{bottom + 38}" text-anchor="middle" font-size="12" {FONT}>epoch</text>',
            f'<text x="{self.x0 - 45}" y="{self.top + self.height / 2}" text-anchor="middle" font-size="12" '
            f'transform="rotate(-90 {self.x0 - 45} {self.top + self.height / 2})" {FONT}>{self.y_label}</text>',
        ]
        for value in ticks(*y_range):
            y = self._y(value)
            out.append(f'<line x1="{self.x0}" x2="{self.x0 + self.width}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
            out.append(f'<text x="{self.x0 - 5}" y="{y + 4:.1f}" text-anchor="end" font-size="10" {FONT}>{value:.3g}</text>')
        step = max(1, math.ceil(len(epochs) / 10))
        for epoch in epochs[::step]:
            x = self._x(epoch)
            out.append(f'<text x="{x:.1f}" y="{bottom + 16}" text-anchor="middle" font-size="10" {FONT}>{epoch}</text>')
        return out

    def line(self, epochs: list[int], values: list[float], color: str) -> str:
        points = [(self._x(e), self._y(v)) for e, v in zip(epochs, values) if math.isfinite(v)]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        dots = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>' for x, y in points)
        return f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>{dots}'

    def legend(self, entries: list[tuple[str, str]]) -> list[str]:
        out = []
        for i, (label, color) in enumerate(entries):
            y = self.top + 16 + 16 * i
            x = self.x0 + self.width - 100
            out.append(f'<line x1="{x}" x2="{x + 18}" y1="{y}" y2="{y}" stroke="{color}" stroke-width="2"/>')
            out.append(f'<text x="{x + 24}" y="{y + 4}" font-size="11" {FONT}>{label}</text>')
        return out

    def _x(self, epoch: float) -> float:
        low, high = self.x_range
        return self.x0 + 10 + (self.width - 20) * (epoch - low) / (high - low)

    def _y(self, value: float) -> float:
        low, high = self.y_range
        clamped = min(max(value, low), high)
        return self.top + self.height - 10 - (self.height - 20) * (clamped - low) / (high - low)


def bounds(values: list[float]) -> tuple[float, float]:
    if not values:
        return 0.0, 1.0
    low, high = min(values), max(values)
    if high - low < 1e-12:
        return low - 0.5, high + 0.5
    margin = 0.05 * (high - low)
    return low - margin, high + margin


def ticks(low: float, high: float, count: int = 5) -> list[float]:
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step) + 1)]


def blend(shade: float) -> str:
    """White to dark blue."""
    low, high = (247, 251, 255), (8, 48, 107)
    r, g, b = (round(a + (z - a) * shade) for a, z in zip(low, high))
    return f"#{r:02x}{g:02x}{b:02x}"


def svg_document(width: float, height: float, parts: list[str]) -> str:
    body = "\n".join(parts)
    return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}">\n<rect width="100%" height="100%" fill="white"/>\n{body}\n</svg>\n'
