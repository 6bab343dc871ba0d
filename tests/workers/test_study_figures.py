"""A study's figures as SVG: what each draws, from plain values and from a real Optuna study."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import optuna
import pytest

from models.spec.study import StudySpec
from models.store.search import distribution, encode_params
from workers.study.figures import Axis, intermediate_values_svg, optimization_history_svg, parallel_coordinate_svg, param_importances_svg
from workers.study.report import _figures

SVG = "{http://www.w3.org/2000/svg}"
BASE = {"model": {"channels": [8, 16], "convs_per_stage": 1}, "optim": {"epochs": 3}, "data": {"name": "digits"}}
SPACE = {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}, "optim.batch_size": [16, 32, 64], "model.channels": [[8, 16], [16, 32]]}


def parsed(svg: str) -> ET.Element:
    root = ET.fromstring(svg)  # well-formed, or this raises
    assert root.tag == f"{SVG}svg" and float(root.get("width", 0)) > 0 and float(root.get("height", 0)) > 0
    return root


def texts(root: ET.Element) -> list[str]:
    return [t.text or "" for t in root.iter(f"{SVG}text")]


def test_the_history_has_a_dot_per_completed_trial_and_a_best_so_far_line_that_only_improves() -> None:
    points = [(0, 0.5), (1, 0.7), (2, 0.6), (3, float("nan")), (4, 0.9)]
    root = parsed(optimization_history_svg(points, "val_accuracy", maximize=True))
    dots = [c.find(f"{SVG}title").text for c in root.iter(f"{SVG}circle")]
    assert dots == ["trial #0: 0.5", "trial #1: 0.7", "trial #2: 0.6", "trial #4: 0.9"]  # the NaN is left out
    best = next(p for p in root.iter(f"{SVG}polyline"))
    ys = [float(xy.split(",")[1]) for xy in best.get("points").split()]
    assert ys == sorted(ys, reverse=True)  # SVG's y grows downwards: maximising, the line only rises
    minimised = parsed(optimization_history_svg(points, "val_loss", maximize=False))
    ys = [float(xy.split(",")[1]) for xy in next(minimised.iter(f"{SVG}polyline")).get("points").split()]
    assert ys == sorted(ys)
    assert "best so far (min)" in texts(minimised)


def test_importances_are_bars_from_the_most_important_down_with_names_escaped() -> None:
    root = parsed(param_importances_svg({"optim.lr": 0.2, "model.<channels> & co": 0.7, "optim.batch_size": 0.1}, "val_accuracy"))
    labels = [t for t in texts(root) if t.startswith(("optim", "model"))]
    assert labels == ["model.<channels> & co", "optim.lr", "optim.batch_size"]
    widths = [float(r.get("width")) for r in root.iter(f"{SVG}rect") if r.find(f"{SVG}title") is not None]
    assert widths == sorted(widths, reverse=True) and widths[0] == pytest.approx(560)
    assert "no parameter was searched" in texts(parsed(param_importances_svg({}, "val_accuracy")))


def test_parallel_coordinates_draw_a_line_per_trial_across_numeric_log_and_categorical_axes() -> None:
    axes = [Axis("optim.lr", log=True), Axis("optim.batch_size", choices=("16", "32", "64")), Axis("optim.momentum")]
    rows = [(0.9, {"optim.lr": 1e-3, "optim.batch_size": 32, "optim.momentum": 0.9}), (0.5, {"optim.lr": 0.05, "optim.batch_size": 64, "optim.momentum": 0.0})]
    root = parsed(parallel_coordinate_svg(rows, axes, "val_accuracy", maximize=True))
    lines = list(root.iter(f"{SVG}polyline"))
    assert len(lines) == 2 and all(len(line.get("points").split()) == 4 for line in lines)  # objective + three params
    def brightness(line: ET.Element) -> int:
        return sum(int(line.get("stroke")[i : i + 2], 16) for i in (1, 3, 5))

    assert brightness(lines[-1]) < brightness(lines[0])  # the best trial is drawn last, darker
    labels = texts(root)
    assert {"16", "32", "64", "optim.lr", "val_accuracy"} <= set(labels)
    assert {"0.002", "0.005", "0.01", "0.02"} <= set(labels)  # 1-2-5 ticks on a log axis spanning under three decades
    wide = [(0.9, {"optim.lr": 1e-5}), (0.5, {"optim.lr": 0.5})]
    assert {"1e-05", "0.0001", "0.001", "0.01", "0.1"} <= set(texts(parsed(parallel_coordinate_svg(wide, axes[:1], "val_accuracy", True))))
    # a categorical value the axis does not know, or a trial without a param, skips that axis; one trial, one value: still drawn
    odd = [(0.7, {"optim.lr": 1e-3, "optim.batch_size": 128})]
    assert len(next(parsed(parallel_coordinate_svg(odd, axes, "val_accuracy", True)).iter(f"{SVG}polyline")).get("points").split()) == 2
    parsed(parallel_coordinate_svg([], axes, "val_accuracy", True))


def test_intermediate_values_draw_each_trial_and_grey_the_pruned() -> None:
    curves = [(0, [(1, 0.3), (2, 0.6), (3, 0.8)], True), (1, [(1, 0.1)], False), (2, [(1, math.inf)], False)]
    root = parsed(intermediate_values_svg(curves, "val_accuracy"))
    strokes = [p.get("stroke") for p in root.iter(f"{SVG}polyline")]
    assert strokes == ["#1f77b4", "#999999", "#999999"]
    assert len([c for c in root.iter(f"{SVG}circle")]) == 1  # a one-epoch curve gets a dot to be seen


def test_a_real_study_gets_all_four_figures_on_its_objective() -> None:
    spec = StudySpec.model_validate({"base": BASE, "search_space": SPACE, "objective": {"metric": "val_loss"}, "pruner": {"name": "none"}})
    dists = {path: distribution(param) for path, param in spec.search_space.items()}
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.RandomSampler(seed=0))
    for i in range(8):
        trial = study.ask(dists)
        for epoch in range(1, 4 if i % 3 else 2):
            trial.report(1.0 / (epoch + i), epoch)
        study.tell(trial, 1.0 / (3 + i) if i % 3 else None, state=optuna.trial.TrialState.COMPLETE if i % 3 else optuna.trial.TrialState.PRUNED)
    figures = _figures(study, spec, optuna.importance.get_param_importances(study))
    assert set(figures) == {"optimization_history", "param_importances", "parallel_coordinate", "intermediate_values"}
    roots = {name: parsed(svg) for name, svg in figures.items()}
    assert len(list(roots["optimization_history"].iter(f"{SVG}circle"))) == 5  # the completed trials
    assert len(list(roots["parallel_coordinate"].iter(f"{SVG}polyline"))) == 5
    assert {'[8, 16]', '[16, 32]'} <= set(texts(roots["parallel_coordinate"]))  # a list choice, as the space encodes it
    assert len(list(roots["intermediate_values"].iter(f"{SVG}polyline"))) == 8
    assert "best so far (min)" in texts(roots["optimization_history"])
    assert encode_params(spec, {"model.channels": [8, 16]}) == {"model.channels": "[8, 16]"}
