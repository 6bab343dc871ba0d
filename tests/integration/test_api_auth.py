"""Bearer tokens and scopes against the real app (real Redis and mlflow server behind it)."""

from __future__ import annotations

import logging
import uuid

import pytest

from service.api import create_app
from service.api.auth import hash_token
from service.api.settings import ApiSettings, TokenConfig
from tests.helpers import tiny_trial

pytestmark = pytest.mark.integration

# Each token is a team of its own, but "reader" and "submitter-2", which act for the submitter's team, and "dashboard", which reads every team's work.
TOKENS = {"reader": ["read"], "submitter": ["read", "submit"], "submitter-2": ["read", "submit"], "other": ["read", "submit"], "root": ["admin"], "dashboard": ["read-all", "submit"]}
TEAMS = {"reader": "submitter", "submitter-2": "submitter", "dashboard": "ops"}
SECRETS = {name: f"ct_test_{name}_{uuid.uuid4().hex}" for name in TOKENS}


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SECRETS[name]}"}


@pytest.fixture(scope="module")
def secured_app(api_settings: ApiSettings):
    tokens = [TokenConfig(name=name, sha256=hash_token(SECRETS[name]), scopes=scopes, team=TEAMS.get(name)) for name, scopes in TOKENS.items()]
    return create_app(api_settings.model_copy(update={"auth_disabled": False, "auth_tokens": tokens}))


@pytest.fixture()
def api(secured_app):
    return secured_app.test_client()


