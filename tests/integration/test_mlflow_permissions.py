"""Read isolation in MLflow (docs/mlflow-access.md): a team's people read its runs, artifacts and models, and nothing else.

A real ``mlflow server --app-name basic-auth`` of this module's own (sqlite stores in a temporary
folder, ``default_permission = NO_PERMISSIONS``, an admin the service signs in as), the real Flask
app with authentication on and two teams' tokens, and three MLflow people: alice (team alpha), bob
(team beta) and nobody (no team). alice and bob are put in their teams' roles as an operator does
(``convtune mlflow-access add``); the API grants the roles READ on each team's experiment when it
creates it, the worker's hook on the models a study registers, ``convtune mlflow-access sync`` on
whatever was missed. Trials go to the ``gpu`` queue, which nothing consumes: the runs exist in
MLflow, which is all the permissions are about. Every person's request is plain HTTP basic auth
against MLflow's REST API and artifact routes, as the UI makes them.
"""

from __future__ import annotations

import sys
import types
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from models.store.access import TeamAccess
from models.store.claims import open_claims
from service.api import create_app
from service.api.auth import hash_token
from service.api.settings import ApiSettings, TokenConfig
from service.cli.main import main as convtune
from tests.conftest import Service, free_port, mlflow_healthy, wait_for
from tests.helpers import tiny_trial

pytestmark = pytest.mark.integration

ADMIN = ("convtune-admin", f"admin-{uuid.uuid4().hex}")
PEOPLE = {"alice": "alpha", "bob": "beta", "nobody": None}
PASSWORDS = {name: f"{name}-{uuid.uuid4().hex}" for name in PEOPLE}
TOKENS = {"alpha-ci": "alpha", "beta-ci": "beta"}
SECRETS = {name: f"ct_sec_{name}_{uuid.uuid4().hex}" for name in TOKENS}
EXPERIMENT = "convtune"


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A basic-auth ``mlflow server`` that lets no one read what was not granted; its address."""
    home = tmp_path_factory.mktemp("mlflow-auth")
    config = home / "basic_auth.ini"
    config.write_text(
        "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{home / 'auth.db'}\nadmin_username = {ADMIN[0]}\nadmin_password = {ADMIN[1]}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 600\n"  # one password check per person, not one per request (roles are not cached)
    )
    port = free_port()
    server = Service(
        "mlflow-basic-auth",
        [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}", "--artifacts-destination", str(home / "artifacts")],
        {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex,
         "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    uri = f"http://127.0.0.1:{port}"
    if not wait_for(lambda: mlflow_healthy(uri) or not server.alive(), 120) or not server.alive():
        server.stop()
        pytest.fail(f"mlflow server --app-name basic-auth did not start:\n{server.log()[-3000:]}")
    try:
        for name in PEOPLE:
            created = httpx.post(f"{uri}/api/2.0/mlflow/users/create", json={"username": name, "password": PASSWORDS[name]}, auth=ADMIN)
            assert created.status_code == 200, created.text
        yield uri
    finally:
        server.stop()


@pytest.fixture(scope="module")
def study_storage(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The service's own records (each team's experiment, claimed model names) for this module's MLflow server alone."""
    return str(tmp_path_factory.mktemp("mlflow-auth-studies") / "studies.journal")


