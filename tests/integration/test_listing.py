"""Lists of trials and studies: filters by status, study, team, owner, tag and time, one status vocabulary, one pagination style.

The real app with auth on (two teams) against the session's MLflow server and worker; the trials it
only lists wait on the ``gpu`` queue, which no worker of the session serves.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone

import pytest

from service.api import create_app
from service.api.auth import hash_token
from service.api.settings import TokenConfig
from tests.helpers import tiny_trial

pytestmark = pytest.mark.integration

SECRETS = {name: f"ct_list_{name}_{uuid.uuid4().hex}" for name in ("alpha", "alpha-ci", "beta", "root")}
TEAMS = {"alpha": "alpha", "alpha-ci": "alpha", "beta": "beta", "root": "ops"}


def _as(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SECRETS[name]}"}


@pytest.fixture(scope="module")
def api(api_settings, worker_env):
    tokens = [
        TokenConfig(name=name, sha256=hash_token(secret), scopes=["admin"] if name == "root" else ["read", "submit"], team=TEAMS[name])
        for name, secret in SECRETS.items()
    ]
    settings = api_settings.model_copy(update={
        "auth_disabled": False, "auth_tokens": tokens, "experiment": f"listing-{uuid.uuid4().hex[:8]}",
        "study_storage": worker_env["CONVTUNE_STUDY_STORAGE"],
    })
    return create_app(settings).test_client()


def _submit(api, who: str, **spec) -> str:
    response = api.post("/trials", json=tiny_trial(queue="gpu", **spec), headers=_as(who))
    assert response.status_code == 202, response.get_json()
    return response.get_json()["id"]


def _ids(api, who: str, query: str) -> set[str]:
    response = api.get(f"/trials?{query}", headers=_as(who))
    assert response.status_code == 200, response.get_json()
    return {t["id"] for t in response.get_json()["items"]}


def test_trials_filter_by_owner_team_tag_and_time(api):
    before = datetime.now(timezone.utc)
    mine = _submit(api, "alpha", tags={"branch": "main"})
    time.sleep(0.05)
    middle = datetime.now(timezone.utc)
    ci = _submit(api, "alpha-ci", tags={"branch": "feature"})
    theirs = _submit(api, "beta", tags={"branch": "main"})

    assert {mine, ci} <= _ids(api, "alpha", "limit=200") and theirs not in _ids(api, "alpha", "limit=200")
    assert _ids(api, "alpha", "owner=alpha-ci") == {ci}
    assert _ids(api, "alpha", "tag=branch%3Dmain") == {mine}  # beta's is never in alpha's lists
    assert _ids(api, "alpha", f"since={middle.isoformat().replace('+', '%2B')}") == {ci}
    assert _ids(api, "alpha", f"since={before.timestamp()}&until={middle.timestamp()}") == {mine}
    assert _ids(api, "root", "team=beta&tag=branch%3Dmain") == {theirs}  # an admin narrows to one team
    assert _ids(api, "beta", "team=alpha") == set()  # a team's token sees its own team's only, whatever it asks
    assert _ids(api, "alpha", "status=queued&owner=alpha") == {mine}


@pytest.mark.parametrize("query, field", [
    ("tag=branch%3D%27x%27", "tag"),  # a quote could end MLflow's filter string: refused
    ("owner=a%20b", "owner"),
    ("since=yesterday", "since"),
    ("study=not-an-id", "study"),
    ("status=complete", "status"),  # Optuna's word, not a status
])
def test_a_bad_filter_is_a_422_naming_it(api, query, field):
    response = api.get(f"/trials?{query}", headers=_as("alpha"))
    assert response.status_code == 422 and response.mimetype == "application/problem+json", response.get_json()
    assert [e["field"] for e in response.get_json()["errors"]] == [field]


def test_a_studys_trials_use_the_trials_status_words_and_page_tokens(api, worker, mlflow_client):
    spec = {
        "base": tiny_trial(queue="cpu", optim={"epochs": 1}), "n_trials": 3, "parallelism": 1, "sampler": "random",
        "search_space": {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}, "tags": {"branch": "main"},
    }
    study_id = api.post("/studies", json=spec, headers=_as("alpha")).get_json()["id"]
    deadline = time.monotonic() + 180
    while api.get(f"/studies/{study_id}", headers=_as("alpha")).get_json()["state"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline
        time.sleep(0.5)
    page = api.get(f"/studies/{study_id}/trials?limit=2", headers=_as("alpha")).get_json()
    assert page["total"] == 3 and len(page["items"]) == 2 and page["next_page_token"]
    rest = api.get(f"/studies/{study_id}/trials?limit=2&page_token={page['next_page_token']}", headers=_as("alpha")).get_json()
    assert len(rest["items"]) == 1 and rest["next_page_token"] is None
    trials = page["items"] + rest["items"]
    assert sorted(t["number"] for t in trials) == [0, 1, 2]
    for t in trials:
        assert t["status"] == "succeeded" and t["state"] == "complete", t
        assert api.get(f"/trials/{t['trial_id']}", headers=_as("alpha")).get_json()["status"] == t["status"]  # one vocabulary
    assert api.get(f"/studies/{study_id}/trials?status=succeeded", headers=_as("alpha")).get_json()["total"] == 3
    assert api.get(f"/studies/{study_id}/trials?status=failed", headers=_as("alpha")).get_json()["total"] == 0
    assert _ids(api, "alpha", f"study={study_id}") == {t["trial_id"] for t in trials}
    studies = api.get("/studies?status=succeeded&tag=branch%3Dmain", headers=_as("alpha")).get_json()["items"]
    assert [s["id"] for s in studies] == [study_id]
    assert api.get("/studies?status=running", headers=_as("alpha")).get_json()["items"] == []
