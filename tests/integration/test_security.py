"""Issue 11 as an attacker plays it: two teams' tokens (A and B), a read-only token and an anonymous caller
against the real stack, trying every hole the issue names.

The app is the real Flask app with authentication on and the product's callback defaults (public
addresses on ports 80 and 443 only: loopback is NOT allowed here, unlike the rest of the suite), on
the session's real Redis and mlflow server, in an experiment of its own. Work it accepts goes to the
``gpu`` queue, which no test worker consumes, so whatever slipped through would still be there to
see. Each refused attempt checks its status and problem document, then that nothing happened:
no new MLflow run (and no run started, ended or changed status), no new message on any queue, no
registered model version or alias moved, and no request at the local receiver, to which a real
callback worker (allowed to reach loopback, so it *would* deliver) is listening. Only the registry
tests train, two one-epoch studies on the session's cpu worker, because owning a model name is
only real once a study registered it.
"""

from __future__ import annotations

import base64
import json
import queue
import sys
import threading
import time
import types
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import redis

import models.callbacks
from models.callbacks import (
    ID_HEADER,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    shown_url,
    signed_headers,
    trial_ended_event,
    verify_signature,
    webhook_key,
    webhook_secret,
)
from models.messages import CALLBACK_QUEUE, CallbackMessage, queue_lists
from models.store.runs import TAG
from models.store.share import Route
from service.api import create_app
from service.api.auth import REDACTED, hash_token
from service.api.settings import ApiSettings, TokenConfig
from tests.conftest import TEST_SECRET_KEY, Service, wait_for
from tests.helpers import end_open_runs, experiments_named, tiny_trial
from workers.callbacks.delivery import RefusedDestination, post_event
from workers.settings import WorkerSettings

pytestmark = pytest.mark.integration

# Two teams with two tokens each, team A's read-only person, an admin and a quota test's own team; every token not in
# TEAMS is a team of its own.
A, A2, B, B2, READER, ROOT, QUOTA = "team-a", "team-a-ci", "team-b", "team-b-ci", "reader", "root", "team-q"
SCOPES = {A: ["read", "submit"], A2: ["read", "submit"], B: ["read", "submit"], B2: ["read", "submit"], READER: ["read"], ROOT: ["admin"], QUOTA: ["read", "submit"]}
TEAMS = {A: "alpha", A2: "alpha", READER: "alpha", B: "beta", B2: "beta"}
SECRETS = {name: f"ct_sec_{name}_{uuid.uuid4().hex}" for name in SCOPES}
# Each team's callbacks are signed with its own key, derived from the session's secret key (tests/conftest.py).
CALLBACK_SECRET = webhook_secret(webhook_key(TEST_SECRET_KEY, TEAMS[A]))
# A public address on port 443: accepted at submit without DNS. No test ever delivers to it.
HOOK = "https://93.184.216.34/hooks/convtune?token=s3cret-of-team-a"
SPACE = {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}


def as_(name: str | None) -> dict[str, str]:
    return {} if name is None else {"Authorization": f"Bearer {SECRETS[name]}"}


def problem_of(response, status: int, slug: str | None = None) -> dict[str, Any]:
    """The response's problem document, after checking it is one, of ``status``."""
    assert response.status_code == status, (response.status_code, response.get_data(as_text=True)[:2000])
    assert response.mimetype == "application/problem+json"
    problem = response.get_json()
    assert problem["status"] == status and problem["detail"] and problem["type"].startswith("https://")
    if slug:
        assert problem["type"].endswith(f"/{slug}"), problem
    return problem


def field_error(response, status: int, field: str, *fragments: str) -> dict[str, Any]:
    """A 4xx naming ``field`` first, and saying each of ``fragments`` (the limit) in its detail."""
    problem = problem_of(response, status)
    assert problem.get("errors"), problem
    assert problem["errors"][0]["field"] == field, problem
    said = problem["detail"] + " " + problem["errors"][0]["message"]
    for fragment in fragments:
        assert fragment in said, (fragment, said)
    return problem


# --- the world: the app, a receiver, a callback worker, and what "nothing happened" means ------------


@pytest.fixture(scope="module")
def settings(api_settings: ApiSettings, worker_env: dict[str, str]) -> ApiSettings:
    defaults = ApiSettings.model_fields
    return api_settings.model_copy(update={
        "auth_disabled": False,
        "auth_tokens": [TokenConfig(name=n, sha256=hash_token(SECRETS[n]), scopes=s, team=TEAMS.get(n)) for n, s in SCOPES.items()],
        "experiment": f"security-{uuid.uuid4().hex[:8]}", "default_queue": "gpu",
        # The product's defaults, which the rest of the suite widens to loopback for its receivers.
        "callback_allowed_networks": defaults["callback_allowed_networks"].get_default(call_default_factory=True),
        "callback_ports": defaults["callback_ports"].get_default(), "callback_hosts": None,
        "study_storage": worker_env["CONVTUNE_STUDY_STORAGE"],  # the registry tests' studies run on the session's worker
    })


@pytest.fixture(scope="module")
def secure_app(settings: ApiSettings, mlflow_client):
    app = create_app(settings)
    yield app
    end_open_runs(mlflow_client, settings.experiment)


@pytest.fixture()
def api(secure_app):
    return secure_app.test_client()


