"""What each run records beside its metrics: its own log (a failure's traceback in it), its provenance, system metrics."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import time
from pathlib import Path

import numpy as np
import pytest

from models.data.fingerprint import fingerprint
from models.spec.trial import DataSpec, TrialSpec, flatten_params
from models.store.runs import TAG, trial_tags
from tests.helpers import tiny_trial, wait_for_trial, write_npz

pytestmark = pytest.mark.integration

PROVENANCE = (TAG.VERSION, TAG.COMMIT, TAG.TORCH, TAG.CUDA, TAG.CUDNN, TAG.DEVICE_NAME, TAG.PYTHON, TAG.DATA_FINGERPRINT)


def run_log(mlflow_client, run_id: str, artifact: str = "logs/trial.log") -> str:
    return Path(mlflow_client.download_artifacts(run_id, artifact)).read_text()


def test_a_trial_records_its_log_and_its_provenance(client, worker, mlflow_client):
    trial = wait_for_trial(client, client.post("/trials", json=tiny_trial()).get_json()["id"])
    assert trial["status"] == "succeeded", trial["reason"]
    tags = mlflow_client.get_run(trial["id"]).data.tags
    assert all(tags.get(key) for key in PROVENANCE), {k: tags.get(k) for k in PROVENANCE}
    assert tags[TAG.DEVICE_NAME] == "cpu" and tags[TAG.TORCH].startswith("2.")
    assert tags[TAG.DATA_FINGERPRINT] == fingerprint(DataSpec(name="digits"), None)
    assert f"INFO workers.trial.execution: trial {trial['id']}: training on cpu" in run_log(mlflow_client, trial["id"])


def test_a_failed_trials_traceback_is_in_its_log(client, worker, mlflow_client):
    trial = wait_for_trial(client, client.post("/trials", json=tiny_trial(devices=2)).get_json()["id"])
    assert trial["status"] == "failed" and trial["outcome"] == "error"
    text = run_log(mlflow_client, trial["id"])
    assert f"ERROR workers.trial.execution: trial {trial['id']} ended error" in text
    assert "Traceback (most recent call last)" in text and "NotEnoughDevices: " in text


def test_a_file_data_sets_fingerprint_is_its_bytes_and_a_data_error_is_in_the_log(client, worker, mlflow_client, data_root):
    write_npz(data_root, "records-bad.npz", images=np.zeros((20, 8, 8), np.float32), labels=np.zeros(7, np.int64))
    trial = wait_for_trial(client, client.post("/trials", json=tiny_trial(data={"name": "npz", "path": "records-bad.npz"})).get_json()["id"])
    assert trial["outcome"] == "invalid_data"
    digest = hashlib.sha256((data_root / "records-bad.npz").read_bytes()).hexdigest()
    assert mlflow_client.get_run(trial["id"]).data.tags[TAG.DATA_FINGERPRINT] == f"sha256:{digest}"
    assert "ended invalid_data: records-bad.npz: 'labels' has 7 entries" in run_log(mlflow_client, trial["id"])


def test_a_range_test_records_its_log_and_provenance(client, worker, mlflow_client):
    from tests.integration.test_tuning import TRIAL, wait_for_range_test

    test = wait_for_range_test(client, client.post("/lr-finder", json={"trial": TRIAL, "steps": 30}).get_json()["id"])
    assert test["status"] in ("succeeded", "failed"), test
    tags = mlflow_client.get_run(test["id"]).data.tags
    assert all(tags.get(key) for key in PROVENANCE)
    assert run_log(mlflow_client, test["id"]) is not None


@pytest.fixture()
def runtime(worker_env, tmp_path):
    from workers.runtime import WorkerRuntime
    from workers.settings import WorkerSettings

    return WorkerRuntime(WorkerSettings(
        redis_url=worker_env["CONVTUNE_REDIS_URL"], mlflow_tracking_uri=worker_env["CONVTUNE_MLFLOW_TRACKING_URI"],
        checkpoint_dir=tmp_path, log_model=False, system_metrics_interval_s=0.3,
    ))


def created(app, spec: TrialSpec) -> str:
    from service.api.auth import ANONYMOUS

    return app.extensions["convtune"].runs.create(spec.display_name(), trial_tags(spec, None, "cpu"), flatten_params(spec), ANONYMOUS)


def test_a_succeeded_trial_keeps_its_warnings_and_samples_system_metrics(app, runtime, mlflow_client):
    from workers.trial.execution import execute_trial

    spec = TrialSpec.model_validate(tiny_trial(optim={"epochs": 3}))
    trial_id = created(app, spec)

    def slow_epoch(epoch: int, metrics: dict[str, float]) -> None:
        logging.getLogger("workers.training.train").warning("epoch %d: the loss moved little", epoch)
        time.sleep(0.4)  # longer than the sampling interval: the monitor starts and samples

    ending = execute_trial(trial_id, spec.model_dump(mode="json"), runtime, on_epoch_end=slow_epoch)
    assert ending is not None and ending.outcome == "succeeded"
    text = run_log(mlflow_client, trial_id)
    assert [f"epoch {e}: the loss moved little" in text for e in (1, 2, 3)] == [True] * 3
    run = mlflow_client.get_run(trial_id)
    if importlib.util.find_spec("psutil") is not None:
        assert any(key.startswith("system/cpu_utilization_percentage") for key in run.data.metrics), sorted(run.data.metrics)
    else:
        assert not any(key.startswith("system/") for key in run.data.metrics)


def test_an_exception_in_training_leaves_its_traceback_in_the_log(app, runtime, mlflow_client):
    from workers.trial.execution import execute_trial

    spec = TrialSpec.model_validate(tiny_trial())
    trial_id = created(app, spec)

    def broken(epoch: int, metrics: dict[str, float]) -> None:
        raise KeyError("a bug in the hook")

    ending = execute_trial(trial_id, spec.model_dump(mode="json"), runtime, on_epoch_end=broken)
    assert ending is not None and ending.outcome == "error"
    text = run_log(mlflow_client, trial_id)
    assert "Traceback (most recent call last)" in text and "in broken" in text and "KeyError: 'a bug in the hook'" in text


def test_a_study_trial_records_its_log_and_provenance(api_settings, worker_env, worker, mlflow_client):
    from service.api import create_app
    from tests.integration.test_studies import children, study_body, submit, wait_for_study

    studies = create_app(api_settings.model_copy(update={"study_storage": worker_env["CONVTUNE_STUDY_STORAGE"]})).test_client()
    study = wait_for_study(studies, submit(studies, study_body(n_trials=1, parallelism=1, base=tiny_trial(optim={"epochs": 1})))["id"])
    assert study["state"] == "succeeded", study
    (child,) = children(mlflow_client, study["id"])
    assert all(child.data.tags.get(key) for key in PROVENANCE)
    assert f"trial {child.info.run_id}: training on cpu" in run_log(mlflow_client, child.info.run_id)
