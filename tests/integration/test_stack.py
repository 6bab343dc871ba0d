"""`convtune up` brings the whole local stack up, serves a trial, and Ctrl-C stops every process,
also when it runs as a script's background job (SIGINT inherited ignored)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from unittest import mock

import httpx
import mlflow.artifacts
import mlflow.pytorch
import pytest
import redis
import torch
from mlflow.tracking import MlflowClient

from service.client import ConvtuneClient
from tests.conftest import ARTIFACTS, free_port, wait_for
from tests.service.test_stack_signals import IGNORING_SIGINT

pytestmark = pytest.mark.integration


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pids: set[int]) -> set[int]:
    return {p for p in pids if Path(f"/proc/{p}").exists() and "(Z)" not in _state(p)}


def _state(pid: int) -> str:
    try:
        return "(" + Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] + ")"
    except OSError:
        return "(X)"


def test_up_serves_a_trial_and_ctrl_c_stops_everything(tmp_path: Path, redis_url: str):
    # Its own Redis database: the session's worker consumes the cpu queue of redis_url's, and
    # would take this stack's trial to an MLflow server that has never heard of it.
    redis_url = redis_url.rsplit("/", 1)[0] + "/15"
    redis.Redis.from_url(redis_url).flushdb()
    home = tmp_path / "stack"
    api_port, mlflow_port = free_port(), free_port()
    log_path = ARTIFACTS / "convtune-up.log"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CONVTUNE_REDIS_URL": redis_url, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    # Started as `convtune up &` in a CI script starts it: with SIGINT ignored, which Python leaves ignored
    # unless the supervisor installs its own handler.
    convtune = [str(Path(sys.executable).parent / "convtune"), "up", "--home", str(home), "--api-port", str(api_port), "--mlflow-port", str(mlflow_port)]
    with open(log_path, "wb") as log:
        up = subprocess.Popen([sys.executable, "-c", IGNORING_SIGINT, *convtune], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    api = f"http://127.0.0.1:{api_port}"
    try:
        def ready() -> bool:
            try:
                return httpx.get(f"{api}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_for(lambda: ready() or up.poll() is not None, 150) and up.poll() is None, log_path.read_text()
        with ConvtuneClient(api) as client:
            accepted = client.submit_trial({"model": {"channels": [8, 16], "convs_per_stage": 1}, "optim": {"epochs": 1}})
            assert accepted["queue"] == "cpu" and f":{mlflow_port}/" in accepted["mlflow_url"]
            trial = client.wait_trial(accepted["id"], timeout_s=120)
        assert trial["status"] == "succeeded", trial["reason"]
        assert (home / "mlflow.db").exists() and (home / "logs" / "api.log").exists()
        # The workers wrote the artifacts straight into the server's store (issue 10); MLflow serves them as its own.
        written = {p.relative_to(home / "artifacts").parts[2:] for p in (home / "artifacts").rglob("*") if p.is_file() and accepted["id"] in p.parts}
        assert ("artifacts", "plots", "confusion_matrix.svg") in written, written
        # The logged model's files went there too: <experiment>/models/<model id>/artifacts/...
        models = {p.relative_to(home / "artifacts").parts[1:] for p in (home / "artifacts").rglob("MLmodel")}
        assert any(parts[0] == "models" and parts[2:] == ("artifacts", "MLmodel") for parts in models), models
        tracking = f"http://127.0.0.1:{mlflow_port}"
        assert {a.path for a in MlflowClient(tracking).list_artifacts(accepted["id"], "plots")} >= {"plots/learning_curve.svg", "plots/confusion_matrix.svg"}
        assert trial["model_uri"].startswith("models:/"), trial  # the trial's MLflow logged model
        # MLflow resolves models:/ (and runs:/<run>/model) URIs with the process's tracking URI, not the one passed here
        with mock.patch.dict(os.environ, {"MLFLOW_TRACKING_URI": tracking}):
            served = mlflow.artifacts.download_artifacts(artifact_uri=trial["model_uri"], dst_path=str(tmp_path / "served"))
        assert mlflow.pytorch.load_model(served)(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
        stack_pids = _descendants(up.pid)
        assert len(stack_pids) >= 4, "expected mlflow, a worker (and its pool) and gunicorn (and its workers)"
    finally:
        up.send_signal(signal.SIGINT)  # what Ctrl-C sends
        try:
            up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            raise
    output = log_path.read_text()
    assert "stack stopped" in output, output
    assert wait_for(lambda: not _alive(stack_pids), 10), f"left running: {_alive(stack_pids)}"
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{api}/healthz", timeout=2)
