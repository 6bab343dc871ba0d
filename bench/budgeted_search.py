"""What checking a budget before dispatch saves: the same budgeted TPE study with the budget checked on each
sampled configuration before it trains, against the budget applied only after training (train, then discard).

Both studies run in this process through the real study step (``workers.study.step.execute_step``:
Optuna, the trial's child run, ``execute_trial`` and its training, the study's report) against a
private Redis, an MLflow sqlite store and an Optuna journal file; only the HTTP API and the Celery
hop are left out (they cost the same either way). Same data (16x16 ``shapes``), space (channels,
kernel, convs per stage, learning rate), seed, sampler (TPE) and number of sampled configurations;
the budget is ``flops_per_sample <= 800,000``. *Before*: the study's ``constraints`` (an over-budget
configuration is never trained and TPE is told it is infeasible). *After*: the same study without
constraints; every configuration trains, and those over the budget are discarded at the end.

Printed: a table (trials, trained, over budget, epochs trained, best val_accuracy within the budget,
wall time) and, as the last line, one JSON object with the figures and the saving (epochs trained
after / before, the baseline measured in the same run).

    python bench/budgeted_search.py [--quick] [--trials 24] [--epochs 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from common import Target, emit, note, print_table, private_redis

FLOPS_BUDGET = 800_000


def study_spec(trials: int, epochs: int, samples: int, budgeted: bool) -> dict[str, Any]:
    return {
        "name": f"shapes tpe, budget {'before' if budgeted else 'after'} training",
        "base": {
            "model": {"channels": [8, 16], "convs_per_stage": 1},
            "optim": {"epochs": epochs, "batch_size": 64},
            "data": {"name": "shapes", "image_size": 16, "num_samples": samples, "num_classes": 3},
        },
        "search_space": {
            "model.channels": [[4, 8], [8, 16], [16, 32], [32, 64]],
            "model.kernel_size": [3, 5],
            "model.convs_per_stage": [1, 2],
            "optim.lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
        },
        "constraints": [{"metric": "flops_per_sample", "max": FLOPS_BUDGET}] if budgeted else [],
        "sampler": {"name": "tpe", "n_startup_trials": 4},
        "pruner": "none",
        "seed": 3,
        "n_trials": trials,
        "parallelism": 1,
    }


def run_study(rt: Any, body: dict[str, Any]) -> dict[str, Any]:
    """Create the study as the API does (parent run, Optuna study, slots), run its steps here until it ends; its figures."""
    import optuna

    from models.spec.study import StudySpec
    from models.store import runs
    from models.store.budget import StudyBudget
    from models.store.runs import KIND, TAG
    from models.store.search import USER_ATTR, open_storage
    from workers.study.step import execute_step

    spec = StudySpec.model_validate(body)
    experiment = rt.mlflow.get_experiment_by_name(rt.settings.experiment).experiment_id
    study_id = runs.create_run(rt.mlflow, experiment, name=spec.display_name(), tags={TAG.KIND: KIND.STUDY, TAG.QUEUE: "cpu"})
    stored = optuna.create_study(storage=open_storage(rt.settings.study_storage), study_name=study_id, directions=spec.directions)
    for key, value in ((USER_ATTR.SPEC, spec.model_dump_json()), (USER_ATTR.BUDGET, spec.budget), (USER_ATTR.QUEUE, "cpu"), (USER_ATTR.STARTED_AT, time.time())):
        stored.set_user_attr(key, value)
    budget = StudyBudget(rt.redis, study_id)
    budget.open(spec.budget, spec.parallelism)
    pending = list(budget.top_up().slots)
    t0 = time.perf_counter()
    while pending:
        execute_step(study_id, pending.pop(0), rt, lambda _study, slot, _queue: pending.append(slot))
    wall = time.perf_counter() - t0

    trials = optuna.load_study(study_name=study_id, storage=open_storage(rt.settings.study_storage)).get_trials(deepcopy=False)
    flops = {t.number: (t.user_attrs.get(USER_ATTR.MEASURES) or {}).get("flops_per_sample") for t in trials}
    trained = [t for t in trials if int(t.user_attrs.get(USER_ATTR.EPOCHS, 0)) > 0]
    within = [t for t in trials if t.state.name == "COMPLETE" and flops[t.number] is not None and flops[t.number] <= FLOPS_BUDGET]
    return {
        "trials": len(trials), "trained": len(trained),
        "over_budget_trained": sum(1 for t in trained if (flops[t.number] or 0) > FLOPS_BUDGET),
        "skipped": sum(1 for t in trials if t.user_attrs.get(USER_ATTR.OUTCOME) == "over_budget"),
        "epochs": sum(int(t.user_attrs.get(USER_ATTR.EPOCHS, 0)) for t in trials),
        "train_s": sum(t.duration.total_seconds() for t in trained if t.duration),
        "best_within": max((t.values[0] for t in within), default=float("nan")), "wall_s": wall,
        "state": rt.mlflow.get_run(study_id).info.status,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 configurations, 1 epoch, 300 images: under a minute")
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    trials, epochs, samples = (8, 1, 300) if args.quick else (args.trials, args.epochs, 1000)

    home = Path(tempfile.mkdtemp(prefix="convtune-bench-budget-"))
    with private_redis() as redis_url:
        from mlflow.tracking import MlflowClient

        from workers.runtime import WorkerRuntime
        from workers.settings import WorkerSettings

        tracking = f"sqlite:///{home / 'mlflow.db'}"
        MlflowClient(tracking).create_experiment("bench", artifact_location=str(home / "artifacts"))
        rt = WorkerRuntime(WorkerSettings(
            redis_url=redis_url, mlflow_tracking_uri=tracking, experiment="bench", study_storage=str(home / "studies.journal"),
            checkpoint_dir=home / "checkpoints", log_model=False, reconcile_interval_s=0, torch_threads=1,
        ))
        rt.warm_up()
        results = {}
        for label, budgeted in (("after", False), ("before", True)):
            note(f"study {label}: {trials} configurations, {epochs} epoch(s) each")
            results[label] = run_study(rt, study_spec(trials, epochs, samples, budgeted))

    before, after = results["before"], results["after"]
    rows = [
        [label, r["trials"], r["trained"], r["over_budget_trained"], r["skipped"], r["epochs"], r["train_s"], r["best_within"], r["wall_s"]]
        for label, r in (("budget after training (baseline)", after), ("budget before dispatch", before))
    ]
    print_table(
        f"TPE on 16x16 shapes, {trials} configurations, {epochs} epoch(s) each, budget flops_per_sample <= {FLOPS_BUDGET:,}",
        ["budget checked", "trials", "trained", "trained over budget", "never trained", "epochs", "training s", "best val_accuracy in budget", "wall s"],
        rows,
    )
    saving = after["epochs"] / max(before["epochs"], 1)
    print(f"epochs trained, after / before: {after['epochs']}/{before['epochs']} = {saving:.2f}x")
    figures = {
        "trials": trials, "epochs_per_trial": epochs, "flops_budget": FLOPS_BUDGET,
        "epochs_after": after["epochs"], "epochs_before": before["epochs"], "saving_ratio": saving,
        "train_s_after": after["train_s"], "train_s_before": before["train_s"],
        "trained_over_budget_after": after["over_budget_trained"], "trained_over_budget_before": before["over_budget_trained"],
        "never_trained_before": before["skipped"], "best_val_accuracy_after": after["best_within"], "best_val_accuracy_before": before["best_within"],
    }
    targets = {
        "no over-budget configuration trained (before)": Target(float(before["over_budget_trained"]), "<=", 0),
        "saving_ratio (epochs after / before)": Target(saving, ">=", 1.0),
    }
    emit("budgeted_search", figures, targets)


if __name__ == "__main__":
    main()
