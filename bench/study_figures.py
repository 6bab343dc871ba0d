"""The end of a study: its four figures as convtune's SVG against Optuna's matplotlib views (issue 10).

Every study's parent run gets an optimisation history, parameter importances, parallel coordinates
and the trials' learning curves (:mod:`workers.study.report`). They are drawn by the step that ends
the study, between its last trial and the study's end, so their cost is on every study's wall.
Until issue 10's last change they were Optuna's matplotlib views saved as PNG; now they are SVG text
(:mod:`workers.study.figures`). This times both, in one process, alternating, on the same stored
study: ``small_trials``' workload (lr log-uniform, batch size 16/32/64, TPE, one epoch, each trial
reporting its epoch) with N trials. CPU time (this machine is shared), median of the repeats;
the parameter importances are computed once per way (Optuna's view computes them again itself).
Target: the SVG figures take <= 0.05x the matplotlib ones' CPU.

    python bench/study_figures.py [--quick] [--trials 60] [--repeats 5]
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Target, emit, median, note, print_table  # noqa: E402


def stored_study(trials: int) -> tuple[Any, Any]:
    """A study like small_trials' after ``trials`` trials, and its spec."""
    import optuna

    from models.spec.study import StudySpec
    from models.store.search import distribution

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    spec = StudySpec.model_validate({
        "base": {"model": {"channels": [32, 64], "convs_per_stage": 2, "norm": "none"}, "optim": {"epochs": 1}, "data": {"name": "digits"}},
        "search_space": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}, "optim.batch_size": [16, 32, 64]},
        "sampler": {"name": "tpe"}, "pruner": {"name": "none"}, "n_trials": trials,
    })
    dists = {path: distribution(param) for path, param in spec.search_space.items()}
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
    for _ in range(trials):
        trial = study.ask(dists)
        lr, batch = trial.params["optim.lr"], trial.params["optim.batch_size"]
        value = 0.95 - 0.1 * abs(math.log10(lr) + 2.3) - 0.0005 * batch  # a smooth made-up response
        trial.report(value, 1)
        study.tell(trial, value)
    return study, spec


def matplotlib_views(study: Any, spec: Any) -> int:
    """What convtune drew before: Optuna's four matplotlib views, each saved as a PNG (into memory); bytes written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as views

    optuna.importance.get_param_importances(study)
    written = 0
    for plot in (views.plot_optimization_history, views.plot_param_importances, views.plot_parallel_coordinate, views.plot_intermediate_values):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ax = plot(study)
            figure = (ax.flat[0] if hasattr(ax, "flat") else ax).get_figure()
            figure.set_size_inches(10, 6)
            figure.tight_layout()
            out = io.BytesIO()
            figure.savefig(out, format="png")
        written += out.tell()
        plt.close(figure)
    return written


def svg_figures(study: Any, spec: Any) -> int:
    """What convtune draws now (workers.study.report._figures); bytes written."""
    import optuna

    from workers.study.report import _figures

    figures = _figures(study, spec, optuna.importance.get_param_importances(study))
    return sum(len(svg.encode()) for svg in figures.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20 trials, 2 repeats")
    parser.add_argument("--trials", type=int, default=None, help="trials in the stored study (60; --quick 20)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs of each way (5; --quick 2)")
    args = parser.parse_args()
    trials, repeats = args.trials or (20 if args.quick else 60), args.repeats or (2 if args.quick else 5)

    study, spec = stored_study(trials)
    ways = {"Optuna's matplotlib views, PNG (before)": matplotlib_views, "convtune's SVG figures (now)": svg_figures}
    sizes = {name: way(study, spec) for name, way in ways.items()}  # imports and first-use costs before the clock
    cpu: dict[str, list[float]] = {name: [] for name in ways}
    for r in range(repeats):
        for name, way in (list(ways.items()) if r % 2 == 0 else list(reversed(ways.items()))):  # each goes first in turn
            t0 = time.process_time()
            way(study, spec)
            cpu[name].append(time.process_time() - t0)
        note(f"round {r + 1}/{repeats}: " + ", ".join(f"{n.split(' (')[0]} {1000 * cpu[n][-1]:.1f} ms" for n in ways))
    before, now = (median(cpu[name]) for name in ways)
    print_table(
        f"a study's four figures, {trials} trials, CPU ms (median of {repeats})",
        ["how", "CPU ms", "bytes written", "vs before"],
        [[name, round(1000 * median(cpu[name]), 2), sizes[name], round(median(cpu[name]) / before, 4)] for name in ways],
    )
    ratio = now / before
    emit("study_figures", {"trials": trials, "repeats": repeats, "matplotlib_cpu_ms": 1000 * before, "svg_cpu_ms": 1000 * now, "ratio": ratio}, {
        "svg_vs_matplotlib_cpu": Target(ratio, "<=", 0.05),
    })


if __name__ == "__main__":
    main()
