"""Budgets and several objectives against the real stack (issue 13): real Flask app, Redis, Celery worker, mlflow server.

A grid study on ``shapes`` with a FLOPs budget: the configurations over it are never trained (zero
epochs, never started by a worker) and say which budget they broke; a two-objective grid study on
``digits`` returns its Pareto front, and its parent run holds the front's table and plot. Tiny nets,
one or two epochs: the file runs in about a minute.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest

from service.api import create_app
from tests.helpers import tiny_trial
from tests.integration.test_studies import children, submit, trials_of, wait_for_study

pytestmark = pytest.mark.integration

FLOPS_BUDGET = 800_000
# 16x16 shapes, one conv a stage: FLOPs per sample of each (channels, kernel): 4 of the 8 are over 800,000.
SHAPES_SPACE = {"model.channels": [[4, 8], [8, 16], [16, 32], [32, 64]], "model.kernel_size": [3, 5]}


@pytest.fixture(scope="module")
def studies(api_settings, worker_env):
    return create_app(api_settings.model_copy(update={"study_storage": worker_env["CONVTUNE_STUDY_STORAGE"]})).test_client()


def shapes_trial() -> dict[str, Any]:
    return tiny_trial(data={"name": "shapes", "image_size": 16, "num_samples": 200, "num_classes": 3}, optim={"epochs": 1})


def test_a_flops_budget_is_checked_before_any_training(studies, worker, mlflow_client):
    body = {
        "base": shapes_trial(), "search_space": SHAPES_SPACE, "sampler": "grid", "pruner": "none", "parallelism": 2,
        "constraints": [{"metric": "flops_per_sample", "max": FLOPS_BUDGET}],
    }
    accepted = submit(studies, body)
    study = wait_for_study(studies, accepted["id"])
    assert study["state"] == "succeeded", study["reason"]
    assert study["counts"] == {"succeeded": 4, "over_budget": 4}, study["counts"]
    assert study["constraints"] == ["flops_per_sample <= 800,000"]

    trials = {t["trial_id"]: t for t in trials_of(studies, accepted["id"])}
    runs = {r.info.run_id: r for r in children(mlflow_client, accepted["id"])}
    assert set(runs) == set(trials)
    trained = [r for r in runs.values() if int(r.data.tags["convtune.epochs_done"]) > 0]
    assert len(trained) == 4 and all(int(r.data.tags["convtune.flops_per_sample"]) <= FLOPS_BUDGET for r in trained)

    over = [t for t in trials.values() if t["outcome"] == "over_budget"]
    for t in over:
        run = runs[t["trial_id"]]
        flops = int(run.data.tags["convtune.flops_per_sample"])
        assert flops > FLOPS_BUDGET and t["epochs"] == 0 and t["state"] == "pruned"
        assert f"flops_per_sample {flops:,} > max 800,000 (constraints[0])" in t["reason"] and "never trained" in t["reason"], t["reason"]
        assert t["over_budget"] == [f"flops_per_sample {flops:,} > max 800,000 (constraints[0])"]
        # no worker time: never started, nothing trained, no metric logged
        assert run.data.tags["convtune.outcome"] == "over_budget" and run.data.tags["convtune.epochs_done"] == "0"
        assert "convtune.started_at" not in run.data.tags and "convtune.device" not in run.data.tags and not run.data.metrics
        assert run.info.status == "FAILED" and "flops_per_sample" in run.data.tags["convtune.reason"]

    best_run = runs[study["best"]["trial_id"]]
    assert int(best_run.data.tags["convtune.flops_per_sample"]) <= FLOPS_BUDGET
    parent = mlflow_client.get_run(accepted["id"])
    assert parent.data.params["study.constraints"] == "flops_per_sample <= 800,000"
    assert parent.data.metrics["epochs_trained"] == 4 and parent.data.metrics["trials_over_budget"] == 4


def test_two_objectives_give_a_pareto_front_with_its_table_and_plot(studies, worker, mlflow_client):
    body = {
        "base": tiny_trial(optim={"epochs": 2}),
        "search_space": {"model.channels": [[4, 8], [8, 16], [16, 32], [32, 64]], "optim.lr": [3e-3, 1e-2]},
        "objectives": [{"metric": "val_accuracy"}, {"metric": "flops_per_sample"}],
        "constraints": [{"metric": "latency_ms", "max": 1000}],  # measured after training: every trial times its inference
        "sampler": "grid", "parallelism": 2,
    }
    accepted = submit(studies, body)
    study = wait_for_study(studies, accepted["id"])
    assert study["state"] == "succeeded", study["reason"]
    assert study["pruner"] == "none" and [o["metric"] for o in study["objectives"]] == ["val_accuracy", "flops_per_sample"]

    front = study["front"]
    assert len(front) >= 3, front
    for a in front:  # non-dominated: no other front point is at least as good on both and better on one
        for b in front:
            better_or_equal = b["values"]["val_accuracy"] >= a["values"]["val_accuracy"] and b["values"]["flops_per_sample"] <= a["values"]["flops_per_sample"]
            assert a is b or not (better_or_equal and b["values"] != a["values"]), (a, b)
    assert all(f["mlflow_url"] and "model.channels" in f["params"] for f in front)
    assert study["best"]["rule"] == "knee of the front" and study["best"]["number"] in {f["number"] for f in front}
    assert "Pareto front" in study["reason"]

    runs = {r.info.run_id: r for r in children(mlflow_client, accepted["id"])}
    assert all(r.data.metrics["latency_ms"] > 0 and r.data.metrics["latency_ms_batch"] > 0 for r in runs.values())
    trials = trials_of(studies, accepted["id"])
    assert all(t["values"]["flops_per_sample"] == int(runs[t["trial_id"]].data.tags["convtune.flops_per_sample"]) for t in trials)

    parent = mlflow_client.get_run(accepted["id"])
    assert parent.data.tags["convtune.selection"] == "knee of the front"
    assert parent.data.params["study.objective"] == "val_accuracy,flops_per_sample" and parent.data.params["study.direction"] == "maximize,minimize"
    assert "plots/pareto_front.svg" in {a.path for a in mlflow_client.list_artifacts(accepted["id"], "plots")}
    with tempfile.TemporaryDirectory() as tmp:
        table = json.loads(Path(mlflow_client.download_artifacts(accepted["id"], "study/pareto_front.json", tmp)).read_text())
    assert sorted(table["columns"]) == sorted(["number", "trial_id", "val_accuracy", "flops_per_sample", "params.model.channels", "params.optim.lr"])
    assert len(table["data"]) == len(front)


def test_pruning_or_a_target_with_several_objectives_is_a_422_naming_the_field(studies):
    body = {
        "base": tiny_trial(), "search_space": {"optim.lr": [3e-3, 1e-2]}, "objectives": [{"metric": "val_accuracy"}, {"metric": "params"}],
        "pruner": "median",
    }
    response = studies.post("/studies", json=body)
    assert response.status_code == 422 and response.content_type == "application/problem+json"
    [error] = response.get_json()["errors"]
    assert error["field"] == "pruner" and "do not support several objectives" in error["message"]
    response = studies.post("/studies", json={**body, "pruner": "none", "target": 0.9})
    assert response.status_code == 422 and [e["field"] for e in response.get_json()["errors"]] == ["target"]


def test_a_budget_no_corner_of_the_space_meets_is_a_422_naming_it(studies):
    body = {"base": shapes_trial(), "search_space": SHAPES_SPACE, "constraints": [{"metric": "params", "max": 1e6}, {"metric": "flops_per_sample", "max": 1000}]}
    response = studies.post("/studies", json=body)
    assert response.status_code == 422
    [error] = response.get_json()["errors"]
    assert error["field"] == "constraints.1" and "no corner of the search space meets flops_per_sample <= 1,000" in error["message"]
