"""Registered model names are claimed at submit, atomically, by teams (models.store.claims), on the real stack.

Two teams (alpha with two tokens, beta with two) and an admin against the real API with
authentication on, on the session's Redis, mlflow server and cpu worker, with the workers' study
storage (where the claims live). Each study trains one-epoch trials of a tiny net: a name's owner
is only real once a study registered into it.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import optuna
import pytest

from models.store.claims import SEAL_TAG, open_claims
from models.store.runs import TAG
from models.store.search import open_storage
from service.api import create_app
from service.api.auth import hash_token
from service.api.settings import ApiSettings, TokenConfig
from tests.helpers import end_open_runs, experiments_named, tiny_trial

pytestmark = pytest.mark.integration

A, A2, B, B2, ROOT = "alpha-ci", "alpha-dev", "beta-ci", "beta-dev", "root"
TEAMS = {A: "alpha", A2: "alpha", B: "beta", B2: "beta", ROOT: "ops"}
SCOPES = {A: ["read", "submit"], A2: ["read", "submit"], B: ["read", "submit"], B2: ["read", "submit"], ROOT: ["admin"]}
SECRETS = {name: f"ct_reg_{name}_{uuid.uuid4().hex}" for name in SCOPES}
NAMES_THAT_MUST_NOT_LEAK = ("alpha", "beta", "ops", *SCOPES)


def as_(who: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SECRETS[who]}"}


@pytest.fixture(scope="module")
def settings(api_settings: ApiSettings, worker_env: dict[str, str]) -> ApiSettings:
    return api_settings.model_copy(update={
        "auth_disabled": False,
        "auth_tokens": [TokenConfig(name=n, sha256=hash_token(SECRETS[n]), scopes=s, team=TEAMS[n]) for n, s in SCOPES.items()],
        "experiment": f"registry-{uuid.uuid4().hex[:8]}", "default_queue": "cpu",
        "study_storage": worker_env["CONVTUNE_STUDY_STORAGE"],  # the worker's: the studies and the claims it checks at the end
    })


@pytest.fixture(scope="module")
def app(settings: ApiSettings, mlflow_client, worker):
    """The API with two teams; its studies train on the session's cpu worker."""
    app = create_app(settings)
    yield app
    end_open_runs(mlflow_client, settings.experiment)  # nothing of this module keeps the session's worker busy afterwards


@pytest.fixture()
def api(app):
    return app.test_client()


def one_epoch_study(name: str, **overrides: Any) -> dict[str, Any]:
    return {
        "base": tiny_trial(optim={"epochs": 1}), "search_space": {"model.activation": ["relu"]},
        "n_trials": 1, "parallelism": 1, "pruner": "none", "register_as": name, **overrides,
    }


def wait_for_study(api, study_id: str, who: str, until=None, timeout_s: float = 240) -> dict[str, Any]:
    until = until or (lambda s: s["state"] in ("succeeded", "failed", "cancelled"))
    deadline = time.monotonic() + timeout_s
    while True:
        study = api.get(f"/studies/{study_id}", headers=as_(who)).get_json()
        if until(study):
            return study
        assert time.monotonic() < deadline, f"study {study_id} stuck: {study['state']} {study['counts']}"
        time.sleep(0.5)


def refused(response, name: str) -> dict[str, Any]:
    """A 403 problem document that names the model but not who holds it."""
    assert response.status_code == 403, (response.status_code, response.get_data(as_text=True)[:2000])
    assert response.mimetype == "application/problem+json"
    problem = response.get_json()
    assert problem["type"].endswith("/forbidden") and name in problem["detail"], problem
    assert not any(team in problem["detail"].replace(name, "") for team in NAMES_THAT_MUST_NOT_LEAK), problem
    return problem


def registry(mlflow_client, name: str) -> tuple[dict[str, str], list[str]]:
    """The model's aliases and versions (none when there is no such model)."""
    versions = sorted(str(v.version) for v in mlflow_client.search_model_versions(f"name='{name}'"))
    models = mlflow_client.search_registered_models(f"name='{name}'")
    return ({a: str(v) for a, v in (models[0].aliases or {}).items()} if models else {}), versions


def studies_of(mlflow_client, settings: ApiSettings, team: str) -> set[str]:
    """The ids of the team's studies (parent runs) in this module's experiments."""
    experiments = experiments_named(mlflow_client, settings.experiment)
    where = f"tags.`{TAG.TEAM}` = '{team}' and tags.`{TAG.KIND}` = 'study'"
    found = mlflow_client.search_runs(experiments, filter_string=where, max_results=5000) if experiments else []
    return {r.info.run_id for r in found}


def study_names(settings: ApiSettings) -> set[str]:
    return {s.study_name for s in optuna.get_all_study_summaries(open_storage(settings.study_storage), include_best_trial=False)}


