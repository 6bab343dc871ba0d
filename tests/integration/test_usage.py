"""Compute accounting and quotas on the real stack: the API with teams, the session's worker, MLflow.

A trial's run carries what it used (device_seconds, cpu_seconds, train_flops, convtune.device_kind);
the worker's row in the usage table is what GET /usage sums, a team seeing only its own and an admin
every team's; a submit over a team's quota is a 429 naming the limit, and creates nothing.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from models.settings import TeamPolicy
from models.store.usage import open_usage
from service.api import create_app
from service.api.auth import hash_token
from service.api.settings import ApiSettings, TokenConfig
from tests.helpers import experiments_named, tiny_trial, wait_for_trial

pytestmark = pytest.mark.integration

SUFFIX = uuid.uuid4().hex[:6]
TEAM_A, TEAM_B, TEAM_Q = f"use-a-{SUFFIX}", f"use-b-{SUFFIX}", f"use-q-{SUFFIX}"
TOKENS = {"alice": (["read", "submit"], TEAM_A), "bob": (["read", "submit"], TEAM_B), "quinn": (["read", "submit"], TEAM_Q), "root": (["admin"], None)}
SECRETS = {name: f"ct_usage_{name}_{uuid.uuid4().hex}" for name in TOKENS}
SPACE = {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}


def as_(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SECRETS[name]}"}


@pytest.fixture(scope="module")
def settings(api_settings: ApiSettings, worker_env: dict[str, str]) -> ApiSettings:
    return api_settings.model_copy(update={
        "auth_disabled": False,
        "study_storage": worker_env["CONVTUNE_STUDY_STORAGE"],  # the workers': where they write the usage table
        "auth_tokens": [TokenConfig(name=n, sha256=hash_token(SECRETS[n]), scopes=s, team=t) for n, (s, t) in TOKENS.items()],
        "teams": {TEAM_Q: TeamPolicy(queued_device_seconds=100, device_seconds_per_day=1000, estimate="time_limit")},
    })


@pytest.fixture(scope="module")
def api(settings: ApiSettings):
    return create_app(settings).test_client()


class As:
    """``api`` with one token on every GET (wait_for_trial's client)."""

    def __init__(self, api, name: str):
        self.api, self.name = api, name

    def get(self, path: str, **kwargs: Any):
        return self.api.get(path, headers=as_(self.name), **kwargs)


@pytest.fixture(scope="module")
def trained(api, worker, mlflow_client) -> dict[str, list[str]]:
    """Two trials of team A and one of team B, trained by the session's worker: their ids by team."""
    ids: dict[str, list[str]] = {TEAM_A: [], TEAM_B: []}
    for name, team in (("alice", TEAM_A), ("alice", TEAM_A), ("bob", TEAM_B)):
        response = api.post("/trials", json=tiny_trial(), headers=as_(name))
        assert response.status_code == 202, response.get_json()
        ids[team].append(response.get_json()["id"])
    for name, team in (("alice", TEAM_A), ("bob", TEAM_B)):
        for trial_id in ids[team]:
            assert wait_for_trial(As(api, name), trial_id)["status"] == "succeeded"
    return ids


def recorded(mlflow_client, run_id: str) -> dict[str, float]:
    return mlflow_client.get_run(run_id).data.metrics


def test_a_trial_records_what_it_used_on_its_run_and_in_the_usage_table(trained, mlflow_client, settings):
    for trial_id in trained[TEAM_A] + trained[TEAM_B]:
        run = mlflow_client.get_run(trial_id)
        metrics = run.data.metrics
        assert metrics["device_seconds"] > 0 and metrics["cpu_seconds"] > 0 and metrics["train_flops"] > 0, metrics
        assert run.data.tags["convtune.device_kind"] == "cpu"
        flops_per_sample = int(run.data.tags["convtune.flops_per_sample"])
        assert metrics["train_flops"] == 3 * flops_per_sample * (1797 - round(0.2 * 1797)) * 2  # two epochs of digits' training share
        row = open_usage(settings.study_storage).get(trial_id)
        assert row["ended_at"] is not None and row["device_seconds"] == pytest.approx(metrics["device_seconds"])
        assert row["estimate"] >= 0 and row["queue"] == "cpu" and row["kind"] == "trial"


def test_usage_totals_equal_the_runs_recorded_device_seconds_and_a_team_sees_only_its_own(api, trained, mlflow_client):
    since = time.time() - 3600
    mine = api.get(f"/usage?since={since:.0f}", headers=as_("alice"))
    assert mine.status_code == 200, mine.get_json()
    doc = mine.get_json()
    assert doc["teams"] == [TEAM_A] and {row["team"] for row in doc["items"]} == {TEAM_A}
    assert doc["total"]["runs"] == 2
    assert doc["total"]["device_seconds"] == pytest.approx(sum(recorded(mlflow_client, r)["device_seconds"] for r in trained[TEAM_A]))
    assert doc["total"]["flops"] == pytest.approx(sum(recorded(mlflow_client, r)["train_flops"] for r in trained[TEAM_A]))

    every = api.get("/usage", headers=as_("root")).get_json()
    by_team = {row["team"]: row for row in every["items"]}
    for team in (TEAM_A, TEAM_B):
        assert by_team[team]["device_seconds"] == pytest.approx(sum(recorded(mlflow_client, r)["device_seconds"] for r in trained[team]))
    bob = api.get("/usage", headers=as_("bob")).get_json()
    assert [row["team"] for row in bob["items"]] == [TEAM_B]
    assert api.get("/usage?since=tomorrow", headers=as_("bob")).status_code == 400


def test_metrics_count_each_teams_use_by_device_kind(api, trained):
    text = api.get("/metrics").get_data(as_text=True)
    assert f'convtune_device_seconds_total{{device_kind="cpu",team="{TEAM_A}"}}' in text
    assert f'convtune_train_flops_total{{device_kind="cpu",team="{TEAM_B}"}}' in text


def count_runs(mlflow_client, experiment: str) -> int:
    ids = experiments_named(mlflow_client, experiment)
    return len(mlflow_client.search_runs(ids, max_results=5000)) if ids else 0


def test_a_submit_over_a_quota_is_a_429_naming_the_limit_and_creates_nothing(api, settings, mlflow_client):
    before = count_runs(mlflow_client, settings.experiment)
    over = api.post("/trials", json=tiny_trial(time_limit_s=150), headers=as_("quinn"))
    assert over.status_code == 429, over.get_json()
    assert over.mimetype == "application/problem+json" and int(over.headers["Retry-After"]) >= 1
    problem = over.get_json()
    assert problem["type"].endswith("/quota-exceeded")
    assert problem["quota"]["team"] == TEAM_Q and problem["quota"]["quota"] == "queued_device_seconds"
    assert problem["quota"]["limit"] == 100 and problem["quota"]["estimate"] == 150 and problem["quota"]["frees_at"] is None
    assert TEAM_Q in problem["detail"] and "queued_device_seconds" in problem["detail"]
    # A study of 3 trials of 60 s: 180 estimated against 100 queued.
    study = api.post("/studies", json={"base": tiny_trial(time_limit_s=60), "search_space": SPACE, "n_trials": 3}, headers=as_("quinn"))
    assert study.status_code == 429 and study.get_json()["quota"]["estimate"] == 180
    ranged = api.post("/lr-finder", json={"trial": tiny_trial(time_limit_s=120)}, headers=as_("quinn"))
    assert ranged.status_code == 429 and ranged.get_json()["quota"]["estimate"] == 120
    assert count_runs(mlflow_client, settings.experiment) == before, "a refused submit creates no run"


def test_accepted_work_counts_against_the_queued_quota_until_it_ends(api, settings, mlflow_client):
    first = api.post("/trials", json=tiny_trial(time_limit_s=60, queue="gpu"), headers=as_("quinn"))
    assert first.status_code == 202, first.get_json()  # parked on a queue no test worker serves: it stays queued
    trial_id = first.get_json()["id"]
    assert open_usage(settings.study_storage).get(trial_id)["ended_at"] is None
    second = api.post("/trials", json=tiny_trial(time_limit_s=60), headers=as_("quinn"))
    assert second.status_code == 429 and second.get_json()["quota"]["used"] == 60
    assert api.post(f"/trials/{trial_id}/cancel", headers=as_("quinn")).status_code == 202
    assert open_usage(settings.study_storage).get(trial_id)["ended_at"] is not None  # cancelled while queued: closed


def test_a_study_carries_the_sum_of_its_trials_and_a_range_test_records_its_own(api, worker, mlflow_client, settings):
    from tests.integration.test_studies import wait_for_study
    from tests.integration.test_tuning import wait_for_range_test

    study = api.post("/studies", json={"base": tiny_trial(), "search_space": SPACE, "n_trials": 2, "parallelism": 1}, headers=as_("alice"))
    assert study.status_code == 202, study.get_json()
    study_id = study.get_json()["id"]
    ranged = api.post("/lr-finder", json={"trial": tiny_trial(), "steps": 30}, headers=as_("bob"))
    assert ranged.status_code == 202, ranged.get_json()
    test_id = ranged.get_json()["id"]
    assert wait_for_study(As(api, "alice"), study_id)["state"] == "succeeded"
    assert wait_for_range_test(As(api, "bob"), test_id)["status"] == "succeeded"

    parent = mlflow_client.get_run(study_id)
    children = mlflow_client.search_runs([parent.info.experiment_id], filter_string=f"tags.`convtune.study_id` = '{study_id}'")
    assert len(children) == 2
    for key in ("device_seconds", "cpu_seconds", "train_flops"):
        assert parent.data.metrics[key] == pytest.approx(sum(c.data.metrics[key] for c in children)), key
    assert parent.data.tags["convtune.device_kind"] == "cpu"
    store = open_usage(settings.study_storage)
    assert store.get(study_id)["ended_at"] is not None and all(store.get(c.info.run_id)["kind"] == "study_trial" for c in children)
    metrics = mlflow_client.get_run(test_id).data.metrics
    assert metrics["device_seconds"] > 0 and metrics["train_flops"] > 0
    assert store.get(test_id)["kind"] == "lr_finder"