@pytest.fixture(scope="module")
def as_service(auth_server: str, study_storage: str) -> Iterator[None]:
    """The service's MLflow login (the admin), as the deploy gives it to the API and the workers."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONVTUNE_STUDY_STORAGE", study_storage)  # for `convtune mlflow-access sync`
        mp.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
        mp.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
        mp.setenv("CONVTUNE_MLFLOW_TRACKING_URI", auth_server)  # for `convtune mlflow-access`
        mp.setenv("CONVTUNE_EXPERIMENT", EXPERIMENT)
        yield


@pytest.fixture(scope="module")
def admin(auth_server: str, as_service: None) -> MlflowClient:
    return MlflowClient(auth_server)


@pytest.fixture(scope="module")
def world(auth_server: str, as_service: None, admin: MlflowClient, redis_url: str, study_storage: str) -> types.SimpleNamespace:
    """alice and bob in their teams' roles, then one trial per team submitted through the API, an artifact on each
    run, and a registered model per team (beta's through the worker's hook, alpha's left for ``sync``)."""
    for person, team in PEOPLE.items():
        if team:
            added = CliRunner().invoke(convtune, ["mlflow-access", "add", team, person])
            assert added.exit_code == 0, added.output
    settings = ApiSettings(
        redis_url=redis_url, mlflow_tracking_uri=auth_server, experiment=EXPERIMENT, default_queue="gpu", mlflow_team_access=True,
        auth_tokens=[TokenConfig(name=n, sha256=hash_token(SECRETS[n]), scopes=["read", "submit"], team=t) for n, t in TOKENS.items()],
        rate_limit="100000/minute", submit_rate_limit="100000/minute", study_storage=study_storage,
        unserved_queue_s=0,  # its trials wait on gpu, which no worker serves, on purpose
    )
    api = create_app(settings).test_client()
    trials = {}
    for token, team in TOKENS.items():
        answer = api.post("/trials", json=tiny_trial(), headers={"Authorization": f"Bearer {SECRETS[token]}"})
        assert answer.status_code == 202, answer.get_data(as_text=True)
        trials[team] = answer.get_json()
        admin.log_text(trials[team]["id"], f"{team}'s secret", "notes/secret.txt")  # as the workers log a trial's files
    runs = {team: admin.get_run(t["id"]) for team, t in trials.items()}
    models = {team: f"model-{team}-{uuid.uuid4().hex[:6]}" for team in TOKENS.values()}
    for team, name in models.items():
        open_claims(study_storage).claim(name, team)  # as a study's submit claims its register_as name
        admin.create_registered_model(name, tags={"convtune.team": team})
    from workers.study.report import _let_team_read  # the hook workers.study.report runs after registering

    _let_team_read(types.SimpleNamespace(settings=types.SimpleNamespace(mlflow_team_access=True, mlflow_tracking_uri=auth_server)),
                   "study-id", "beta", models["beta"])
    return types.SimpleNamespace(trials=trials, runs=runs, models=models, uri=auth_server)


def get(world: types.SimpleNamespace, person: str, route: str, **params: Any) -> httpx.Response:
    return httpx.get(f"{world.uri}{route}", params=params, auth=(person, PASSWORDS[person]), timeout=30)


def searched(world: types.SimpleNamespace, person: str, experiment_ids: list[str]) -> set[str]:
    """The ids of the runs ``person`` finds searching ``experiment_ids`` (MLflow filters a search, it does not refuse it)."""
    answer = httpx.post(
        f"{world.uri}/api/2.0/mlflow/runs/search", json={"experiment_ids": experiment_ids}, auth=(person, PASSWORDS[person]), timeout=30,
    )
    assert answer.status_code in (200, 403), answer.text
    return {r["info"]["run_id"] for r in answer.json().get("runs", [])} if answer.status_code == 200 else set()


def reads(world: types.SimpleNamespace, person: str, team: str) -> dict[str, int]:
    """The status of each way ``person`` could read ``team``'s run, its metrics, its artifacts and its experiment."""
    run = world.runs[team].info
    notes = f"{run.experiment_id}/{run.run_id}/artifacts/notes"  # where the server's artifact store keeps the run's notes/
    return {
        "get run": get(world, person, "/api/2.0/mlflow/runs/get", run_id=run.run_id).status_code,
        "experiment": get(world, person, "/api/2.0/mlflow/experiments/get", experiment_id=run.experiment_id).status_code,
        "metric history": get(world, person, "/api/2.0/mlflow/metrics/get-history", run_id=run.run_id, metric_key="val_loss").status_code,
        "artifact list": get(world, person, "/api/2.0/mlflow/artifacts/list", run_id=run.run_id).status_code,
        "artifact (UI route)": get(world, person, "/get-artifact", run_id=run.run_id, path="notes/secret.txt").status_code,
        "artifact (proxy list)": get(world, person, "/api/2.0/mlflow-artifacts/artifacts", path=notes).status_code,
        "artifact (proxy download)": get(world, person, f"/api/2.0/mlflow-artifacts/artifacts/{notes}/secret.txt").status_code,
    }


def test_the_service_puts_each_team_in_an_experiment_of_its_own(world) -> None:
    alpha, beta = world.runs["alpha"].info, world.runs["beta"].info
    assert alpha.experiment_id != beta.experiment_id
    for team, trial in world.trials.items():
        run = world.runs[team]
        assert run.data.tags["convtune.team"] == team
        assert f"/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}" in trial["mlflow_url"]


@pytest.mark.parametrize(("person", "team"), [("alice", "alpha"), ("bob", "beta")])
def test_a_teams_person_reads_the_teams_run_its_metrics_and_artifacts(world, person: str, team: str) -> None:
    answers = reads(world, person, team)
    assert answers == dict.fromkeys(answers, 200)
    run = world.runs[team].info
    assert get(world, person, "/get-artifact", run_id=run.run_id, path="notes/secret.txt").text == f"{team}'s secret"
    assert searched(world, person, [run.experiment_id]) == {run.run_id}


@pytest.mark.parametrize(("person", "other"), [("alice", "beta"), ("bob", "alpha"), ("nobody", "alpha"), ("nobody", "beta")])
def test_no_one_reads_another_teams_run_metrics_or_artifacts(world, person: str, other: str) -> None:
    answers = reads(world, person, other)
    assert answers == dict.fromkeys(answers, 403)
    run = world.runs[other].info
    assert searched(world, person, [run.experiment_id]) == set()
    everything = [r.info.experiment_id for r in world.runs.values()]
    own = {world.runs[PEOPLE[person]].info.run_id} if PEOPLE[person] else set()
    assert searched(world, person, everything) == own
    listed = get(world, person, "/api/2.0/mlflow/experiments/search", max_results=1000).json().get("experiments", [])
    assert {e["name"] for e in listed} <= ({f"{EXPERIMENT}/{PEOPLE[person]}"} if PEOPLE[person] else set())


def test_a_registered_model_is_read_by_its_team_alone_once_granted(world) -> None:
    beta_model, alpha_model = world.models["beta"], world.models["alpha"]
    assert get(world, "bob", "/api/2.0/mlflow/registered-models/get", name=beta_model).status_code == 200  # the worker's hook
    assert get(world, "alice", "/api/2.0/mlflow/registered-models/get", name=beta_model).status_code == 403
    assert get(world, "nobody", "/api/2.0/mlflow/registered-models/get", name=beta_model).status_code == 403
    assert get(world, "alice", "/api/2.0/mlflow/registered-models/get", name=alpha_model).status_code == 403  # no grant yet
    synced = CliRunner().invoke(convtune, ["mlflow-access", "sync"])
    assert synced.exit_code == 0, synced.output
    assert f"convtune-team-alpha: READ on registered_model {alpha_model}" in synced.output
    assert f"convtune-team-beta: READ on experiment {world.runs['beta'].info.experiment_id}" in synced.output
    assert get(world, "alice", "/api/2.0/mlflow/registered-models/get", name=alpha_model).status_code == 200
    assert get(world, "bob", "/api/2.0/mlflow/registered-models/get", name=alpha_model).status_code == 403
    assert get(world, "nobody", "/api/2.0/mlflow/registered-models/get", name=alpha_model).status_code == 403
    again = CliRunner().invoke(convtune, ["mlflow-access", "sync"])  # idempotent: a deploy may run it on every start
    assert again.exit_code == 0 and again.output == synced.output


def test_a_person_taken_out_of_the_team_reads_nothing_more(world, auth_server: str) -> None:
    access = TeamAccess(auth_server)
    access.add_person("beta", "nobody")
    assert get(world, "nobody", "/api/2.0/mlflow/runs/get", run_id=world.runs["beta"].info.run_id).status_code == 200
    removed = CliRunner().invoke(convtune, ["mlflow-access", "remove", "beta", "nobody"])
    assert removed.exit_code == 0, removed.output
    assert get(world, "nobody", "/api/2.0/mlflow/runs/get", run_id=world.runs["beta"].info.run_id).status_code == 403


def test_a_refused_grant_says_why(world, auth_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")  # not an admin
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORDS["alice"])
    refused = CliRunner().invoke(convtune, ["mlflow-access", "add", "alpha", "nobody"])
    assert refused.exit_code == 3
    assert "must be an MLflow admin" in refused.output
    as_admin = {"MLFLOW_TRACKING_USERNAME": ADMIN[0], "MLFLOW_TRACKING_PASSWORD": ADMIN[1]}
    unknown = CliRunner().invoke(convtune, ["mlflow-access", "add", "alpha", "no-such-user"], env=as_admin)
    assert unknown.exit_code == 3 and "create the MLflow user first" in unknown.output