def test_two_teams_racing_for_a_new_name_leave_one_owner_and_the_other_is_refused_having_created_nothing(app, settings, mlflow_client):
    name = f"raced-{uuid.uuid4().hex[:6]}"
    runs_before = {t: studies_of(mlflow_client, settings, TEAMS[t]) for t in (A, B)}
    studies_before = study_names(settings)
    barrier, answers = threading.Barrier(2), {}

    def submit(who: str) -> None:
        client = app.test_client()
        barrier.wait()
        answers[who] = client.post("/studies", json=one_epoch_study(name, register_alias="prod"), headers=as_(who))

    threads = [threading.Thread(target=submit, args=(who,)) for who in (A, B)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    [winner] = [who for who, r in answers.items() if r.status_code == 202]
    [loser] = [who for who in answers if who != winner]
    refused(answers[loser], name)
    study_id = answers[winner].get_json()["id"]
    # The refusal came before anything was created: no study run of the loser's team, no Optuna study but the winner's.
    assert studies_of(mlflow_client, settings, TEAMS[loser]) == runs_before[loser]
    assert studies_of(mlflow_client, settings, TEAMS[winner]) - runs_before[winner] == {study_id}
    assert study_names(settings) - studies_before == {study_id}
    claim = open_claims(settings.study_storage).holder(name)
    assert claim.team == TEAMS[winner] and claim.study_id == study_id

    done = wait_for_study(app.test_client(), study_id, winner)
    assert done["state"] == "succeeded" and done["registered_model"] == {"name": name, "version": "1", "alias": "prod"}, done
    assert registry(mlflow_client, name) == ({"prod": "1"}, ["1"])
    assert mlflow_client.get_registered_model(name).tags[SEAL_TAG] == claim.seal
    # Every token of the other team is refused, whatever alias it asks for.
    for who in {A: (B, B2), B: (A, A2)}[winner]:
        refused(app.test_client().post("/studies", json=one_epoch_study(name, register_alias="champion"), headers=as_(who)), name)


def test_the_owner_s_second_study_registers_a_second_version_and_moves_the_alias(api, mlflow_client):
    name = f"twice-{uuid.uuid4().hex[:6]}"
    first = api.post("/studies", json=one_epoch_study(name, register_alias="prod"), headers=as_(A))
    assert first.status_code == 202, first.get_json()
    assert wait_for_study(api, first.get_json()["id"], A)["registered_model"]["version"] == "1"
    second = api.post("/studies", json=one_epoch_study(name, register_alias="prod"), headers=as_(A2))  # another token of the team
    assert second.status_code == 202, second.get_json()
    done = wait_for_study(api, second.get_json()["id"], A2)
    assert done["state"] == "succeeded" and done["registered_model"] == {"name": name, "version": "2", "alias": "prod"}, done
    assert registry(mlflow_client, name) == ({"prod": "2"}, ["1", "2"])
    version = mlflow_client.get_model_version(name, "2")
    assert version.tags[TAG.STUDY_ID] == second.get_json()["id"]


def test_a_cancelled_study_registers_nothing(api, settings, mlflow_client):
    # A grid over epochs: the first trial (1 epoch) succeeds, the second (200 epochs) is running when the study is cancelled.
    name = f"cancelled-{uuid.uuid4().hex[:6]}"
    body = one_epoch_study(name, search_space={"optim.epochs": [1, 200]}, sampler="grid", n_trials=2)
    accepted = api.post("/studies", json=body, headers=as_(A))
    assert accepted.status_code == 202, accepted.get_json()
    study_id = accepted.get_json()["id"]
    wait_for_study(api, study_id, A, until=lambda s: s["counts"].get("succeeded", 0) >= 1 and s["counts"].get("running", 0) >= 1, timeout_s=120)
    assert api.post(f"/studies/{study_id}/cancel", headers=as_(A)).status_code == 202
    done = wait_for_study(api, study_id, A)
    assert done["state"] == "cancelled" and done["registered_model"] is None, done
    assert done["counts"].get("succeeded") == 1, done  # it had a trial to register: the cancel alone kept it out
    assert registry(mlflow_client, name) == ({}, [])
    tags = mlflow_client.get_run(study_id).data.tags
    assert TAG.REGISTERED_MODEL not in tags and TAG.REGISTRATION_ERROR not in tags
    assert open_claims(settings.study_storage).holder(name).team == "alpha"  # the name stays the team's


def test_a_model_made_by_hand_is_refused_to_teams_and_adopted_by_an_admin(api, settings, mlflow_client):
    name = f"by-hand-{uuid.uuid4().hex[:6]}"
    # Made in MLflow after claims began, and tagged as alpha's: a tag anyone may write, so it counts for nothing.
    made = mlflow_client.create_registered_model(name, tags={TAG.TEAM: "alpha"})
    refused(api.post("/studies", json=one_epoch_study(name), headers=as_(A)), name)
    assert open_claims(settings.study_storage).holder(name) is None
    adopted = api.post("/studies", json=one_epoch_study(name, register_alias="prod"), headers=as_(ROOT))
    assert adopted.status_code == 202, adopted.get_json()
    claim = open_claims(settings.study_storage).holder(name)
    assert claim.team == "ops" and claim.adopted == mlflow_client.get_registered_model(name).creation_timestamp
    done = wait_for_study(api, adopted.get_json()["id"], ROOT)
    assert done["registered_model"] == {"name": name, "version": "1", "alias": "prod"}, done
    assert mlflow_client.get_registered_model(name).creation_timestamp == made.creation_timestamp  # the same model, adopted
    refused(api.post("/studies", json=one_epoch_study(name), headers=as_(A)), name)  # now the admin's team's
