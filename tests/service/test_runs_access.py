"""RunStore's grant of a team's experiment to its MLflow role (models.store.access): once per process and team, after
the experiment is found or created; a refused grant is a warning, never a refused submit, and is tried again."""

from __future__ import annotations

import logging
import types

import pytest

from models.store.access import AccessNotGranted
from service.api.runs import RunStore


class Access:
    def __init__(self, refusals: int = 0):
        self.grants: list[tuple[str, str]] = []
        self.refusals = refusals

    def grant_experiment(self, team: str, experiment_id: str) -> None:
        if self.refusals:
            self.refusals -= 1
            raise AccessNotGranted("creating the role 'convtune-team-alpha' failed in MLflow: 503")
        self.grants.append((team, experiment_id))


class Experiments:
    """An MlflowClient's experiment calls: 'convtune/alpha' exists as '7' (and is recorded as alpha's), others are created."""

    def get_experiment_by_name(self, name: str):
        return types.SimpleNamespace(experiment_id="7") if name == "convtune/alpha" else None

    def create_experiment(self, name: str, tags: dict[str, str]) -> str:
        return "8"


@pytest.fixture()
def storage(tmp_path) -> str:
    from models.store.claims import open_claims

    path = str(tmp_path / "studies.journal")
    open_claims(path).record_team_experiment("convtune", "alpha", "7")
    return path


def store(access: Access | None, storage: str) -> RunStore:
    runs = RunStore("http://127.0.0.1:1", "convtune", storage, access)
    runs.client = Experiments()
    return runs


def test_a_teams_experiment_is_granted_once_per_process_whether_found_or_created(storage: str) -> None:
    access = Access()
    runs = store(access, storage)
    assert [runs.experiment_id("alpha"), runs.experiment_id("alpha"), runs.experiment_id("beta")] == ["7", "7", "8"]
    assert access.grants == [("alpha", "7"), ("beta", "8")]


def test_without_teams_or_without_mlflow_users_nothing_is_granted(storage: str) -> None:
    access = Access()
    assert store(access, storage).experiment_id(None) == "8"  # authentication off: the one experiment, no team
    assert access.grants == []
    assert store(None, storage).experiment_id("alpha") == "7"  # CONVTUNE_MLFLOW_TEAM_ACCESS off


def test_a_refused_grant_is_logged_and_tried_again_at_the_next_use(caplog: pytest.LogCaptureFixture, storage: str) -> None:
    access = Access(refusals=1)
    runs = store(access, storage)
    with caplog.at_level(logging.WARNING, logger="service.api.runs"):
        assert runs.experiment_id("alpha") == "7"
    assert "team alpha's people cannot read its MLflow experiment 7 yet" in caplog.text
    assert access.grants == []
    assert runs.experiment_id("alpha") == "7"
    assert access.grants == [("alpha", "7")]


class Squatted(Experiments):
    """'convtune/gamma' was created in MLflow by someone else before team gamma's first submit."""

    def __init__(self) -> None:
        self.created: list[str] = []

    def get_experiment_by_name(self, name: str):
        return types.SimpleNamespace(experiment_id="66") if name == "convtune/gamma" else None

    def create_experiment(self, name: str, tags: dict[str, str]) -> str:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS

        if name == "convtune/gamma":
            raise MlflowException("exists", error_code=RESOURCE_ALREADY_EXISTS)
        self.created.append(name)
        return "9"


def test_an_experiment_named_like_a_team_s_that_convtune_did_not_make_is_passed_over(storage: str, caplog) -> None:
    from models.store.claims import open_claims

    runs = store(None, storage)
    runs.client = Squatted()
    with caplog.at_level(logging.WARNING, logger="service.api.runs"):
        assert runs.experiment_id("gamma") == "9"
    [name] = runs.client.created
    assert name.startswith("convtune/gamma-") and "did not make for team gamma" in caplog.text
    assert open_claims(storage).team_experiment("convtune", "gamma") == "9"  # what every process, and the reconciler, uses from now on
    fresh = store(None, storage)
    fresh.client = Squatted()
    assert fresh.experiment_id("gamma") == "9" and fresh.client.created == []