def assert_problem(response, status: int, slug: str) -> dict:
    assert response.status_code == status, response.get_json()
    assert response.mimetype == "application/problem+json"
    problem = response.get_json()
    assert problem["type"].endswith(f"/{slug}") and problem["status"] == status and problem["detail"]
    return problem


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer"}, {"Authorization": "Basic dXNlcjpwYXNz"}, {"Authorization": "Bearer not-a-token"}])
def test_missing_or_unknown_token_is_401_problem_with_challenge(api, headers):
    response = api.get("/trials", headers=headers)
    assert_problem(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_scopes_decide_what_a_token_may_call(api):
    assert api.get("/trials", headers=bearer("reader")).status_code == 200
    problem = assert_problem(api.post("/trials", json=tiny_trial(), headers=bearer("reader")), 403, "forbidden")
    assert "submit" in problem["detail"]
    accepted = api.post("/trials", json=tiny_trial(queue="gpu", optim={"epochs": 1000}), headers=bearer("submitter"))  # no worker takes it
    assert accepted.status_code == 202, accepted.get_json()
    trial_id = accepted.get_json()["id"]
    # admin implies read and submit; the submitter's team reads it; a read-all token reads it
    for name in ("root", "reader", "submitter-2", "dashboard"):
        assert api.get(f"/trials/{trial_id}", headers=bearer(name)).status_code == 200, name
    # another team: it does not exist, in the same words as an id nobody used
    missing = assert_problem(api.get(f"/trials/{'0' * 32}", headers=bearer("other")), 404, "not-found")
    hidden = assert_problem(api.get(f"/trials/{trial_id}", headers=bearer("other")), 404, "not-found")
    assert hidden["detail"] == missing["detail"].replace("0" * 32, trial_id)
    assert_problem(api.post(f"/trials/{trial_id}/cancel", headers=bearer("other")), 404, "not-found")

    # only the submitter's team or an admin may cancel it: read is not enough, nor reading everything
    assert_problem(api.post(f"/trials/{trial_id}/cancel", headers=bearer("reader")), 403, "forbidden")
    assert_problem(api.post(f"/trials/{trial_id}/cancel", headers=bearer("dashboard")), 403, "forbidden")
    cancelled = api.post(f"/trials/{trial_id}/cancel", headers=bearer("root"))
    assert cancelled.status_code == 202 and cancelled.get_json()["status"] == "cancelled"


def test_a_team_shares_its_work_and_lists_only_its_own(api):
    accepted = api.post("/trials", json=tiny_trial(queue="gpu"), headers=bearer("submitter"))
    assert accepted.status_code == 202, accepted.get_json()
    trial_id = accepted.get_json()["id"]
    theirs = api.post("/trials", json=tiny_trial(queue="gpu"), headers=bearer("other")).get_json()["id"]

    def listed(name: str) -> set[str]:
        return {t["id"] for t in api.get("/trials?limit=200", headers=bearer(name)).get_json()["items"]}

    assert trial_id in listed("submitter-2") and theirs not in listed("submitter-2")
    assert theirs in listed("other") and trial_id not in listed("other")
    assert {trial_id, theirs} <= listed("dashboard") and {trial_id, theirs} <= listed("root")
    # a token of the team changes what another token of the team submitted
    assert api.post(f"/trials/{trial_id}/cancel", headers=bearer("submitter-2")).status_code == 202
    assert api.post(f"/trials/{theirs}/cancel", headers=bearer("other")).status_code == 202


def test_owner_is_recorded_on_the_run_and_in_the_access_log(api, mlflow_client, caplog):
    with caplog.at_level(logging.INFO, logger="convtune.access"):
        accepted = api.post("/trials", json=tiny_trial(optim={"epochs": 1000}), headers=bearer("submitter"))
    trial_id = accepted.get_json()["id"]
    assert mlflow_client.get_run(trial_id).data.tags["convtune.owner"] == "submitter"
    [line] = [r for r in caplog.records if r.name == "convtune.access" and getattr(r, "route", None) == "/trials"]
    assert (line.trial_id, line.principal, line.status, line.method) == (trial_id, "submitter", 202, "POST")
    assert line.request_id == accepted.headers["X-Request-ID"]
    echoed = api.get("/healthz", headers={"X-Request-ID": "ci-job-42-step-3"})
    assert echoed.headers["X-Request-ID"] == "ci-job-42-step-3"
    assert api.post(f"/trials/{trial_id}/cancel", headers=bearer("submitter")).status_code == 202


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"])
def test_probes_metrics_and_docs_need_no_token(api, path):
    assert api.get(path).status_code == 200


def test_tokens_are_never_logged(api, caplog):
    with caplog.at_level(logging.DEBUG):
        api.get("/trials", headers=bearer("reader"))
        api.get("/trials", headers={"Authorization": "Bearer wrong-secret-xyz"})
    text = caplog.text + " ".join(str(r.__dict__) for r in caplog.records)
    assert SECRETS["reader"] not in text and "wrong-secret-xyz" not in text
    assert "reader" in text  # the token's name is, for the access log


def test_disabled_auth_warns_loudly_at_start(api_settings, caplog):
    with caplog.at_level(logging.WARNING):
        create_app(api_settings.model_copy(update={"auth_disabled": True}))
    assert any("AUTHENTICATION IS DISABLED" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_only_the_submitter_or_an_admin_may_cancel_or_extend_a_study(api):
    study = {"base": tiny_trial(queue="gpu"), "search_space": {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}, "n_trials": 2}
    created = api.post("/studies", json=study, headers=bearer("submitter"))
    assert created.status_code == 202, created.get_json()
    study_id = created.get_json()["id"]
    assert_problem(api.post(f"/studies/{study_id}/extend", json={"n_trials": 1}, headers=bearer("other")), 404, "not-found")
    assert_problem(api.post(f"/studies/{study_id}/cancel", headers=bearer("other")), 404, "not-found")
    assert_problem(api.get(f"/studies/{study_id}/trials", headers=bearer("other")), 404, "not-found")
    assert study_id not in {s["id"] for s in api.get("/studies?limit=200", headers=bearer("other")).get_json()["items"]}
    assert_problem(api.post(f"/studies/{study_id}/cancel", headers=bearer("dashboard")), 403, "forbidden")
    assert api.post(f"/studies/{study_id}/cancel", headers=bearer("root")).status_code == 202


def test_a_callback_url_is_never_shown_and_its_host_only_to_its_team_and_admins(api):
    hook = "https://hooks.example.com/convtune?token=s3cret"
    accepted = api.post("/trials", json=tiny_trial(queue="gpu", callback_url=hook), headers=bearer("submitter"))
    assert accepted.status_code == 202, accepted.get_json()
    trial_id = accepted.get_json()["id"]
    # Nobody reads the URL back (it is sealed, outside MLflow): its team and admins see where it goes, others not even that.
    for name, sees_host in (("submitter", True), ("submitter-2", True), ("root", True), ("dashboard", False)):
        shown = api.get(f"/trials/{trial_id}", headers=bearer(name)).get_json()["spec"]["callback_url"]
        assert "s3cret" not in shown and (shown == "https://hooks.example.com/...") is sees_host, (name, shown)
    assert api.get(f"/trials/{trial_id}", headers=bearer("other")).status_code == 404
    listed = api.get("/trials?status=queued&limit=200", headers=bearer("dashboard")).get_json()["items"]
    assert all("s3cret" not in str(item["spec"]) for item in listed)
    assert api.post(f"/trials/{trial_id}/cancel", headers=bearer("submitter")).status_code == 202


def test_an_ownerless_run_is_changed_by_admins_only(api, app):
    # A run created without an owner (before owners were recorded, or by hand): no ordinary token may claim it.
    from models.spec.trial import TrialSpec, flatten_params
    from models.store.runs import create_run, trial_tags

    spec = TrialSpec.model_validate(tiny_trial(queue="gpu"))
    runs = app.extensions["convtune"].runs
    trial_id = create_run(runs.client, runs.experiment_id(None), name=spec.display_name(), tags=trial_tags(spec, None, "gpu"), params=flatten_params(spec))
    assert_problem(api.post(f"/trials/{trial_id}/cancel", headers=bearer("submitter")), 404, "not-found")  # no team's: not theirs to see
    problem = assert_problem(api.post(f"/trials/{trial_id}/cancel", headers=bearer("dashboard")), 403, "forbidden")
    assert "no owner" in problem["detail"]
    assert api.post(f"/trials/{trial_id}/cancel", headers=bearer("root")).status_code == 202


def test_extensions_count_towards_the_trials_per_study_cap(api, secured_app):
    cap = secured_app.extensions["convtune"].settings.max_trials_per_study
    study = {"base": tiny_trial(queue="gpu"), "search_space": {"optim.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}, "n_trials": cap - 2}
    study_id = api.post("/studies", json=study, headers=bearer("submitter")).get_json()["id"]
    assert api.post(f"/studies/{study_id}/extend", json={"n_trials": 2}, headers=bearer("submitter")).status_code == 202
    problem = assert_problem(api.post(f"/studies/{study_id}/extend", json={"n_trials": 2}, headers=bearer("submitter")), 422, "invalid-spec")
    assert problem["errors"][0]["field"] == "n_trials"
    assert api.post(f"/studies/{study_id}/cancel", headers=bearer("submitter")).status_code == 202


def test_a_range_test_passes_the_same_size_limit_as_a_trial(api, secured_app):
    limit = secured_app.extensions["convtune"].settings.max_params
    huge = tiny_trial(model={"channels": [2048, 2048], "convs_per_stage": 6})  # 415M parameters
    problem = assert_problem(api.post("/lr-finder", json={"trial": huge}, headers=bearer("submitter")), 422, "invalid-spec")
    assert problem["errors"][0]["field"] == "trial.model.channels" and f"{limit:,}" in problem["detail"]


def test_a_registered_model_name_belongs_to_the_team_that_first_claimed_it(api, mlflow_client):
    name = f"digits-{uuid.uuid4().hex[:6]}"
    study = {"base": tiny_trial(queue="gpu"), "search_space": {"model.activation": ["relu", "gelu"]}, "n_trials": 1, "register_as": name}
    ours = api.post("/studies", json=study, headers=bearer("submitter"))  # claims the name for the submitter's team
    assert ours.status_code == 202, ours.get_json()
    problem = assert_problem(api.post("/studies", json=study, headers=bearer("other")), 403, "forbidden")
    assert name in problem["detail"] and "submitter" not in problem["detail"]  # which team holds it is not said
    again = api.post("/studies", json=study, headers=bearer("submitter-2"))  # another token of the team: its name too
    assert again.status_code == 202, again.get_json()
    for accepted in (ours, again):
        assert api.post(f"/studies/{accepted.get_json()['id']}/cancel", headers=bearer("submitter")).status_code == 202
    # A model someone made in MLflow with a team's tag, after claims began, is no claim: a tag is anyone's to write.
    tagged = f"tagged-{uuid.uuid4().hex[:6]}"
    mlflow_client.create_registered_model(tagged, tags={"convtune.owner": "submitter"})
    assert_problem(api.post("/studies", json={**study, "register_as": tagged}, headers=bearer("submitter")), 403, "forbidden")
    unowned = f"by-hand-{uuid.uuid4().hex[:6]}"
    mlflow_client.create_registered_model(unowned)  # no owner: an admin's to use
    study["register_as"] = unowned
    assert_problem(api.post("/studies", json=study, headers=bearer("submitter")), 403, "forbidden")
    admins = api.post("/studies", json=study, headers=bearer("root"))
    assert admins.status_code == 202
    assert api.post(f"/studies/{admins.get_json()['id']}/cancel", headers=bearer("root")).status_code == 202


@pytest.mark.parametrize("route", ["/trials", "/lr-finder", "/studies"])
def test_every_route_that_creates_work_refuses_oversized_specs_and_creates_nothing(api, route, mlflow_client, api_settings):
    # 104M parameters (under the cap) but 2 TFLOPs per sample; and a 9 GiB generated data set.
    costly = tiny_trial(model={"channels": [1024, 1024], "convs_per_stage": 6}, data={"name": "shapes", "image_size": 128, "num_samples": 100})
    huge_data = tiny_trial(data={"name": "shapes", "image_size": 128, "num_samples": 50_000})
    from tests.helpers import experiments_named

    def count() -> int:
        experiments = experiments_named(mlflow_client, api_settings.experiment)
        return len(mlflow_client.search_runs(experiments, max_results=5000)) if experiments else 0

    before = count()
    for trial, field, fragment in ((costly, "model.channels", "FLOPs per sample"), (huge_data, "data.num_samples", "GiB")):
        body, prefix = {
            "/trials": (trial, ""), "/lr-finder": ({"trial": trial}, "trial."),
            "/studies": ({"base": trial, "search_space": {"model.activation": ["relu", "gelu"]}, "n_trials": 2}, "base."),
        }[route]
        problem = assert_problem(api.post(route, json=body, headers=bearer("submitter")), 422, "invalid-spec")
        assert problem["errors"][0]["field"] == prefix + field and fragment in problem["detail"]
    assert count() == before


@pytest.mark.parametrize("target", [
    "http://127.0.0.1:6379/", "http://[::1]/hook", "http://10.1.2.3/hook", "http://169.254.169.254/latest/meta-data", "http://0.0.0.0/",
    "https://93.184.216.34:6379/hook",  # a public address on a port callbacks may not use
])
def test_callbacks_to_internal_targets_are_refused_at_submit(secured_app, target):
    # The session's app allows loopback for its own receivers; the product's default allows none of these.
    app = create_app(secured_app.extensions["convtune"].settings.model_copy(update={"callback_allowed_networks": []}))
    problem = assert_problem(app.test_client().post("/trials", json=tiny_trial(callback_url=target), headers=bearer("submitter")), 422, "invalid-spec")
    assert problem["errors"][0]["field"] == "callback_url"


def test_an_experiment_made_in_mlflow_with_a_team_s_name_never_holds_or_shows_the_team_s_work(api_settings, mlflow_client):
    # Any MLflow user may create "{experiment}/{team}" before the team's first submit, to read what lands there,
    # and plant runs tagged as convtune trials that the reconciler would send to the workers.
    from models.store.claims import open_claims
    from models.store.runs import TAG
    from models.store.teams import experiment_ids

    base = f"squat-{uuid.uuid4().hex[:8]}"
    squatted = mlflow_client.create_experiment(f"{base}/submitter")
    planted = mlflow_client.create_run(squatted, tags={TAG.KIND: "trial", TAG.TEAM: "submitter", TAG.OWNER: "submitter"}).info.run_id
    mlflow_client.update_run(planted, status="SCHEDULED")
    tokens = [TokenConfig(name=name, sha256=hash_token(SECRETS[name]), scopes=scopes, team=TEAMS.get(name)) for name, scopes in TOKENS.items()]
    api = create_app(api_settings.model_copy(update={"auth_disabled": False, "auth_tokens": tokens, "experiment": base})).test_client()

    accepted = api.post("/trials", json=tiny_trial(queue="gpu"), headers=bearer("submitter"))
    assert accepted.status_code == 202, accepted.get_json()
    trial_id = accepted.get_json()["id"]
    ours = mlflow_client.get_run(trial_id).info.experiment_id
    assert ours != squatted and mlflow_client.get_experiment(ours).name.startswith(f"{base}/submitter-")
    assert f"/experiments/{ours}/runs/{trial_id}" in accepted.get_json()["mlflow_url"]
    listed = {t["id"] for t in api.get("/trials?limit=200", headers=bearer("submitter-2")).get_json()["items"]}
    assert trial_id in listed and planted not in listed
    assert planted not in {t["id"] for t in api.get("/trials?limit=200", headers=bearer("root")).get_json()["items"]}
    # What the workers' reconciler sweeps: the experiments convtune recorded, never the squatted one.
    swept = experiment_ids(mlflow_client, base, open_claims(api_settings.study_storage).team_experiments(base).values())
    assert ours in swept and squatted not in swept
    assert api.post(f"/trials/{trial_id}/cancel", headers=bearer("submitter")).status_code == 202
    mlflow_client.set_terminated(planted, status="KILLED")
