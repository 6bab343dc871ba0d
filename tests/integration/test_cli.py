"""The ``convtune`` CLI against a running stack: gunicorn (``convtune api``), a real worker, MLflow, Redis.

Each command runs as a subprocess, the way a CI job runs it; the exit codes, --json, --junit and
--summary outputs are checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from service.api.auth import hash_token
from tests.conftest import Service, free_port, wait_for
from tests.helpers import tiny_trial

pytestmark = pytest.mark.integration

SUBMITTER = f"ct_cli_{uuid.uuid4().hex}"
READER = f"ct_cli_reader_{uuid.uuid4().hex}"
CLI = [sys.executable, "-c", "from service.cli.main import main; main()"]


@pytest.fixture(scope="module")
def api_url(redis_url: str, mlflow_uri: str, worker, worker_env: dict[str, str]) -> Iterator[str]:
    """``convtune api`` (gunicorn, two processes) with auth on, in front of the session's worker."""
    port = free_port()
    tokens = [
        {"name": "ci", "sha256": hash_token(SUBMITTER), "scopes": ["read", "submit"]},
        {"name": "dashboard", "sha256": hash_token(READER), "scopes": ["read"], "team": "ci"},  # reads the ci team's work
    ]
    env = {
        "CONVTUNE_REDIS_URL": redis_url, "CONVTUNE_MLFLOW_TRACKING_URI": mlflow_uri, "CONVTUNE_DEFAULT_QUEUE": "cpu",
        "CONVTUNE_EXPERIMENT": f"cli-{uuid.uuid4().hex[:8]}", "CONVTUNE_AUTH_TOKENS": json.dumps(tokens),
        "CONVTUNE_STUDY_STORAGE": worker_env["CONVTUNE_STUDY_STORAGE"],  # studies live where the workers look
        "CONVTUNE_RATE_LIMIT": "10000/minute", "CONVTUNE_SUBMIT_RATE_LIMIT": "10000/minute", "MLFLOW_DISABLE_TELEMETRY": "true",
        "CONVTUNE_UNSERVED_QUEUE_S": "0",  # a test parks a trial on the gpu queue, which no worker serves
    }
    server = Service("cli-api", [*CLI, "api", "--bind", f"127.0.0.1:{port}", "--workers", "2"], env)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    if not wait_for(lambda: ready() or not server.alive(), 90) or not server.alive():
        server.stop()
        pytest.fail(f"convtune api did not start:\n{server.log()[-3000:]}")
    yield url
    server.stop()


def convtune(*args: str, api: str | None = None, token: str | None = SUBMITTER, timeout_s: float = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVTUNE_")}
    env.update({"CONVTUNE_RETRIES": "1", "NO_COLOR": "1"})
    if api:
        env["CONVTUNE_API"] = api
    if token:
        env["CONVTUNE_TOKEN"] = token
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=timeout_s, stdin=subprocess.DEVNULL)


