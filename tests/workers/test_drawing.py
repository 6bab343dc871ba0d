"""Every chart convtune draws (workers.drawing and the figures on it): well-formed SVG with the data in it, whatever the data."""

from __future__ import annotations

import math
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from models.spec.trial import TrialSpec
from models.spec.tuning import LrRangeResult, LrRangeSpec
from workers.drawing import Plot, Scale, heatmap
from workers.study.figures import (
    Axis,
    intermediate_values_svg,
    optimization_history_svg,
    parallel_coordinate_svg,
    param_importances_svg,
    pareto_front_svg,
)
from workers.trial.figures import confusion_svg, learning_curve_svg, range_test_svg

SVG = "{http://www.w3.org/2000/svg}"
ROOT = Path(__file__).resolve().parents[2]
NAN, INF = float("nan"), float("inf")
RANGE_SPEC = LrRangeSpec(trial=TrialSpec.model_validate({"model": {"channels": [8]}, "data": {"name": "digits"}}), steps=20)


def parsed(svg: str) -> ET.Element:
    root = ET.fromstring(svg)  # well-formed, or this raises
    assert root.tag == f"{SVG}svg" and float(root.get("width")) > 0 and float(root.get("height")) > 0
    numbers = re.findall(r'="([^"]*)"', svg)
    assert not any(re.search(r"\b(nan|inf)\b", n) for n in numbers), "a NaN or inf reached an attribute"
    return root


def texts(root: ET.Element) -> set[str]:
    return {t.text or "" for t in root.iter(f"{SVG}text")}


def titles(root: ET.Element) -> set[str]:
    return {t.text or "" for t in root.iter(f"{SVG}title")}


def polylines(root: ET.Element) -> list[list[tuple[float, float]]]:
    return [[tuple(map(float, xy.split(","))) for xy in (p.get("points") or "").split()] for p in root.iter(f"{SVG}polyline")]


def range_result(lrs: list[float], losses: list[float], smoothed: list[float], largest: float = 1e-2) -> LrRangeResult:
    return LrRangeResult(suggested_lr=largest / 3, largest_stable_lr=largest, min_loss=0.5, steps_done=len(lrs), stopped_early=False,
                         stop_reason="end_lr", lrs=lrs, losses=losses, smoothed=smoothed)


# --- the primitives ------------------------------------------------------------------------------


def test_a_log_scale_places_positive_values_by_decade_and_refuses_zero_negative_and_nan() -> None:
    scale = Scale.fit([1e-4, 1e-2, 0.0, -1.0, NAN], log=True)
    assert scale.log and scale.low < 1e-4 and scale.high > 1e-2
    assert scale.fraction(1e-3) == pytest.approx((math.log10(1e-3) - math.log10(scale.low)) / math.log10(scale.high / scale.low))
    assert [scale.fraction(v) for v in (0.0, -1.0, NAN, INF)] == [None] * 4
    assert {1e-4, 1e-3, 1e-2} <= set(scale.ticks())
    assert Scale.fit([0.0, -3.0], log=True) == Scale(1.0, 10.0, log=True)  # nothing to place: a default decade
    assert Scale.fit([]) == Scale(0.0, 1.0) and Scale.fit([INF, NAN]) == Scale(0.0, 1.0)
    one = Scale.fit([2.5])
    assert one.low < 2.5 < one.high and one.ticks()


def test_a_plot_skips_what_it_cannot_place_and_keeps_the_rest_in_order() -> None:
    plot = Plot(0, 0, 120, 120, Scale(1e-3, 1.0, log=True), Scale(0.0, 1.0))
    line = ET.fromstring(f'<svg xmlns="http://www.w3.org/2000/svg">{plot.line([(1e-3, 0.0), (0.0, 0.5), (-1, 0.5), (0.1, NAN), (1.0, 1.0)], "#000")}</svg>')
    assert polylines(line) == [[(10.0, 110.0), (110.0, 10.0)]]
    assert plot.dots([(0.0, 0.1)], "#000") == [] and plot.mark(0.0, "#000", "zero") is None


def test_a_heatmap_titles_every_cell_and_survives_empty_and_non_finite_values() -> None:
    root = parsed(heatmap([[1, 2], [3, NAN]], ["a", "b"], ["c", "d"], "t", "row", "column"))
    assert {"row a, column c: 1", "row b, column d: nan"} <= titles(root)
    assert {"1", "2", "3", "a", "b", "c", "d"} <= texts(root)
    parsed(heatmap([], [], [], "empty", "row", "column"))


# --- a trial's and a range test's figures -------------------------------------------------------


@pytest.mark.parametrize("history", [
    [],
    [{"train_loss": 1.0, "val_loss": 1.1, "val_accuracy": 0.5}],
    [{"train_loss": NAN, "val_loss": INF, "val_accuracy": NAN}, {"train_loss": -INF, "val_loss": NAN, "val_accuracy": 0.3}],
])
def test_the_learning_curve_draws_any_history(history: list[dict[str, float]]) -> None:
    root = parsed(learning_curve_svg(history))
    assert {"Loss", "Validation accuracy", "train", "validation"} <= texts(root)
    finite = sum(math.isfinite(h[k]) for h in history for k in ("train_loss", "val_loss", "val_accuracy"))
    assert len(list(root.iter(f"{SVG}circle"))) == finite


def test_the_confusion_matrix_of_one_class() -> None:
    root = parsed(confusion_svg([[4]], ["only"]))
    assert "true class only, predicted class only: 4" in titles(root) and {"4", "only"} <= texts(root)


