"""The tuning knowledge through the API and real workers: LR range test, divergence, OOM, batch size, devices."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from models.spec.trial import TrialSpec
from models.store.runs import TAG
from tests.conftest import ARTIFACTS, Service, start_worker
from tests.helpers import wait_for_trial

pytestmark = pytest.mark.integration

# SGD with momentum and batch norm on digits: the setting the range test's rules are checked on.
TRIAL = {
    "model": {"channels": [16, 32], "convs_per_stage": 1},
    "optim": {"optimizer": "momentum", "batch_size": 64, "epochs": 8},
    "data": {"name": "digits"},
}
EXAMPLES = ARTIFACTS / "tuning-examples"


def keep(name: str, body: Any) -> None:
    """Keep an answer as a user saw it (docs/tuning.md quotes them)."""
    EXAMPLES.mkdir(parents=True, exist_ok=True)
    (EXAMPLES / f"{name}.json").write_text(json.dumps(body, indent=2))


def wait_for_range_test(client, test_id: str, timeout_s: float = 180) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        response = client.get(f"/lr-finder/{test_id}")
        assert response.status_code == 200, response.get_json()
        test = response.get_json()
        if test["status"] not in ("queued", "running"):
            return test
        assert time.monotonic() < deadline, f"range test {test_id} stuck: {test['status']}"
        time.sleep(0.25)


def with_lr(lr: float, **changes: Any) -> dict:
    return {**TRIAL, "optim": {**TRIAL["optim"], "lr": lr}, **changes}


def test_range_test_then_its_suggestion_trains_and_ten_times_its_largest_stable_lr_diverges(client, worker, mlflow_client):
    response = client.post("/lr-finder", json={"trial": TRIAL, "steps": 200})
    assert response.status_code == 202, response.get_json()
    accepted = response.get_json()
    assert response.headers["Location"].endswith(f"/lr-finder/{accepted['id']}") and accepted["status"] == "queued"

    test = wait_for_range_test(client, accepted["id"])
    keep("lr_finder", {**test, "curve": {k: v[:3] + ["..."] for k, v in test["curve"].items()}})
    assert test["status"] == "succeeded", test["reason"]
    suggested, largest = test["suggested_lr"], test["largest_stable_lr"]
    assert suggested == pytest.approx(largest / 3, rel=1e-4) and 1e-6 < suggested < largest < 10
    assert test["search_range"] == pytest.approx([suggested / 10, largest])
    assert f"suggested lr {suggested:.3g}" in test["reason"]
    curve = test["curve"]
    assert len(curve["lr"]) == len(curve["loss"]) == test["steps_done"] and curve["step"][0] == 1
    run = mlflow_client.get_run(accepted["id"])
    assert run.data.tags[TAG.KIND] == "lr_finder" and run.data.params["lr_finder.steps"] == "200"
    assert {a.path for a in mlflow_client.list_artifacts(accepted["id"], "plots")} == {"plots/lr_range_test.svg"}
    assert run.data.metrics["largest_stable_lr"] == pytest.approx(largest, rel=1e-5)

    good = client.post("/trials", json=with_lr(suggested)).get_json()
    high = client.post("/trials", json=with_lr(10 * largest)).get_json()
    trained = wait_for_trial(client, good["id"])
    diverged = wait_for_trial(client, high["id"])
    keep("diverged_trial", diverged)
    assert trained["status"] == "succeeded" and trained["best"]["val_accuracy"]["value"] >= 0.95, trained["reason"]
    assert diverged["status"] == "failed" and diverged["outcome"] == "diverged"
    assert "the learning rate may be too high" in diverged["reason"] and f"at lr {10 * largest:.3g}" in diverged["reason"]
    assert diverged["epochs_done"] < 8
    assert mlflow_client.get_run(high["id"]).data.tags[TAG.OUTCOME] == "diverged"

    # What a person looks at on a finished trial: confusion matrix, summary table, throughput per epoch.
    artifacts = {a.path for a in mlflow_client.list_artifacts(good["id"])}
    assert {"confusion_matrix.json", "model_summary.json", "model_summary.txt"} <= artifacts
    assert "plots/confusion_matrix.svg" in {a.path for a in mlflow_client.list_artifacts(good["id"], "plots")}
    with open(mlflow_client.download_artifacts(good["id"], "confusion_matrix.json")) as f:
        matrix = json.load(f)["matrix"]
    assert len(matrix) == 10 and sum(matrix[i][i] for i in range(10)) / sum(map(sum, matrix)) == pytest.approx(trained["metrics"]["val_accuracy"])
    assert sorted(m.step for m in mlflow_client.get_metric_history(good["id"], "samples_per_second")) == list(range(1, 9))
    tags = mlflow_client.get_run(good["id"]).data.tags
    assert tags["convtune.batch_size"] == "64" and tags["convtune.lr_effective"] == f"{suggested:.6g}"


def test_range_test_requests_are_checked(client):
    bad = client.post("/lr-finder", json={"trial": TRIAL, "start_lr": 1e-3, "end_lr": 5e-3, "steps": 5})
    assert bad.status_code == 422
    problem = bad.get_json()
    assert {"steps"} <= {e["field"] for e in problem["errors"]}
    bad = client.post("/lr-finder", json={"trial": TRIAL, "start_lr": 1e-3, "end_lr": 5e-3})
    assert bad.status_code == 422 and "at least 10x start_lr" in bad.get_json()["detail"] + json.dumps(bad.get_json()["errors"])
    infeasible = client.post("/lr-finder", json={"trial": {**TRIAL, "model": {"channels": [8] * 5, "kernel_size": 1}}})
    assert infeasible.status_code == 422 and infeasible.get_json()["type"].endswith("/infeasible-spec")
    assert client.get(f"/lr-finder/{'0' * 32}").status_code == 404
    missing = client.get("/lr-finder/not-an-id")
    assert missing.status_code == 404 and "no LR range test" in missing.get_json()["detail"]


def test_a_running_range_test_is_cancelled_within_a_check(client, worker):
    test_id = client.post("/lr-finder", json={"trial": TRIAL, "steps": 5000, "end_lr": 1e-3}).get_json()["id"]
    deadline = time.monotonic() + 60
    while client.get(f"/lr-finder/{test_id}?curve=false").get_json()["steps_done"] == 0:
        assert time.monotonic() < deadline, "the range test never started"
        time.sleep(0.1)
    response = client.post(f"/lr-finder/{test_id}/cancel")
    assert response.status_code == 202
    test = wait_for_range_test(client, test_id)
    assert (test["status"], test["outcome"]) == ("cancelled", "cancelled") and "cancelled on request, at step" in test["reason"]
    assert test["suggested_lr"] is None and test["steps_done"] < 5000
    assert client.post(f"/lr-finder/{test_id}/cancel").status_code == 409


def test_a_trial_id_is_not_a_range_test(client, worker):
    trial = client.post("/trials", json=with_lr(0.01, optim={**TRIAL["optim"], "lr": 0.01, "epochs": 1})).get_json()
    assert client.get(f"/lr-finder/{trial['id']}").status_code == 404
    wait_for_trial(client, trial["id"])


def test_out_of_memory_in_training_ends_the_trial_and_the_worker_lives_on(app, api_settings, mlflow_client, worker_env, tmp_path):
    from models.spec.trial import flatten_params
    from models.store.runs import trial_tags
    from service.api.auth import ANONYMOUS
    from workers.runtime import WorkerRuntime
    from workers.settings import WorkerSettings
    from workers.trial.execution import execute_trial

    runtime = WorkerRuntime(WorkerSettings(
        redis_url=worker_env["CONVTUNE_REDIS_URL"], mlflow_tracking_uri=worker_env["CONVTUNE_MLFLOW_TRACKING_URI"],
        checkpoint_dir=tmp_path, log_model=False,
    ))
    runs = app.extensions["convtune"].runs
    for error, fragment in (
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "OutOfMemoryError: CUDA out of memory"),
        (MemoryError("Unable to allocate 3.1 GiB for an array"), "MemoryError: Unable to allocate"),
    ):
        spec = TrialSpec.model_validate(with_lr(0.01))
        trial_id = runs.create(spec.display_name(), trial_tags(spec, None, "cpu"), flatten_params(spec), ANONYMOUS)

        def fail(epoch: int, metrics: dict[str, float], error: BaseException = error) -> None:
            raise error  # as if the second epoch's step had run out of memory

        ending = execute_trial(trial_id, spec.model_dump(mode="json"), runtime, on_epoch_end=fail)
        assert ending is not None and ending.outcome == "out_of_memory"
        run = mlflow_client.get_run(trial_id)
        assert run.info.status == "FAILED" and run.data.tags[TAG.OUTCOME] == "out_of_memory"
        assert fragment in run.data.tags[TAG.REASON] and "try a smaller batch_size" in run.data.tags[TAG.REASON]


@pytest.fixture(scope="module")
def two_device_worker(worker_env: dict[str, str]) -> Iterator[Service]:
    """A worker on the 'gpu' queue owning two CPU processes and a small memory limit for batch_size 'auto'."""
    w = start_worker("worker-2dev", {**worker_env, "CONVTUNE_CPU_DEVICES": "2", "CONVTUNE_CPU_MEMORY_LIMIT_MB": "16"}, queue="gpu")
    yield w
    w.stop()


def test_devices_two_trains_data_parallel_on_a_worker_that_owns_two(client, two_device_worker, mlflow_client):
    spec = {**with_lr(0.1), "optim": {**TRIAL["optim"], "lr": 0.1, "batch_size": 32, "epochs": 3}, "devices": 2, "queue": "gpu"}
    trial = wait_for_trial(client, client.post("/trials", json=spec).get_json()["id"], timeout_s=240)
    assert trial["status"] == "succeeded", trial["reason"]
    assert trial["best"]["val_accuracy"]["value"] > 0.9
    tags = mlflow_client.get_run(trial["id"]).data.tags
    assert (tags["convtune.batch_size"], tags["convtune.effective_batch_size"]) == ("32", "64")


def test_devices_two_on_a_worker_that_owns_one_fails_with_a_reason(client, worker):
    trial = wait_for_trial(client, client.post("/trials", json={**with_lr(0.1), "devices": 2}).get_json()["id"])
    assert trial["status"] == "failed" and trial["outcome"] == "error"
    assert "asks for devices=2, and this worker owns 1" in trial["reason"]


def test_auto_batch_that_cannot_fit_the_memory_limit_is_out_of_memory(client, two_device_worker):
    big = {**TRIAL, "model": {"channels": [256, 256], "convs_per_stage": 2}, "optim": {**TRIAL["optim"], "lr": 0.01, "batch_size": "auto"}, "queue": "gpu"}
    trial = wait_for_trial(client, client.post("/trials", json=big).get_json()["id"], timeout_s=240)
    assert trial["status"] == "failed" and trial["outcome"] == "out_of_memory", trial["reason"]
    assert "not even a batch of 2 fits" in trial["reason"]


def test_auto_batch_through_a_worker_reports_the_batch_it_chose(client, two_device_worker, mlflow_client):
    spec = {**with_lr(0.1), "optim": {**TRIAL["optim"], "lr": 0.1, "batch_size": "auto", "epochs": 2, "lr_scaling": "sqrt"}, "queue": "gpu"}
    trial = wait_for_trial(client, client.post("/trials", json=spec).get_json()["id"], timeout_s=240)
    assert trial["status"] == "succeeded", trial["reason"]
    tags = mlflow_client.get_run(trial["id"]).data.tags
    batch = int(tags["convtune.batch_size"])
    assert batch >= 64 and batch & (batch - 1) == 0 and "probed from 2" in tags["convtune.batch_probe"]
    assert float(tags["convtune.lr_effective"]) == pytest.approx(0.1 * (batch / 32) ** 0.5, rel=1e-4)


@pytest.fixture(scope="module")
def studies(api_settings, worker_env):
    from service.api import create_app

    return create_app(api_settings.model_copy(update={"study_storage": worker_env["CONVTUNE_STUDY_STORAGE"]})).test_client()


def test_study_with_lr_auto_runs_one_range_test_and_searches_around_it(studies, worker, mlflow_client):
    body = {
        "base": {**TRIAL, "optim": {**TRIAL["optim"], "epochs": 2}},
        "search_space": {"model.activation": ["relu", "gelu"]},
        "lr_auto": {"steps": 100},
        "sampler": "random", "pruner": "none", "n_trials": 3, "parallelism": 2,
    }
    response = studies.post("/studies", json=body)
    assert response.status_code == 202, response.get_json()
    study_id = response.get_json()["id"]
    deadline = time.monotonic() + 240
    while (study := studies.get(f"/studies/{study_id}").get_json())["state"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, study
        time.sleep(0.5)
    assert study["state"] == "succeeded", study["reason"]

    parent = mlflow_client.get_run(study_id).data.tags
    low, high = json.loads(parent["convtune.lr_auto.range"])
    test = mlflow_client.get_run(parent["convtune.lr_auto.test_id"])
    assert test.data.tags[TAG.KIND] == "lr_finder" and test.data.tags["mlflow.parentRunId"] == study_id
    assert test.data.tags[TAG.OUTCOME] == "succeeded"
    suggested, largest = float(test.data.tags[TAG.SUGGESTED_LR]), float(test.data.tags[TAG.LARGEST_STABLE_LR])
    assert (low, high) == pytest.approx((suggested / 10, largest), rel=1e-5)
    keep("study_lr_auto", {"study": {k: study[k] for k in ("id", "state", "reason", "counts", "best")}, "lr_auto.range": [low, high]})

    trials = studies.get(f"/studies/{study_id}/trials").get_json()["items"]
    assert len(trials) == 3
    for trial in trials:
        lr = mlflow_client.get_run(trial["trial_id"]).data.params["optim.lr"]
        assert low <= float(lr) <= high
    lr_finder_runs = mlflow_client.search_runs(
        [test.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{study_id}' and tags.`{TAG.KIND}` = 'lr_finder'",
    )
    assert len(lr_finder_runs) == 1  # run once for the whole study


def test_study_lr_auto_is_checked(studies):
    both = studies.post("/studies", json={"search_space": {"optim.lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}}, "lr_auto": {}})
    assert both.status_code == 422 and both.get_json()["errors"][0]["field"] == "search_space.optim.lr"
    grid = studies.post("/studies", json={"search_space": {"model.activation": ["relu"]}, "lr_auto": {}, "sampler": "grid"})
    assert grid.status_code == 422 and grid.get_json()["errors"][0]["field"] == "lr_auto"
    empty = studies.post("/studies", json={"search_space": {}})
    assert empty.status_code == 422 and "or lr_auto" in empty.get_json()["errors"][0]["message"]


def test_study_summary_counts_diverged_trials_and_their_learning_rates(studies, worker):
    body = {
        "base": {**TRIAL, "optim": {**TRIAL["optim"], "epochs": 4}},
        "search_space": {"optim.lr": [0.1, 8.0]},
        "warm_start": [{"optim.lr": 0.1}, {"optim.lr": 8.0}],
        "sampler": "random", "pruner": "none", "n_trials": 2, "parallelism": 1,
    }
    study_id = studies.post("/studies", json=body).get_json()["id"]
    deadline = time.monotonic() + 180
    while (study := studies.get(f"/studies/{study_id}").get_json())["state"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, study
        time.sleep(0.5)
    assert study["counts"] == {"succeeded": 1, "diverged": 1}, study
    assert study["diverged_lrs"] == [8.0]
    diverged = [t for t in studies.get(f"/studies/{study_id}/trials").get_json()["items"] if t["outcome"] == "diverged"]
    assert diverged[0]["state"] == "pruned" and "the learning rate may be too high" in diverged[0]["reason"]
    keep("study_diverged", {k: study[k] for k in ("id", "state", "reason", "counts", "diverged_lrs")})
