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
    """An MlflowClient's experiment calls: 'convtune/alpha' exists as '7', others are created."""

    def get_experiment_by_name(self, name: str):
        return types.SimpleNamespace(experiment_id="7") if name == "convtune/alpha" else None

    def create_experiment(self, name: str, tags: dict[str, str]) -> str:
        return "8"


def store(access: Access | None) -> RunStore:
    runs = RunStore("http://127.0.0.1:1", "convtune", access)
    runs.client = Experiments()
    return runs


def test_a_teams_experiment_is_granted_once_per_process_whether_found_or_created() -> None:
    access = Access()
    runs = store(access)
    assert [runs.experiment_id("alpha"), runs.experiment_id("alpha"), runs.experiment_id("beta")] == ["7", "7", "8"]
    assert access.grants == [("alpha", "7"), ("beta", "8")]


def test_without_teams_or_without_mlflow_users_nothing_is_granted() -> None:
    access = Access()
    assert store(access).experiment_id(None) == "8"  # authentication off: the one experiment, no team
    assert access.grants == []
    assert store(None).experiment_id("alpha") == "7"  # CONVTUNE_MLFLOW_TEAM_ACCESS off


def test_a_refused_grant_is_logged_and_tried_again_at_the_next_use(caplog: pytest.LogCaptureFixture) -> None:
    access = Access(refusals=1)
    runs = store(access)
    with caplog.at_level(logging.WARNING, logger="service.api.runs"):
        assert runs.experiment_id("alpha") == "7"
    assert "team alpha's people cannot read its MLflow experiment 7 yet" in caplog.text
    assert access.grants == []
    assert runs.experiment_id("alpha") == "7"
    assert access.grants == [("alpha", "7")]