class Receiver:
    """A local HTTP server that records every request it gets (path, headers, body)."""

    def __init__(self) -> None:
        self.received: queue.Queue[tuple[str, dict[str, str], bytes]] = queue.Queue()
        self.seen: list[tuple[str, dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def _record(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.received.put((self.path, dict(self.headers), body))
                self.send_response(204)
                self.end_headers()

            do_POST = do_GET = do_PUT = _record

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def drain(self) -> list[tuple[str, dict[str, str], bytes]]:
        while True:
            try:
                self.seen.append(self.received.get_nowait())
            except queue.Empty:
                return self.seen

    def paths_under(self, prefix: str) -> list[str]:
        return [path for path, _, _ in self.drain() if path.startswith(prefix)]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


@pytest.fixture(scope="module")
def callback_worker(worker_env: dict[str, str]) -> Iterator[Service]:
    """A real callback worker that signs, and that may reach loopback (worker_env): whatever the API queued for
    the receiver would arrive there. Short timeouts and no retries: the module's tests never wait on them."""
    env = {**worker_env, "CONVTUNE_CALLBACK_MAX_RETRIES": "0", "CONVTUNE_CALLBACK_TIMEOUT_S": "2"}
    argv = [sys.executable, "-m", "celery", "-A", "workers.callbacks.app", "worker", "-P", "threads", "-c", "2", "-Q", CALLBACK_QUEUE,
            "-n", f"security-callbacks-{uuid.uuid4().hex[:6]}@%h", "--loglevel", "INFO", "--without-gossip", "--without-mingle"]
    w = Service("security-callback-worker", argv, env)
    if not wait_for(lambda: " ready." in w.log() or not w.alive(), 60) or not w.alive():
        w.stop()
        pytest.fail(f"callback worker did not start:\n{w.log()[-3000:]}")
    yield w
    w.stop()


@dataclass(frozen=True)
class Snapshot:
    runs: dict[str, str]  # run id -> MLflow status, in the module's experiments (every team's)
    messages: dict[str, frozenset[str]]  # messages waiting on the gpu, cpu and callbacks queues: id -> the run ids they name
    registry: frozenset[tuple[str, str]]  # (model, version) and (model, "@alias=version")


def _named_runs(raw: bytes) -> tuple[str, frozenset[str]]:
    """A queued kombu message's id and the run ids its convtune message names (trial, range test, study, event)."""
    envelope = json.loads(raw)
    [_, kwargs, _] = json.loads(base64.b64decode(envelope["body"]))
    message = kwargs.get("message", {})
    event = message.get("event") or {}
    named = [message.get(k) for k in ("trial_id", "run_id", "study_id")]
    named += [(event.get(k) or {}).get(f) for k in ("trial", "study") for f in ("id", "study_id")]
    return envelope["headers"]["id"], frozenset(n for n in named if n)


class Evidence:
    """What exists now, to tell that an attempt changed nothing."""

    def __init__(self, mlflow_client, redis_url: str, experiment: str):
        self.mlflow, self.redis, self.experiment = mlflow_client, redis.Redis.from_url(redis_url), experiment

    def snapshot(self) -> Snapshot:
        from mlflow.entities import ViewType

        found = experiments_named(self.mlflow, self.experiment)
        runs = {} if not found else {
            r.info.run_id: r.info.status for r in self.mlflow.search_runs(found, run_view_type=ViewType.ALL, max_results=5000)
        }
        messages = {}
        for name in ("gpu", "cpu", CALLBACK_QUEUE):
            for key in queue_lists(name):
                for raw in self.redis.lrange(key, 0, -1):
                    message_id, named = _named_runs(raw)
                    messages[message_id] = named
        registry = set()
        for model in self.mlflow.search_registered_models(max_results=1000):
            registry |= {(model.name, f"@{alias}={version}") for alias, version in (model.aliases or {}).items()}
        registry |= {(v.name, str(v.version)) for v in self.mlflow.search_model_versions(max_results=10_000)}
        return Snapshot(runs, messages, frozenset(registry))

    def assert_unchanged(self, before: Snapshot, what: str = "") -> None:
        after = self.snapshot()
        assert set(after.runs) - set(before.runs) == set(), f"{what}: a run was created"
        changed = {rid: (before.runs[rid], status) for rid, status in after.runs.items() if rid in before.runs and before.runs[rid] != status}
        assert not changed, f"{what}: a run changed status: {changed}"
        # Only messages about this module's runs count: the session's workers may still re-send other modules' work.
        queued = {mid: named for mid, named in after.messages.items() if mid not in before.messages and (named & set(after.runs) or not named)}
        assert not queued, f"{what}: a message was queued: {queued}"
        assert after.registry == before.registry, f"{what}: the model registry changed: {after.registry ^ before.registry}"


@pytest.fixture(scope="module")
def evidence(mlflow_client, redis_url: str, settings: ApiSettings, secure_app) -> Evidence:
    return Evidence(mlflow_client, redis_url, settings.experiment)


@dataclass(frozen=True)
class TeamA:
    trial: str
    study: str
    range_test: str


@pytest.fixture(scope="module")
def team_a(secure_app) -> TeamA:
    """Team A's queued work, each with a secret-bearing callback URL: a trial, a study, a range test."""
    api = secure_app.test_client()
    trial = api.post("/trials", json=tiny_trial(name="a-trial", callback_url=HOOK), headers=as_(A))
    study = api.post("/studies", json={
        "base": tiny_trial(callback_url=HOOK), "search_space": SPACE, "n_trials": 2, "callback_url": HOOK, "name": "a-study",
    }, headers=as_(A))
    range_test = api.post("/lr-finder", json={"trial": tiny_trial(callback_url=HOOK)}, headers=as_(A))
    for response in (trial, study, range_test):
        assert response.status_code == 202, response.get_json()
    return TeamA(trial.get_json()["id"], study.get_json()["id"], range_test.get_json()["id"])


def creating_requests(a: TeamA) -> list[tuple[str, Any]]:
    """Every POST that creates or changes work, aimed at team A's objects where it names one."""
    return [
        ("/trials", tiny_trial()),
        ("/studies", {"base": tiny_trial(), "search_space": SPACE, "n_trials": 2}),
        ("/lr-finder", {"trial": tiny_trial()}),
        (f"/trials/{a.trial}/cancel", None),
        (f"/studies/{a.study}/cancel", None),
        (f"/studies/{a.study}/extend", {"n_trials": 1}),
        (f"/lr-finder/{a.range_test}/cancel", None),
    ]


def post(api, path: str, body: Any, who: str | None, **headers: str):
    return api.post(path, json=body, headers={**as_(who), **headers}) if body is not None else api.post(path, headers={**as_(who), **headers})


UNUSED = "0" * 32  # a well-formed run id nobody used


def _unused(path: str, a: TeamA) -> tuple[str, str]:
    """``path`` with the id of team A's work in it replaced by :data:`UNUSED`, and that id."""
    [run_id] = [run_id for run_id in (a.trial, a.study, a.range_test) if run_id in path]
    return path.replace(run_id, UNUSED), run_id


def test_this_module_runs_with_the_product_callback_defaults(secure_app):
    s = secure_app.extensions["convtune"].settings
    assert s.callback_allowed_networks == [] and s.callback_ports == [80, 443] and s.callback_hosts is None
    assert not s.auth_disabled


# --- who may do what ------------------------------------------------------------------------------


def test_an_anonymous_caller_reads_nothing_and_creates_nothing(api, team_a, evidence):
    reads = ("/trials", "/studies", f"/trials/{team_a.trial}", f"/studies/{team_a.study}", f"/studies/{team_a.study}/trials", f"/lr-finder/{team_a.range_test}")
    for path in reads:
        response = api.get(path)
        problem_of(response, 401, "unauthorized")
        assert response.headers["WWW-Authenticate"].startswith("Bearer") and "s3cret" not in response.get_data(as_text=True)
    before = evidence.snapshot()
    for path, body in creating_requests(team_a):
        for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": f"Bearer {SECRETS[A]}x"}, {"Authorization": f"Basic {SECRETS[A]}"}):
            problem_of(api.post(path, json=body, headers=headers) if body is not None else api.post(path, headers=headers), 401, "unauthorized")
    evidence.assert_unchanged(before, "anonymous")


def test_a_read_token_cannot_submit_cancel_or_extend(api, team_a, evidence):
    before = evidence.snapshot()
    for path, body in creating_requests(team_a):
        problem = problem_of(post(api, path, body, READER), 403, "forbidden")
        assert "submit" in problem["detail"], path
    evidence.assert_unchanged(before, "read token")


def test_team_b_reads_nothing_of_team_a_s_work_and_team_a_reads_all_of_it(api, team_a, evidence):
    reads = [f"/trials/{team_a.trial}", f"/studies/{team_a.study}", f"/studies/{team_a.study}/trials", f"/lr-finder/{team_a.range_test}"]
    ids = (team_a.trial, team_a.study, team_a.range_test)
    before = evidence.snapshot()
    for who in (B, B2):
        for path in reads:
            # Not a 403: that would confirm the id exists. The answer an unused id gets, word for word.
            problem = problem_of(api.get(path, headers=as_(who)), 404, "not-found")
            unused_path, run_id = _unused(path, team_a)
            nobody = problem_of(api.get(unused_path, headers=as_(who)), 404, "not-found")
            assert problem["detail"] == nobody["detail"].replace(UNUSED, run_id), path
        for path in ("/trials?limit=200", "/trials?status=queued&limit=200", "/studies?limit=200"):
            response = api.get(path, headers=as_(who))
            assert response.status_code == 200 and not any(run_id in response.get_data(as_text=True) for run_id in ids), (who, path)
    evidence.assert_unchanged(before, "team B reading")
    # Team A's other token and its read-only person read all of it, and so does an admin.
    for who in (A2, READER, ROOT):
        for path in reads:
            assert api.get(path, headers=as_(who)).status_code == 200, (who, path)
        assert team_a.trial in {t["id"] for t in api.get("/trials?limit=200", headers=as_(who)).get_json()["items"]}, who
        assert team_a.study in {s["id"] for s in api.get("/studies?limit=200", headers=as_(who)).get_json()["items"]}, who
    b_trial = api.post("/trials", json=tiny_trial(name="b-trial"), headers=as_(B)).get_json()["id"]
    assert b_trial not in {t["id"] for t in api.get("/trials?limit=200", headers=as_(A)).get_json()["items"]}
    assert b_trial in {t["id"] for t in api.get("/trials?limit=200", headers=as_(ROOT)).get_json()["items"]}
    assert api.post(f"/trials/{b_trial}/cancel", headers=as_(B2)).status_code == 202


def test_team_b_cannot_cancel_or_extend_team_a_s_trial_study_or_range_test(api, team_a, evidence):
    budget = api.get(f"/studies/{team_a.study}", headers=as_(A)).get_json()["progress"]["n_trials"]
    before = evidence.snapshot()
    for path, body in creating_requests(team_a)[3:]:
        for who in (B, B2):
            # Team A's work does not exist for team B: the answer an unused id gets, word for word.
            problem = problem_of(post(api, path, body, who), 404, "not-found")
            unused_path, run_id = _unused(path, team_a)
            nobody = problem_of(post(api, unused_path, body, who), 404, "not-found")
            assert problem["detail"] == nobody["detail"].replace(UNUSED, run_id), path
            # the same attempt with another token's Idempotency-Key (A's objects never had one) changes nothing either
            problem_of(post(api, path, body, who, **{"Idempotency-Key": uuid.uuid4().hex}), 404, "not-found")
    evidence.assert_unchanged(before, "team B on team A's work")
    assert api.get(f"/trials/{team_a.trial}", headers=as_(A)).get_json()["status"] == "queued"
    assert api.get(f"/lr-finder/{team_a.range_test}", headers=as_(A)).get_json()["status"] == "queued"
    study = api.get(f"/studies/{team_a.study}", headers=as_(A)).get_json()
    assert study["state"] == "queued" and study["progress"]["n_trials"] == budget


def test_a_submit_token_cannot_do_what_only_admins_may(api, secure_app, evidence, mlflow_client):
    # An owner-less run (made by hand, or before owners were recorded) is an admin's alone: no team sees it.
    from models.spec.trial import TrialSpec, flatten_params
    from models.store.runs import create_run, trial_tags

    spec = TrialSpec.model_validate(tiny_trial())
    runs = secure_app.extensions["convtune"].runs
    ownerless = create_run(runs.client, runs.experiment_id(None), name="by hand", tags=trial_tags(spec, None, "gpu"), params=flatten_params(spec))
    by_hand = f"by-hand-{uuid.uuid4().hex[:6]}"
    mlflow_client.create_registered_model(by_hand)  # a registered model without an owner
    before = evidence.snapshot()
    problem_of(api.post(f"/trials/{ownerless}/cancel", headers=as_(B)), 404, "not-found")
    problem_of(api.get(f"/trials/{ownerless}", headers=as_(B)), 404, "not-found")
    study = {"base": tiny_trial(), "search_space": SPACE, "n_trials": 1, "register_as": by_hand}
    assert by_hand in problem_of(api.post("/studies", json=study, headers=as_(B)), 403, "forbidden")["detail"]
    evidence.assert_unchanged(before, "submit token doing admin things")
    assert api.post(f"/trials/{ownerless}/cancel", headers=as_(ROOT)).status_code == 202


def test_no_token_can_forge_an_owner(api, evidence, mlflow_client):
    before = evidence.snapshot()
    for path, body, field in (
        ("/trials", {**tiny_trial(), "owner": A}, "owner"),
        ("/studies", {"base": tiny_trial(), "search_space": SPACE, "owner": A}, "owner"),
        ("/studies", {"base": {**tiny_trial(), "owner": A}, "search_space": SPACE}, "base.owner"),
        ("/lr-finder", {"trial": tiny_trial(), "owner": A}, "owner"),
    ):
        field_error(api.post(path, json=body, headers=as_(B)), 422, field)
    evidence.assert_unchanged(before, "an owner field in the body")
    # A tag that looks like the owner's is only a user tag: the run is still B's, and A cannot touch it.
    forged = api.post("/trials", json=tiny_trial(tags={"convtune.owner": A}), headers=as_(B))
    assert forged.status_code == 202, forged.get_json()
    trial_id = forged.get_json()["id"]
    tags = mlflow_client.get_run(trial_id).data.tags
    assert tags[TAG.OWNER] == B and tags[TAG.TEAM] == "beta" and tags["user.convtune.owner"] == A
    problem_of(api.post(f"/trials/{trial_id}/cancel", headers=as_(A)), 404, "not-found")
    # nor does a team tag: it is a user tag like any other
    forged = api.post("/trials", json=tiny_trial(tags={"convtune.team": "alpha"}), headers=as_(B)).get_json()["id"]
    assert mlflow_client.get_run(forged).data.tags[TAG.TEAM] == "beta"
    problem_of(api.get(f"/trials/{forged}", headers=as_(A)), 404, "not-found")
    assert api.post(f"/trials/{forged}/cancel", headers=as_(B2)).status_code == 202
    assert api.post(f"/trials/{trial_id}/cancel", headers=as_(B)).status_code == 202


def test_only_the_owner_and_admins_read_a_callback_url(api, team_a):
    views = {
        f"/trials/{team_a.trial}": lambda d: [d["spec"]["callback_url"]],
        f"/studies/{team_a.study}": lambda d: [d["spec"]["callback_url"], d["spec"]["base"]["callback_url"]],
        f"/lr-finder/{team_a.range_test}": lambda d: [d["spec"]["trial"]["callback_url"]],
    }
    for path, shown in views.items():
        assert api.get(path, headers=as_(B)).status_code == 404
        for who, sees in ((A, True), (ROOT, True), (READER, True)):
            response = api.get(path, headers=as_(who))
            assert response.status_code == 200, response.get_json()
            urls = shown(response.get_json())
            assert urls == [shown_url(HOOK) if sees else REDACTED] * len(urls), (path, who)  # where it goes, never the URL
            assert "s3cret-of-team-a" not in response.get_data(as_text=True), (path, who)
    for who in (B, B2):
        for path in ("/trials?limit=200", "/trials?status=queued&limit=200", "/studies?limit=200"):
            response = api.get(path, headers=as_(who))
            assert response.status_code == 200 and "s3cret-of-team-a" not in response.get_data(as_text=True), (path, who)


def test_a_callback_url_is_never_logged(api, caplog, mlflow_client):
    import logging

    secret = f"s3cret-{uuid.uuid4().hex}"
    with caplog.at_level(logging.DEBUG):
        accepted = api.post("/trials", json=tiny_trial(callback_url=f"https://93.184.216.34/h?token={secret}"), headers=as_(A))
        assert accepted.status_code == 202
        api.get(f"/trials/{accepted.get_json()['id']}", headers=as_(B))
        api.post(f"/trials/{accepted.get_json()['id']}/cancel", headers=as_(B))
    mlflow_client.set_terminated(accepted.get_json()["id"], status="KILLED")
    text = caplog.text + " ".join(str(r.__dict__) for r in caplog.records)
    assert secret not in text


def test_another_token_s_idempotency_key_neither_returns_nor_reveals_its_object(api, evidence, mlflow_client):
    same, other = f"shared-{uuid.uuid4().hex}", f"shared-{uuid.uuid4().hex}"
    body = tiny_trial(name="keyed")
    a_ids = []
    for key in (same, other):
        first = api.post("/trials", json=body, headers={**as_(A), "Idempotency-Key": key})
        assert first.status_code == 202
        a_ids.append(first.get_json()["id"])
    before = evidence.snapshot()
    # Keys are per token: B's request with A's key is B's own, never a replay of A's answer (same body),
    # nor a 409 that would tell the key is in use (another body).
    b_ids = []
    for key, attempt in ((same, body), (other, tiny_trial(name="another body"))):
        response = api.post("/trials", json=attempt, headers={**as_(B), "Idempotency-Key": key})
        assert response.status_code == 202, response.get_json()
        assert "Idempotent-Replayed" not in response.headers
        text = response.get_data(as_text=True) + response.headers.get("Location", "")
        assert not any(a_id in text for a_id in a_ids)
        b_ids.append(response.get_json()["id"])
    assert set(evidence.snapshot().runs) - set(before.runs) == set(b_ids)  # B's own two trials, nothing else
    for b_id in b_ids:
        assert mlflow_client.get_run(b_id).data.tags[TAG.OWNER] == B
        problem_of(api.post(f"/trials/{b_id}/cancel", headers=as_(A)), 404, "not-found")
        mlflow_client.set_terminated(b_id, status="KILLED")
    replay = api.post("/trials", json=body, headers={**as_(A), "Idempotency-Key": same})
    assert replay.get_json()["id"] == a_ids[0] and replay.headers["Idempotent-Replayed"] == "true"
    for a_id in a_ids:
        mlflow_client.set_terminated(a_id, status="KILLED")


# --- the model registry: a name belongs to the team that first claimed it (models.store.claims) -----


def _wait_for_study(api, study_id: str, who: str, timeout_s: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        study = api.get(f"/studies/{study_id}", headers=as_(who)).get_json()
        if study["state"] in ("succeeded", "failed", "cancelled"):
            return study
        assert time.monotonic() < deadline, f"study {study_id} stuck: {study['state']} {study['counts']}"
        time.sleep(0.5)


def _one_epoch_study(**overrides: Any) -> dict[str, Any]:
    return {
        "base": tiny_trial(queue="cpu", optim={"epochs": 1}), "search_space": {"model.activation": ["relu"]},
        "n_trials": 1, "parallelism": 1, "pruner": "none", **overrides,
    }


def _registry(mlflow_client, settings: ApiSettings, name: str) -> tuple[str | None, dict[str, str], list[str]]:
    """The team that claimed the name (the claims table, not a tag anyone may write), the model's aliases and versions."""
    from models.store.claims import open_claims

    claim = open_claims(settings.study_storage).holder(name)
    model = mlflow_client.get_registered_model(name)
    versions = sorted(str(v.version) for v in mlflow_client.search_model_versions(f"name='{name}'"))
    return None if claim is None else claim.team, {alias: str(v) for alias, v in (model.aliases or {}).items()}, versions


def test_a_model_name_registered_by_team_a_cannot_be_taken_or_repointed_by_team_b(api, worker, evidence, mlflow_client, settings):
    name = f"digits-{uuid.uuid4().hex[:6]}"
    accepted = api.post("/studies", json=_one_epoch_study(register_as=name, register_alias="prod"), headers=as_(A))
    assert accepted.status_code == 202, accepted.get_json()
    a_study = accepted.get_json()["id"]
    done = _wait_for_study(api, a_study, A)
    assert done["state"] == "succeeded" and done["registered_model"]["name"] == name, done
    assert _registry(mlflow_client, settings, name) == ("alpha", {"prod": "1"}, ["1"])

    before = evidence.snapshot()
    for overrides in ({"register_as": name, "register_alias": "prod"}, {"register_as": name}, {"register_as": name, "register_alias": "champion"}):
        problem = problem_of(api.post("/studies", json=_one_epoch_study(**overrides), headers=as_(B)), 403, "forbidden")
        assert name in problem["detail"] and "alpha" not in problem["detail"] and A not in problem["detail"]  # never whose it is
    # The study's own trials are team A's too: B may neither cancel one nor extend or cancel the study.
    problem_of(api.get(f"/studies/{a_study}/trials", headers=as_(B)), 404, "not-found")
    [child] = api.get(f"/studies/{a_study}/trials", headers=as_(A)).get_json()["items"]
    assert mlflow_client.get_run(child["trial_id"]).data.tags[TAG.OWNER] == A
    assert mlflow_client.get_run(child["trial_id"]).data.tags[TAG.TEAM] == "alpha"
    problem_of(api.get(f"/trials/{child['trial_id']}", headers=as_(B)), 404, "not-found")
    assert api.get(f"/trials/{child['trial_id']}", headers=as_(A2)).status_code == 200
    problem_of(api.post(f"/trials/{child['trial_id']}/cancel", headers=as_(B)), 404, "not-found")
    problem_of(api.post(f"/studies/{a_study}/extend", json={"n_trials": 5}, headers=as_(B)), 404, "not-found")
    problem_of(api.post(f"/studies/{a_study}/cancel", headers=as_(B)), 404, "not-found")
    evidence.assert_unchanged(before, "team B on team A's model name and study")
    problem_of(api.post(f"/trials/{child['trial_id']}/cancel", headers=as_(A)), 409, "conflict")  # for A it is only over
    assert _registry(mlflow_client, settings, name) == ("alpha", {"prod": "1"}, ["1"])


def test_a_model_made_in_mlflow_after_the_name_was_claimed_gets_nothing_from_the_claiming_study(api, worker, mlflow_client, settings):
    # B's study claims the name at submit; an MLflow user then makes a model of that name, tagged as team A's. The tag
    # makes it neither A's nor B's: the worker registers only into the model made under B's claim, so nothing is written.
    name = f"raced-{uuid.uuid4().hex[:6]}"
    accepted = api.post("/studies", json=_one_epoch_study(register_as=name, register_alias="prod"), headers=as_(B))
    assert accepted.status_code == 202, accepted.get_json()
    mlflow_client.create_registered_model(name, tags={TAG.OWNER: A, TAG.TEAM: "alpha"})  # well before B's one trial has trained
    done = _wait_for_study(api, accepted.get_json()["id"], B)
    assert done["registered_model"] is None, done
    assert _registry(mlflow_client, settings, name) == ("beta", {}, [])
    assert mlflow_client.get_registered_model(name).tags == {TAG.OWNER: A, TAG.TEAM: "alpha"}  # nothing overwritten
    assert "outside" in mlflow_client.get_run(accepted.get_json()["id"]).data.tags[TAG.REGISTRATION_ERROR]
    problem_of(api.post("/studies", json=_one_epoch_study(register_as=name), headers=as_(A)), 403, "forbidden")  # the claim is B's


# --- callbacks: signatures, and where they may go ---------------------------------------------------


def test_a_delivered_callback_is_signed_for_its_team_and_forged_or_replayed_signatures_are_refused(secure_app, callback_worker, receiver, monkeypatch):
    # The control: a message on the callbacks queue reaches the receiver, signed (so the receiver would see anything queued).
    path = f"/control/{uuid.uuid4().hex}"
    url = f"http://127.0.0.1:{receiver.port}{path}"
    event = trial_ended_event("c" * 32, name="control", status="succeeded", outcome="succeeded", reason="ok", metrics={"val_accuracy": 0.5})
    secure_app.extensions["convtune"].send(CallbackMessage(url=url, event=event, team=TEAMS[A]), Route(CALLBACK_QUEUE))
    assert wait_for(lambda: receiver.paths_under(path), 30), callback_worker.log()[-3000:]
    [(_, headers, body)] = [r for r in receiver.seen if r[0] == path]
    assert verify_signature(CALLBACK_SECRET, headers, body, destination=url)
    assert json.loads(body)["team"] == TEAMS[A] and headers[ID_HEADER] == event["delivery_id"]

    t = int(headers[TIMESTAMP_HEADER])
    altered = json.loads(body)
    altered["trial"]["outcome"] = "failed"
    forged = [
        (webhook_secret(webhook_key(TEST_SECRET_KEY, TEAMS[B])), headers, body),  # team B's receiver: another key
        (webhook_secret(webhook_key("guessed-key", TEAMS[A])), headers, body),  # a guessed master key
        (CALLBACK_SECRET, headers, json.dumps(altered, separators=(",", ":"), sort_keys=True).encode()),  # an altered body
        (CALLBACK_SECRET, headers, body + b" "),
        (CALLBACK_SECRET, {**headers, TIMESTAMP_HEADER: str(t + 60)}, body),  # the signature moved to a fresh timestamp
        (CALLBACK_SECRET, {**headers, ID_HEADER: uuid.uuid4().hex}, body),  # passed off as another delivery
        (CALLBACK_SECRET, signed_headers([webhook_key("guessed-key", TEAMS[A])], headers[ID_HEADER], body), body),  # signed by someone else
        (CALLBACK_SECRET, signed_headers([webhook_key(TEST_SECRET_KEY, TEAMS[A])], headers[ID_HEADER], body, t - 301), body),  # stale
        (CALLBACK_SECRET, {**headers, SIGNATURE_HEADER: "v1," + "A" * 44}, body),
        (CALLBACK_SECRET, {**headers, SIGNATURE_HEADER: ""}, body),
        (CALLBACK_SECRET, {**headers, TIMESTAMP_HEADER: "9" * 41}, body),
        (CALLBACK_SECRET, {**headers, SIGNATURE_HEADER: "v1,\u00e9"}, body),
    ]
    for secret, forged_headers, forged_body in forged:
        assert verify_signature(secret, forged_headers, forged_body) is False, (forged_headers, forged_body[:80])
    # Replayed to another of team A's receivers, it verifies but names the URL it was sent to.
    assert verify_signature(CALLBACK_SECRET, headers, body) and not verify_signature(CALLBACK_SECRET, headers, body, destination=url + "-other")
    # The same delivery replayed later than the tolerance is refused; within it, its webhook-id repeats, and receivers
    # drop an id they have seen.
    later = types.SimpleNamespace(time=lambda: t + 301)
    monkeypatch.setattr(models.callbacks, "time", later)
    assert verify_signature(CALLBACK_SECRET, headers, body) is False


def _internal_targets(port: int, tag: str) -> list[str]:
    return [
        f"http://127.0.0.1:{port}/{tag}/v4-loopback?token=x",
        f"http://[::1]:{port}/{tag}/v6-loopback",
        f"http://10.0.0.1/{tag}/private",
        f"http://169.254.169.254/{tag}/latest/meta-data/",
        f"http://localhost:{port}/{tag}/a-name-for-loopback",  # a host name: resolved, and its address checked
        f"http://localhost./{tag}/fqdn",
        f"http://127.1:{port}/{tag}/short-form",
        f"http://2130706433:{port}/{tag}/decimal-form",
        f"http://[::ffff:127.0.0.1]:{port}/{tag}/v4-mapped",
        f"http://0.0.0.0:{port}/{tag}/unspecified",
        "https://93.184.216.34:6379/not-an-allowed-port",
    ]


def test_callbacks_to_internal_targets_are_refused_at_submit_and_never_delivered(api, callback_worker, receiver, evidence, monkeypatch):
    tag = f"internal-{uuid.uuid4().hex[:8]}"
    routes = (
        ("/trials", lambda url: tiny_trial(callback_url=url), "callback_url"),
        ("/lr-finder", lambda url: {"trial": tiny_trial(callback_url=url)}, "trial.callback_url"),
        ("/studies", lambda url: {"base": tiny_trial(), "search_space": SPACE, "callback_url": url}, "callback_url"),
        ("/studies", lambda url: {"base": tiny_trial(callback_url=url), "search_space": SPACE}, "base.callback_url"),
    )
    before = evidence.snapshot()
    for url in _internal_targets(receiver.port, tag):
        for route, body, field in routes:
            response = api.post(route, json=body(url), headers=as_(A))
            assert response.status_code == 422, (route, url, response.get_json())
            field_error(response, 422, field)
            assert "CONVTUNE_CALLBACK_" in response.get_json()["detail"], (url, response.get_json())
    evidence.assert_unchanged(before, "internal callback targets")
    # Delivery resolves the same way, at connect: a name for loopback is refused there too (e.g. after rebinding).
    with pytest.raises(RefusedDestination, match="resolves to 127.0.0.1"):
        post_event(
            f"http://localhost:{receiver.port}/{tag}/at-delivery", {"event": "trial.ended", "delivery_id": "x"},
            WorkerSettings(callback_allowed_networks=[], secret_key=TEST_SECRET_KEY),
        )
    time.sleep(1.5)  # anything queued would have reached the receiver by now (see the control test)
    assert receiver.paths_under(f"/{tag}") == []


# --- limits on every door -------------------------------------------------------------------------

HUGE_NET = {"channels": [2048, 2048], "convs_per_stage": 6}  # 415M parameters
COSTLY_NET = {  # 104M parameters, under the cap, but 2 TFLOPs per sample
    "model": {"channels": [1024, 1024], "convs_per_stage": 6}, "data": {"name": "shapes", "image_size": 128, "num_samples": 100},
}
HUGE_DATA = {"data": {"name": "shapes", "image_size": 128, "num_samples": 50_000}}  # 9 GiB of images
TRIAL_LIMITS = [  # (trial overrides, field, what the detail says)
    ({"model": HUGE_NET}, "model.channels", "200,000,000"),
    (COSTLY_NET, "model.channels", "50,000,000,000"),
    (HUGE_DATA, "data.num_samples", "2.0 GiB"),
    ({"optim": {"epochs": 1001}}, "optim.epochs", "1000"),
]


def _oversized() -> list[tuple[str, str, dict[str, Any], str, str]]:
    cases = []
    for overrides, field, limit in TRIAL_LIMITS:
        trial = tiny_trial(**overrides)
        cases += [
            (f"/trials {field}", "/trials", trial, field, limit),
            (f"/lr-finder {field}", "/lr-finder", {"trial": trial}, f"trial.{field}", limit),
            (f"/studies base {field}", "/studies", {"base": trial, "search_space": {"model.activation": ["relu", "gelu"]}}, f"base.{field}", limit),
        ]
    six_convs = tiny_trial(model={"convs_per_stage": 6})
    return cases + [
        # Every configuration a search space can make is admitted like a trial, at submit.
        ("/studies space: a value too large", "/studies", {"base": six_convs, "search_space": {"model.channels": [[8, 16], [2048, 2048]]}},
         "search_space.model.channels", "200,000,000"),
        ("/studies space: too large together", "/studies",
         {"base": tiny_trial(),
          "search_space": {"model.convs_per_stage": {"type": "int", "low": 1, "high": 6}, "model.channels": [[8, 16], [2048, 2048]]}},
         "search_space.model.convs_per_stage", "200,000,000"),
        ("/studies space: costly", "/studies",
         {"base": tiny_trial(data=COSTLY_NET["data"]), "search_space": {"model.channels": [[8, 16], [1024, 1024]], "model.convs_per_stage": [1, 6]}},
         "search_space.model.channels", "50,000,000,000"),
        ("/studies space: epochs", "/studies", {"base": tiny_trial(), "search_space": {"optim.epochs": {"type": "int", "low": 1, "high": 5000}}},
         "search_space.optim.epochs.high", "1000"),
        ("/studies n_trials", "/studies", {"base": tiny_trial(), "search_space": SPACE, "n_trials": 1001}, "n_trials", "1000"),
        ("/studies parallelism", "/studies", {"base": tiny_trial(), "search_space": SPACE, "parallelism": 33}, "parallelism", "32"),
    ]


@pytest.mark.parametrize(("route", "body", "field", "limit"), [c[1:] for c in _oversized()], ids=[c[0] for c in _oversized()])
def test_oversized_work_is_refused_on_every_route_naming_field_and_limit(api, evidence, route, body, field, limit):
    before = evidence.snapshot()
    field_error(api.post(route, json=body, headers=as_(B)), 422, field, limit)
    evidence.assert_unchanged(before, route)


def test_a_lower_epoch_limit_holds_on_every_route(settings, evidence):
    api = create_app(settings.model_copy(update={"max_epochs": 10})).test_client()
    before = evidence.snapshot()
    for route, body, field in (
        ("/trials", tiny_trial(optim={"epochs": 11}), "optim.epochs"),
        ("/lr-finder", {"trial": tiny_trial(optim={"epochs": 11})}, "trial.optim.epochs"),
        ("/studies", {"base": tiny_trial(optim={"epochs": 11}), "search_space": SPACE}, "base.optim.epochs"),
        ("/studies", {"base": tiny_trial(), "search_space": {"optim.epochs": {"type": "int", "low": 2, "high": 20}}}, "search_space.optim.epochs"),
    ):
        field_error(api.post(route, json=body, headers=as_(B)), 422, field, "at most 10 epochs")
    evidence.assert_unchanged(before, "epochs")


def test_extending_past_the_trials_per_study_cap_is_refused(api, team_a, evidence):
    budget = api.get(f"/studies/{team_a.study}", headers=as_(A)).get_json()["progress"]["n_trials"]
    before = evidence.snapshot()
    for n in (1000, 1001 - budget, 10_001):
        field_error(api.post(f"/studies/{team_a.study}/extend", json={"n_trials": n}, headers=as_(A)), 422, "n_trials")
    problem = field_error(api.post(f"/studies/{team_a.study}/extend", json={"n_trials": 999}, headers=as_(A)), 422, "n_trials", "1000")
    assert "1000" in problem["errors"][0]["message"]
    evidence.assert_unchanged(before, "extend")
    assert api.get(f"/studies/{team_a.study}", headers=as_(A)).get_json()["progress"]["n_trials"] == budget


def test_a_body_over_the_size_limit_is_413_on_every_post(api, team_a, evidence, secure_app):
    limit = secure_app.extensions["convtune"].settings.max_body_bytes
    huge = {"name": "x" * (limit + 1)}
    before = evidence.snapshot()
    for path, _ in creating_requests(team_a):
        problem_of(api.post(path, json=huge, headers=as_(B)), 413, "payload-too-large")
    evidence.assert_unchanged(before, "413")


def test_queued_work_is_counted_across_kinds_per_token(settings, evidence):
    app = create_app(settings.model_copy(update={"max_queued_trials_per_token": 1}))
    api = app.test_client()
    assert api.post("/lr-finder", json={"trial": tiny_trial()}, headers=as_(QUOTA)).status_code == 202  # the one allowed
    before = evidence.snapshot()
    for route, body in creating_requests(TeamA("", "", ""))[:3]:
        response = api.post(route, json=body, headers=as_(QUOTA))
        problem = problem_of(response, 429, "too-many-requests")
        assert "the cap is 1" in problem["detail"] and int(response.headers["Retry-After"]) >= 1
    # another token's quota is its own
    evidence.assert_unchanged(before, "quota")
    other = api.post("/trials", json=tiny_trial(), headers=as_(B))
    assert other.status_code == 202
