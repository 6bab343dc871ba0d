"""Callbacks with teams: no callback URL in MLflow (tags, params, artifacts), each team's deliveries signed with its own key.

A real worker trains, the callback worker delivers to a local receiver, and the receiver verifies with
the standardwebhooks library, as a team's receiver would, using the key the admin-only route shows.
"""

from __future__ import annotations

import json
import queue
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from flask.testing import FlaskClient
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from models.callbacks import shown_url, verify_signature, webhook_key, webhook_secret
from models.messages import CALLBACK_QUEUE
from service.api import create_app
from service.api.auth import hash_token
from service.api.settings import ApiSettings, TokenConfig
from tests.conftest import TEST_SECRET_KEY, Service, wait_for
from tests.helpers import tiny_trial, wait_for_trial

pytestmark = pytest.mark.integration

ALPHA, BETA, ROOT = "alpha-ci", "beta-ci", "root"
TOKENS = {ALPHA: f"ct_{uuid.uuid4().hex}", BETA: f"ct_{uuid.uuid4().hex}", ROOT: f"ct_{uuid.uuid4().hex}"}
TEAMS = {ALPHA: "alpha", BETA: "beta", ROOT: "ops"}


class Receiver:
    """A local HTTP server that records every POST (headers, body) and answers 204."""

    def __init__(self) -> None:
        self.received: queue.Queue[tuple[dict[str, str], bytes]] = queue.Queue()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                receiver.received.put((dict(self.headers), self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def hook(self) -> tuple[str, str]:
        """A fresh callback URL with a secret in its query, and that secret."""
        secret = f"s3cret-{uuid.uuid4().hex}"
        return f"http://127.0.0.1:{self.port}/hooks/{uuid.uuid4().hex}?token={secret}", secret

    def next(self, timeout_s: float = 120) -> tuple[dict[str, str], bytes]:
        return self.received.get(timeout=timeout_s)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


@pytest.fixture(scope="module")
def team_app(api_settings: ApiSettings, worker_env: dict[str, str]):
    settings = api_settings.model_copy(update={
        "auth_disabled": False,
        "auth_tokens": [
            TokenConfig(name=n, sha256=hash_token(t), scopes=["admin"] if n == ROOT else ["read", "submit"], team=TEAMS[n]) for n, t in TOKENS.items()
        ],
        "study_storage": worker_env["CONVTUNE_STUDY_STORAGE"],  # the session's worker runs the study's steps
    })
    return create_app(settings)


def client_of(app, who: str) -> FlaskClient:
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {TOKENS[who]}"
    return client


@pytest.fixture(scope="module")
def callback_worker(worker_env: dict[str, str]) -> Iterator[Service]:
    """The callback worker, with the session's secret key (worker_env): it signs each team's events with that team's key."""
    argv = [sys.executable, "-m", "celery", "-A", "workers.callbacks.app", "worker", "-P", "threads", "-c", "2", "-Q", CALLBACK_QUEUE,
            "-n", f"team-callbacks-{uuid.uuid4().hex[:6]}@%h", "--loglevel", "INFO", "--without-gossip", "--without-mingle"]
    w = Service("team-callback-worker", argv, {**worker_env, "CONVTUNE_CALLBACK_BACKOFF_S": "1", "CONVTUNE_CALLBACK_MAX_RETRIES": "2"})
    if not wait_for(lambda: " ready." in w.log() or not w.alive(), 60) or not w.alive():
        w.stop()
        pytest.fail(f"callback worker did not start:\n{w.log()[-3000:]}")
    yield w
    w.stop()


def team_secret(team: str) -> str:
    return webhook_secret(webhook_key(TEST_SECRET_KEY, team))


def assert_signed_for(team: str, headers: dict[str, str], body: bytes, url: str) -> dict:
    """The delivery verifies with ``team``'s key (the standard library and ours) and no other team's; its event."""
    event = Webhook(team_secret(team)).verify(body, headers)
    assert event["team"] == team and event["destination"] == url
    assert verify_signature(team_secret(team), headers, body, destination=url)
    for other in ("beta" if team != "beta" else "alpha", "default"):
        with pytest.raises(WebhookVerificationError):
            Webhook(team_secret(other)).verify(body, headers)
    return event


def assert_nowhere_in_mlflow(mlflow_client, run_ids: list[str], *secrets: str) -> None:
    """None of ``secrets`` in any tag, param or artifact (every file, JSON and text read whole) of the runs."""
    assert run_ids
    for run_id in run_ids:
        run = mlflow_client.get_run(run_id)
        for where, values in (("tags", run.data.tags), ("params", run.data.params)):
            for key, value in values.items():
                assert not any(s in key or s in value for s in secrets), (run_id, where, key, value[:300])
        with tempfile.TemporaryDirectory() as tmp:
            for path in _artifact_files(mlflow_client, run_id):
                local = Path(mlflow_client.download_artifacts(run_id, path, tmp))
                data = local.read_bytes()
                if path.endswith(".json"):
                    json.loads(data)  # JSON artifacts are read as such, too
                assert not any(s.encode() in data for s in secrets), (run_id, path)


def _artifact_files(mlflow_client, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for item in mlflow_client.list_artifacts(run_id, path):
        if item.is_dir:
            found += _artifact_files(mlflow_client, run_id, item.path)
        elif (item.file_size or 0) < 5 * 2**20:
            found.append(item.path)
    return found


def test_a_trial_s_callback_url_is_sealed_out_of_mlflow_and_its_callback_is_signed_for_its_team(
    team_app, worker, callback_worker, receiver, mlflow_client,
):
    url, secret = receiver.hook()
    alpha = client_of(team_app, ALPHA)
    accepted = alpha.post("/trials", json=tiny_trial(name="team trial", callback_url=url))
    assert accepted.status_code == 202, accepted.get_json()
    trial_id = accepted.get_json()["id"]
    trial = wait_for_trial(alpha, trial_id)
    assert trial["status"] == "succeeded", trial["reason"]
    assert trial["spec"]["callback_url"] == shown_url(url)  # the team sees where it goes, never the URL

    headers, body = receiver.next()
    event = assert_signed_for("alpha", headers, body, url)
    assert event["trial"]["id"] == trial_id and headers["webhook-id"] == event["delivery_id"]
    tags = mlflow_client.get_run(trial_id).data.tags
    assert json.loads(tags["convtune.spec"])["callback_url"] is None and tags["convtune.sealed"]
    assert_nowhere_in_mlflow(mlflow_client, [trial_id], url, secret, url.split("?")[0])


def test_a_study_s_callback_urls_are_nowhere_in_mlflow_and_its_end_is_signed_for_its_team(
    team_app, worker, callback_worker, receiver, mlflow_client,
):
    url, secret = receiver.hook()
    base_url, base_secret = receiver.hook()
    beta = client_of(team_app, BETA)
    study = {
        "name": "team study", "base": tiny_trial(optim={"epochs": 1}, callback_url=base_url), "n_trials": 2, "parallelism": 1,
        "sampler": {"name": "grid"}, "search_space": {"optim.lr": {"type": "categorical", "choices": [0.003, 0.01]}}, "callback_url": url,
    }
    accepted = beta.post("/studies", json=study)
    assert accepted.status_code == 202, accepted.get_json()
    study_id = accepted.get_json()["id"]

    headers, body = receiver.next(timeout_s=240)
    event = assert_signed_for("beta", headers, body, url)
    assert event["event"] == "study.ended" and event["study"]["id"] == study_id and event["study"]["state"] == "succeeded"
    shown = beta.get(f"/studies/{study_id}").get_json()["spec"]
    assert shown["callback_url"] == shown_url(url) and shown["base"]["callback_url"] == shown_url(base_url)
    parent = mlflow_client.get_run(study_id)
    children = mlflow_client.search_runs([parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{study_id}'")
    assert len(children) == 2
    assert_nowhere_in_mlflow(mlflow_client, [study_id, *(c.info.run_id for c in children)], url, secret, base_url, base_secret)
    time.sleep(1)
    with pytest.raises(queue.Empty):  # the trials of a study never call back: only the study does
        receiver.next(timeout_s=2)


def test_a_range_test_s_callback_url_is_nowhere_in_mlflow(team_app, worker, receiver, mlflow_client):
    url, secret = receiver.hook()
    alpha = client_of(team_app, ALPHA)
    accepted = alpha.post("/lr-finder", json={"trial": tiny_trial(callback_url=url), "steps": 20})
    assert accepted.status_code == 202, accepted.get_json()
    test_id = accepted.get_json()["id"]
    assert wait_for(lambda: alpha.get(f"/lr-finder/{test_id}?curve=false").get_json()["status"] not in ("queued", "running"), 180)
    assert alpha.get(f"/lr-finder/{test_id}").get_json()["spec"]["trial"]["callback_url"] == shown_url(url)
    assert_nowhere_in_mlflow(mlflow_client, [test_id], url, secret)


def test_an_admin_reads_a_team_s_webhook_key_and_no_one_else_does(team_app):
    shown = client_of(team_app, ROOT).get("/teams/alpha/webhook-key")
    assert shown.status_code == 200, shown.get_json()
    assert shown.get_json() == {"team": "alpha", "version": 1, "secret": team_secret("alpha"), "signing_versions": [1]}
    refused = client_of(team_app, ALPHA).get("/teams/alpha/webhook-key")
    assert refused.status_code == 403 and refused.mimetype == "application/problem+json"
    assert team_app.test_client().get("/teams/alpha/webhook-key").status_code == 401
    assert client_of(team_app, ROOT).get("/teams/not$a$team/webhook-key").status_code == 422
    assert "/teams/{team}/webhook-key" in team_app.test_client().get("/openapi.json").get_json()["paths"]


def test_without_a_secret_key_callbacks_are_refused_at_submit_naming_the_field(api_settings: ApiSettings):
    client = create_app(api_settings.model_copy(update={"secret_key": None, "callback_secret": None})).test_client()
    hook = "https://93.184.216.34/hooks/x?token=t"
    for route, body, field in (
        ("/trials", tiny_trial(callback_url=hook), "callback_url"),
        ("/lr-finder", {"trial": tiny_trial(callback_url=hook)}, "trial.callback_url"),
        ("/studies", {"base": tiny_trial(), "search_space": {"optim.lr": [0.01]}, "callback_url": hook}, "callback_url"),
        ("/studies", {"base": tiny_trial(callback_url=hook), "search_space": {"optim.lr": [0.01]}}, "base.callback_url"),
    ):
        response = client.post(route, json=body)
        assert response.status_code == 422, (route, response.get_json())
        problem = response.get_json()
        assert problem["errors"][0]["field"] == field and "no secret key" in problem["detail"] and "callbacks are off" in problem["detail"]
    plain = client.post("/trials", json=tiny_trial(queue="gpu"))  # without a callback, all is as before
    assert plain.status_code == 202 and client.post(f"/trials/{plain.get_json()['id']}/cancel").status_code == 202
    assert client.get("/teams/default/webhook-key").status_code == 409
