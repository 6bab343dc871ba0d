"""An epoch's metrics, sent by a worker that was paused past its lease and by the worker that resumed the trial, are one row each.

A worker sends an epoch's metrics on an upload thread once the epoch's checkpoint is written, asking
for its lease just before. Paused (SIGSTOP, a frozen VM) after that question, its request can land
long after another worker took the trial over, resumed it from that checkpoint and offered the
checkpoint's epochs again. Both send the same metrics with the same timestamp (the stamp kept in the
checkpoint), and MLflow keeps one row per (key, step, value, timestamp). Real MLflow server.
"""

from __future__ import annotations

import pytest

import time
import uuid
from concurrent.futures import Future

from mlflow.tracking import MlflowClient

from workers.trial.tracking import MlflowTracker

pytestmark = pytest.mark.integration  # a real mlflow server


METRICS = {"train_loss": 0.75, "val_loss": 0.5, "val_accuracy": 0.875}


def new_run(client: MlflowClient) -> str:
    experiment = client.create_experiment(f"epoch-metrics-{uuid.uuid4().hex[:8]}")
    return client.create_run(experiment).info.run_id


def steps(client: MlflowClient, run_id: str) -> dict[str, list[int]]:
    return {key: [m.step for m in client.get_metric_history(run_id, key)] for key in METRICS}


def send(client: MlflowClient, run_id: str, at_ms: int | None) -> None:
    tracker = MlflowTracker(client, run_id, log_model=False)
    tracker.log_epoch(1, METRICS, at_ms=at_ms)
    tracker.uploads.wait()


def test_the_late_metrics_of_a_paused_worker_and_the_resumed_replay_are_one_row(mlflow_client: MlflowClient) -> None:
    run_id = new_run(mlflow_client)
    stamp = int(time.time() * 1000) - 5000  # when epoch 1 ended on the first worker, kept in its checkpoint
    send(mlflow_client, run_id, stamp)  # the resuming worker offers the checkpoint's epoch 1 (the run lacked it)
    send(mlflow_client, run_id, stamp)  # the paused worker's request, landing late
    assert steps(mlflow_client, run_id) == {key: [1] for key in METRICS}
    assert mlflow_client.get_run(run_id).data.metrics == METRICS


def test_without_the_kept_stamp_the_same_epoch_would_be_two_rows(mlflow_client: MlflowClient) -> None:
    run_id = new_run(mlflow_client)  # what happened before the stamp was kept: the test above can fail
    send(mlflow_client, run_id, None)
    time.sleep(0.01)
    send(mlflow_client, run_id, None)
    assert steps(mlflow_client, run_id) == {key: [1, 1] for key in METRICS}


def test_an_epochs_metrics_wait_for_its_checkpoint(mlflow_client: MlflowClient) -> None:
    run_id = new_run(mlflow_client)
    tracker = MlflowTracker(mlflow_client, run_id, log_model=False)
    checkpoint: Future = Future()
    tracker.log_epoch(1, METRICS, at_ms=int(time.time() * 1000), after=checkpoint)
    time.sleep(0.5)
    assert steps(mlflow_client, run_id) == {key: [] for key in METRICS}  # not sent while the checkpoint is being written
    checkpoint.set_result(None)
    tracker.uploads.wait()
    assert steps(mlflow_client, run_id) == {key: [1] for key in METRICS}