def test_the_range_test_plot_has_its_curve_and_both_lrs() -> None:
    lrs = [1e-4 * 1.5**i for i in range(20)]
    losses = [2.0 - 0.05 * i for i in range(15)] + [3.0, 6.0, 20.0, NAN, INF]
    root = parsed(range_test_svg(RANGE_SPEC, range_result(lrs, losses, [INF, *losses[1:15], INF, INF, INF, INF, NAN])))
    raw, smoothed = polylines(root)
    assert len(raw) == 18 and len(smoothed) == 14
    assert all(a[0] < b[0] for a, b in zip(raw, raw[1:], strict=False))  # the LR grows left to right
    assert {"largest stable LR 0.01", "suggested LR 0.00333", "learning rate", "training loss"} <= texts(root)
    assert {"largest stable LR 0.01", "suggested LR 0.00333"} <= titles(root)  # both marked on the plot


@pytest.mark.parametrize(("lrs", "losses", "smoothed"), [
    ([], [], []),
    ([1e-3], [1.0], [1.0]),
    ([0.0, -1e-3, 1e-3], [NAN, INF, 2.0], [NAN, INF, 2.0]),
    ([1e-3, 1e-2], [NAN, NAN], [INF, INF]),
])
def test_the_range_test_plot_draws_degenerate_curves(lrs: list[float], losses: list[float], smoothed: list[float]) -> None:
    root = parsed(range_test_svg(RANGE_SPEC, range_result(lrs, losses, smoothed)))
    assert len(polylines(root)[0]) == sum(lr > 0 and math.isfinite(v) for lr, v in zip(lrs, losses, strict=True))


# --- a study's figures ----------------------------------------------------------------------------


def test_the_pareto_front_shows_every_trial_joins_the_front_and_stars_the_chosen() -> None:
    trials = [(0, 0.90, 2e5, True), (1, 0.95, 8e5, True), (2, 0.80, 1e5, True), (3, 0.85, 9e5, True), (4, 0.97, 4e6, False)]
    root = parsed(pareto_front_svg(trials, [2, 0, 1], 0, Axis("val_accuracy (maximize)"), Axis("params (minimize)", log=True)))
    assert {"#0", "#1", "#2", "val_accuracy (maximize)", "params (minimize)", "chosen: #0", "over a budget"} <= texts(root)
    assert "Pareto front: 3 of 5 trained trials" in texts(root)
    (front,) = [line for line in polylines(root) if line]
    assert len(front) == 3 and [x for x, _ in front] == sorted(x for x, _ in front)
    assert [p.find(f"{SVG}title").text for p in root.iter(f"{SVG}polygon")] == ["chosen: #0"]
    reds = [c for c in root.iter(f"{SVG}circle") if c.get("fill") == "#d62728"]
    assert [c.find(f"{SVG}title").text for c in reds] == ["trial #4: 0.97, 4e+06"]
    assert {"1e+05", "1e+06"} <= texts(root)  # decades on the log axis


@pytest.mark.parametrize(("trials", "front", "chosen"), [
    ([], [], None),
    ([(0, 0.9, 1e5, True)], [0], 0),
    ([(0, NAN, 1e5, True), (1, 0.9, INF, True), (2, 0.8, 0.0, True), (3, 0.7, -5.0, False)], [0, 1, 2], 7),
])
def test_the_pareto_front_draws_degenerate_studies(trials: list, front: list[int], chosen: int | None) -> None:
    root = parsed(pareto_front_svg(trials, front, chosen, Axis("val_accuracy"), Axis("params", log=True)))
    placed = [t for t in trials if math.isfinite(t[1]) and math.isfinite(t[2]) and t[2] > 0]
    assert len([c for c in root.iter(f"{SVG}circle") if "(front)" not in c.find(f"{SVG}title").text]) == len(placed)
    assert len(list(root.iter(f"{SVG}polygon"))) == (1 if chosen in {t[0] for t in placed} else 0)


def test_the_study_figures_draw_empty_and_single_point_studies() -> None:
    for svg in (
        optimization_history_svg([], "val_loss", maximize=False),
        optimization_history_svg([(3, 0.5)], "val_loss", maximize=False),
        optimization_history_svg([(0, NAN), (1, INF)], "val_loss", maximize=False),
        param_importances_svg({"optim.lr": 0.0}, "val_loss"),
        parallel_coordinate_svg([(0.5, {"optim.lr": 0.0})], [Axis("optim.lr", log=True)], "val_loss", False),
        parallel_coordinate_svg([(0.5, {"optim.lr": -1.0}), (0.6, {"optim.lr": 1e-3})], [Axis("optim.lr", log=True)], "val_loss", False),
        intermediate_values_svg([], "val_loss"),
        intermediate_values_svg([(0, [(1, NAN)], False)], "val_loss"),
    ):
        parsed(svg)
    assert "trial #3: 0.5" in titles(parsed(optimization_history_svg([(3, 0.5)], "val_loss", maximize=False)))


# --- no plotting library ---------------------------------------------------------------------------


def test_no_worker_code_draws_with_matplotlib() -> None:
    sources = [p for package in ("models", "service", "workers") for p in (ROOT / package).rglob("*.py")]
    assert [str(p.relative_to(ROOT)) for p in sources if "matplotlib" in p.read_text()] == []
    code = "import sys, workers.trial.tracking, workers.study.report, workers.trial.lr_finder; print('matplotlib' in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "False"
