"""A run's own figures, as SVG: a trial's learning curves and confusion matrix, a range test's loss against LR.

Every trial gets the first two, drawn on the trial's path (:mod:`workers.trial.tracking`), so they
are written with :mod:`workers.drawing` and import no plotting library (docs/performance.md, "Per-trial
work outside the epoch"). A range test's run gets the third (:mod:`workers.trial.lr_finder`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from models.spec.tuning import LrRangeResult, LrRangeSpec
from workers.drawing import Plot, Scale, heatmap, svg_document

__all__ = ["confusion_svg", "learning_curve_svg", "range_test_svg"]

COLORS = {"train": "#1f77b4", "validation": "#ff7f0e", "accuracy": "#2ca02c", "raw": "#b3b3b3", "largest": "#d62728", "suggested": "#2ca02c"}


def learning_curve_svg(history: Sequence[dict[str, float]]) -> str:
    """Loss (train and validation) and validation accuracy against the epoch, side by side."""
    epochs = list(range(1, len(history) + 1))
    x = Scale(1.0, float(max(len(epochs), 2)))
    step = max(1, math.ceil(len(epochs) / 10))
    x_ticks = [float(e) for e in epochs[::step]]
    losses = [h[k] for h in history for k in ("train_loss", "val_loss")]
    loss = Plot(80, 50, 380, 260, x, Scale.fit(losses))
    accuracy = Plot(560, 50, 380, 260, x, Scale(0.0, 1.0))
    parts = [
        *loss.frame("Loss", "epoch", "loss", x_ticks),
        *_series(loss, epochs, [h["train_loss"] for h in history], COLORS["train"]),
        *_series(loss, epochs, [h["val_loss"] for h in history], COLORS["validation"]),
        *loss.legend([("train", COLORS["train"]), ("validation", COLORS["validation"])], box_width=100),
        *accuracy.frame("Validation accuracy", "epoch", "accuracy", x_ticks),
        *_series(accuracy, epochs, [h["val_accuracy"] for h in history], COLORS["accuracy"]),
    ]
    return svg_document(980, 370, parts)


def confusion_svg(matrix: Sequence[Sequence[int]], names: Sequence[str]) -> str:
    """Counts of true (rows) against predicted (columns) classes, each cell shaded and, up to 30 classes, annotated."""
    return heatmap(matrix, names, names, "Confusion matrix (validation)", "true class", "predicted class")


def range_test_svg(spec: LrRangeSpec, result: LrRangeResult) -> str:
    """Loss against LR (log scale), raw and centred-average, with the largest stable and the suggested LR marked."""
    raw = list(zip(result.lrs, result.losses, strict=False))
    smoothed = [(lr, s) for lr, s in zip(result.lrs, result.smoothed, strict=False) if s is not None]
    shown = [v for v in result.losses if math.isfinite(v)]
    y = Scale.fit(shown)
    if shown:  # past the blow-up the loss dwarfs the curve: cut the axis a little above where the test stops
        start = next((s for _, s in smoothed if math.isfinite(s)), shown[0])
        low, high = min(shown) * 0.9, min(max(shown), start * spec.blowup_factor * 1.2)
        if high > low:
            y = Scale(low, high)
    plot = Plot(90, 50, 760, 320, Scale.fit([*result.lrs, result.largest_stable_lr, result.suggested_lr], log=True), y)
    parts = [
        *plot.frame("Learning-rate range test", "learning rate", "training loss"),
        plot.line(raw, COLORS["raw"], width=1, title="loss per step"),
        plot.line(smoothed, COLORS["train"], title="centred average"),
    ]
    largest, suggested = f"largest stable LR {result.largest_stable_lr:.3g}", f"suggested LR {result.suggested_lr:.3g}"
    marks = (plot.mark(result.largest_stable_lr, COLORS["largest"], largest), plot.mark(result.suggested_lr, COLORS["suggested"], suggested))
    parts += [m for m in marks if m]
    parts += plot.legend([
        ("loss per step", COLORS["raw"]),
        (f"centred average ({spec.centred_window()} steps)", COLORS["train"]),
        (largest, COLORS["largest"]),
        (suggested, COLORS["suggested"]),
    ], box_width=230)
    return svg_document(880, 420, parts)


def _series(plot: Plot, epochs: list[int], values: list[float], color: str) -> list[str]:
    points = list(zip(epochs, values, strict=True))
    return [plot.line(points, color), *plot.dots(points, color)]
