"""Redelivery is safe: duplicates are skipped, a killed worker's trial resumes, endless deaths are capped."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import redis

from models.messages import TrialMessage
from models.spec.trial import TrialSpec
from models.store.keys import attempts_key
from models.store.share import Route
from tests.conftest import wait_for
from tests.helpers import tiny_trial, wait_for_trial

pytestmark = pytest.mark.integration


def _steps(mlflow_client, run_id: str, key: str = "val_loss") -> list[int]:
    return sorted(m.step for m in mlflow_client.get_metric_history(run_id, key))


def resend(app, trial_id: str, spec: dict) -> None:
    """Send a trial's message again, as Redis does when a visibility timeout lapses."""
    app.extensions["convtune"].send(TrialMessage(trial_id=trial_id, spec=TrialSpec.model_validate(spec).model_dump(mode="json")), Route("cpu"))


def test_a_message_delivered_twice_trains_once(app, client, worker, mlflow_client):
    accepted = client.post("/trials", json=tiny_trial(optim={"epochs": 3})).get_json()
    # What Redis does when a visibility timeout lapses: the same message, again.
    resend(app, accepted["id"], tiny_trial(optim={"epochs": 3}))
    trial = wait_for_trial(client, accepted["id"])
    assert trial["status"] == "succeeded"
    assert wait_for(lambda: "duplicate delivery skipped" in worker.log() or "being trained by another worker" in worker.log(), 30), worker.log()[-2000:]
    run = mlflow_client.get_run(accepted["id"])
    assert run.data.tags["convtune.attempts"] == "1"
    assert _steps(mlflow_client, accepted["id"]) == [1, 2, 3]


def test_a_trial_whose_worker_process_dies_resumes_from_its_checkpoint(client, worker, mlflow_client):
    spec = tiny_trial(optim={"epochs": 40, "batch_size": 32}, data={"name": "shapes", "num_samples": 600, "image_size": 16})
    accepted = client.post("/trials", json=spec).get_json()
    wait_for_trial(client, accepted["id"], until=lambda t: t["epochs_done"] >= 3)

    children = subprocess.run(["pgrep", "-P", str(worker.popen.pid)], capture_output=True, text=True).stdout.split()
    assert children, "the prefork pool process was not found"
    for pid in children:
        os.kill(int(pid), signal.SIGKILL)  # the training process dies mid-epoch, as on an OOM kill

    trial = wait_for_trial(client, accepted["id"], timeout_s=180)
    assert trial["status"] == "succeeded", trial["reason"]
    run = mlflow_client.get_run(accepted["id"])
    assert run.data.tags["convtune.attempts"] == "2"
    assert set(_steps(mlflow_client, accepted["id"])) == set(range(1, 41))
    assert "resuming from its last checkpoint" in worker.log()


def test_a_trial_that_keeps_losing_its_worker_fails_as_worker_lost(app, client, worker, redis_url):
    # Queue it where no worker listens, record three lost attempts, then deliver it.
    accepted = client.post("/trials", json=tiny_trial(queue="gpu")).get_json()
    redis.Redis.from_url(redis_url).set(attempts_key(accepted["id"]), 3)
    resend(app, accepted["id"], tiny_trial())
    trial = wait_for_trial(client, accepted["id"])
    assert trial["status"] == "failed" and trial["outcome"] == "worker_lost"
    assert "lost 3 times" in trial["reason"]


def test_worker_survives_everything_above(worker):
    time.sleep(0.5)
    assert worker.alive()
