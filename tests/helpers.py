"""Helpers for the integration tests: small specs, polling, data files."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flask.testing import FlaskClient


def tiny_trial(**overrides: Any) -> dict[str, Any]:
    """A digits trial small enough to train in about a second on one CPU core."""
    spec: dict[str, Any] = {
        "model": {"channels": [8, 16], "convs_per_stage": 1},
        "optim": {"lr": 3e-3, "epochs": 2, "batch_size": 64},
        "data": {"name": "digits"},
    }
    for key, value in overrides.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return spec


def wait_for_trial(client: FlaskClient, trial_id: str, until: Callable[[dict], bool] | None = None, timeout_s: float = 120) -> dict:
    """Poll GET /trials/{id} until ``until`` holds (default: the trial ended)."""
    until = until or (lambda t: t["status"] not in ("queued", "running"))
    deadline = time.monotonic() + timeout_s
    while True:
        response = client.get(f"/trials/{trial_id}")
        assert response.status_code == 200, response.get_json()
        trial = response.get_json()
        if until(trial):
            return trial
        assert time.monotonic() < deadline, f"trial {trial_id} stuck: {trial['status']} ({trial.get('reason')})"
        time.sleep(0.25)


def write_npz(root: Path, name: str, **arrays: Any) -> str:
    import numpy as np

    np.savez(root / name, **arrays)
    return name


def experiments_named(client: Any, base: str) -> list[str]:
    """The ids of every experiment named ``base`` or ``base/...``: each team's of a test's app, and any made by hand
    with such a name (for counting what a test's requests created, wherever it landed)."""
    from mlflow.entities import ViewType

    found: list[str] = []
    token = None
    while True:
        page = client.search_experiments(view_type=ViewType.ALL, filter_string=f"name LIKE '{base}%'", max_results=1000, page_token=token)
        found += [e.experiment_id for e in page if e.name == base or e.name.startswith(f"{base}/")]
        token = page.token
        if not token:
            return found


def end_open_runs(client: Any, base: str) -> None:
    """End (KILLED, by MLflow, no callback) whatever a test module left queued or running in its experiments, so
    that no worker of the session ever runs it."""
    experiments = experiments_named(client, base)
    if experiments:
        for run in client.search_runs(experiments, filter_string="attributes.status != 'FINISHED'", max_results=5000):
            if run.info.status in ("SCHEDULED", "RUNNING"):
                client.set_terminated(run.info.run_id, status="KILLED")
