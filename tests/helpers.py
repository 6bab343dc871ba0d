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