def spec_file(tmp_path: Path, spec: dict, name: str = "trial.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec) if name.endswith((".yaml", ".yml")) else json.dumps(spec))
    return str(path)


def test_submit_wait_require_met_exits_0_with_json_junit_and_summary(api_url, tmp_path):
    junit, summary = tmp_path / "reports" / "junit.xml", tmp_path / "summary.md"
    result = convtune(
        "submit", spec_file(tmp_path, tiny_trial(optim={"epochs": 3}, name="cli ok")), "--require", "val_accuracy>=0.3", "--require", "best.val_loss<10",
        "--json", "--junit", str(junit), "--summary", str(summary), api=api_url,
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["passed"] is True and document["exit_code"] == 0 and document["status"] == "succeeded"
    assert [c["passed"] for c in document["requirements"]] == [True, True]
    assert document["trial"]["metrics"]["val_accuracy"] == document["requirements"][0]["value"]
    assert "epochs" in result.stderr  # plain progress lines, not a TTY

    suite = ET.parse(junit).getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("1", "0", "0")
    assert suite.find("testcase").get("name") == "cli ok"
    text = summary.read_text()
    assert "| cli ok | succeeded |" in text and "✅" in text and "❌" not in text


def test_unmet_requirement_exits_4_and_reports_a_failure(api_url, tmp_path):
    junit, summary = tmp_path / "junit.xml", tmp_path / "summary.md"
    result = convtune("submit", spec_file(tmp_path, tiny_trial(optim={"epochs": 1}), "trial.json"), "--require", "val_accuracy>=1.01",
                      "--junit", str(junit), "--summary", str(summary), api=api_url)
    assert result.returncode == 4, result.stdout + result.stderr
    assert "requirement not met" in result.stdout and "val_accuracy" in result.stdout
    failure = ET.parse(junit).getroot().find("testsuite/testcase/failure")
    assert failure is not None and failure.get("type") == "requirement"
    assert "❌" in summary.read_text()


def test_failed_trial_exits_1(api_url, tmp_path):
    spec = tiny_trial(data={"name": "npz", "path": "no-such-file.npz"})  # the API cannot see the data root: the worker fails it
    junit = tmp_path / "junit.xml"
    result = convtune("submit", spec_file(tmp_path, spec), "--wait", "--junit", str(junit), api=api_url)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "failed" in result.stdout
    assert ET.parse(junit).getroot().find("testsuite/testcase/error").get("type") == "invalid_data"


def test_invalid_spec_exits_2_naming_the_field(api_url, tmp_path):
    result = convtune("submit", spec_file(tmp_path, tiny_trial(model={"kernel_size": 4})), api=api_url)
    assert result.returncode == 2
    assert "model.kernel_size" in result.stderr
    unreadable = tmp_path / "broken.yaml"
    unreadable.write_text("model: [unclosed")
    assert convtune("submit", str(unreadable), api=api_url).returncode == 2
    assert convtune("submit", spec_file(tmp_path, tiny_trial()), "--require", "accuracy is high", api=api_url).returncode == 2


def test_unreachable_service_exits_3(tmp_path):
    result = convtune("submit", spec_file(tmp_path, tiny_trial()), api=f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 3 and "unreachable" in result.stderr


def test_auth_failures_exit_5(api_url, tmp_path):
    assert convtune("submit", spec_file(tmp_path, tiny_trial()), api=api_url, token="not-a-token").returncode == 5
    assert convtune("submit", spec_file(tmp_path, tiny_trial()), api=api_url, token=None).returncode == 5
    forbidden = convtune("submit", spec_file(tmp_path, tiny_trial()), api=api_url, token=READER)
    assert forbidden.returncode == 5 and "submit" in forbidden.stderr


def test_status_wait_timeout_and_cancel_by_id(api_url, tmp_path):
    submitted = convtune("submit", spec_file(tmp_path, tiny_trial(queue="gpu")), "--json", api=api_url)  # no gpu worker: stays queued
    assert submitted.returncode == 0, submitted.stderr
    trial_id = json.loads(submitted.stdout)["id"]
    status = convtune("status", trial_id, "--json", api=api_url, token=READER)
    assert status.returncode == 0 and json.loads(status.stdout)["kind"] == "trial" and json.loads(status.stdout)["status"] == "queued"
    waited = convtune("wait", trial_id, "--timeout", "1", api=api_url)
    assert waited.returncode == 6 and "queued" in waited.stderr
    cancelled = convtune("cancel", trial_id, api=api_url)
    assert cancelled.returncode == 0 and "cancel" in cancelled.stdout
    assert convtune("wait", trial_id, api=api_url).returncode == 1  # it ended cancelled
    assert convtune("status", "0" * 32, api=api_url).returncode == 2


def test_study_create_wait_gate_and_best(api_url, tmp_path):
    study = {
        "name": "cli study", "base": tiny_trial(optim={"epochs": 2}), "n_trials": 2, "parallelism": 1,
        "search_space": {"optim.lr": {"type": "categorical", "choices": [0.003, 0.01]}}, "sampler": {"name": "grid"},
    }
    junit, summary = tmp_path / "study.xml", tmp_path / "study.md"
    result = convtune("study", "create", spec_file(tmp_path, study, "study.yaml"), "--require", "val_accuracy>=0.3",
                      "--json", "--junit", str(junit), "--summary", str(summary), api=api_url, timeout_s=300)
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads(result.stdout)
    assert document["kind"] == "study" and document["status"] == "succeeded" and document["passed"]
    best_id = document["best_trial"]["id"]
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite.get("tests") == "2" and suite.get("failures") == "0"
    assert "| requirements |" in summary.read_text()

    best = convtune("best", document["id"], "--json", "--require", "val_accuracy>=1.01", api=api_url)
    assert best.returncode == 4
    assert json.loads(best.stdout)["best_trial"]["id"] == best_id


def test_ls_filters_and_study_extend(api_url, tmp_path):
    tag = f"cli-ls-{uuid.uuid4().hex[:6]}"
    parked = json.loads(convtune("submit", spec_file(tmp_path, tiny_trial(queue="gpu", tags={"suite": tag})), "--json", api=api_url).stdout)["id"]
    listed = convtune("ls", "--tag", f"suite={tag}", "--status", "queued", "--json", api=api_url)
    assert listed.returncode == 0, listed.stderr
    assert [t["id"] for t in json.loads(listed.stdout)["items"]] == [parked]
    table = convtune("ls", "--tag", f"suite={tag}", api=api_url)
    assert table.returncode == 0 and parked in table.stdout and "queued" in table.stdout
    assert convtune("ls", "--tag", "suite='x'", api=api_url).returncode == 2  # the API's 422, naming the filter
    convtune("cancel", parked, api=api_url)

    study = {
        "base": tiny_trial(optim={"epochs": 1}), "n_trials": 1, "parallelism": 1, "tags": {"suite": tag},
        "search_space": {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}, "sampler": {"name": "random"},
    }
    created = convtune("study", "create", spec_file(tmp_path, study, "study.yaml"), "--wait", "--json", api=api_url, timeout_s=300)
    study_id = json.loads(created.stdout)["id"]
    extended = convtune("study", "extend", study_id, "--trials", "1", "--wait", "--json", api=api_url, timeout_s=300)
    assert extended.returncode == 0, extended.stdout + extended.stderr
    assert json.loads(extended.stdout)["study"]["progress"]["finished"] == 2
    studies = convtune("ls", "studies", "--tag", f"suite={tag}", "--json", api=api_url)
    assert [s["id"] for s in json.loads(studies.stdout)["items"]] == [study_id]
    of_study = convtune("ls", "trials", "--study", study_id, "--status", "succeeded", "--json", api=api_url)
    assert len(json.loads(of_study.stdout)["items"]) == 2


def test_logs_prints_a_trials_own_log_lines(api_url, tmp_path):
    submitted = convtune("submit", spec_file(tmp_path, tiny_trial(optim={"epochs": 2})), "--wait", "--json", api=api_url)
    trial_id = json.loads(submitted.stdout)["id"]
    printed = convtune("logs", trial_id, api=api_url)
    assert printed.returncode == 0, printed.stderr
    assert f"run {trial_id}, attempt 1" in printed.stdout and f"trial {trial_id}: training on cpu" in printed.stdout, printed.stdout[-2000:]
    missing = convtune("logs", "0" * 32, api=api_url)
    assert missing.returncode == 2 and "no LR range test with id" in missing.stdout + missing.stderr


def test_lr_find_prints_the_suggested_learning_rate(api_url, tmp_path):
    result = convtune("lr-find", spec_file(tmp_path, {"trial": tiny_trial()}), "--json", api=api_url, timeout_s=300)
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads(result.stdout)
    assert document["status"] == "succeeded" and document["suggested_lr"] > 0


def test_metrics_sum_every_gunicorn_process(api_url):
    """Under two gunicorn processes, every scrape counts the requests both of them answered."""
    from concurrent.futures import ThreadPoolExecutor

    route = '/metrics'
    marker = f"/trials/{uuid.uuid4().hex}"  # a route+status pair no other test produces: GET of an unknown trial id is 404

    def count() -> float:
        text = httpx.get(f"{api_url}{route}", timeout=10).text
        line = next((ln for ln in text.splitlines() if ln.startswith('convtune_http_request_duration_seconds_count{') and 'route="/trials/<trial_id>"' in ln and 'status="404"' in ln), None)
        return float(line.rsplit(" ", 1)[1]) if line else 0.0

    before = count()
    headers = {"Authorization": f"Bearer {READER}"}
    with ThreadPoolExecutor(8) as pool:  # concurrent: both sync workers must answer some
        statuses = list(pool.map(lambda _: httpx.get(f"{api_url}{marker}", headers=headers, timeout=10).status_code, range(24)))
    assert statuses == [404] * 24
    assert {count() - before for _ in range(6)} == {24.0}
    text = httpx.get(f"{api_url}/metrics", timeout=10).text
    assert 'convtune_workers{queue="cpu"} 1.0' in text
    assert 'convtune_queue_depth{queue="cpu"}' in text and "convtune_trials_ended_total" in text
