"""Teams: who owns a run, and the MLflow experiment a team's runs live in.

Every run, study and range test belongs to the team of the API token that submitted it (tag
``convtune.team``; the token's own name is ``convtune.owner``). A team's runs go in an experiment of
its own, ``{base}/{team}``, so MLflow's per-experiment permissions can show each team its own work
and nothing else. With authentication off (the one-host local stack) there is one caller and one
experiment, ``{base}``, as there always was.

A name proves nothing (any MLflow user may create an experiment called ``{base}/{team}`` first):
the team's experiment is the one whose id the service recorded when it created it, in its own
database (:mod:`models.store.claims`); a squatted name is passed over for ``{base}/{team}-<suffix>``.

Runs recorded before teams existed carry only ``convtune.owner``: the token that made them is their
team (a token without a team is a team of its own), so nothing they owned changes hands.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

__all__ = ["ANONYMOUS_OWNER", "TEAM_NAME", "TEAM_TAG", "callback_team", "experiment_ids", "experiment_name", "team_of"]

# A team's name goes into experiment names, Redis keys and MLflow filters: nothing that needs quoting.
TEAM_NAME = r"^[A-Za-z0-9_.@\-]{1,64}$"
_TEAM = re.compile(TEAM_NAME)
TEAM_TAG = "convtune.team"
_OWNER_TAG = "convtune.owner"
# The owner of work submitted with authentication off (service.api.auth.ANONYMOUS).
ANONYMOUS_OWNER = "anonymous"


def experiment_name(base: str, team: str | None) -> str:
    """The experiment a team's runs live in: ``base/team``; ``base`` itself when there are no teams (auth off)."""
    if team is None:
        return base
    assert _TEAM.match(team), f"team names are checked where they are configured: {team!r}"
    return f"{base}/{team}"


def team_of(tags: Mapping[str, str]) -> str | None:
    """The team a run (or registered model) belongs to: its team tag, else the token that made it; None when neither."""
    return tags.get(TEAM_TAG) or tags.get(_OWNER_TAG) or None


def callback_team(tags: Mapping[str, str]) -> str | None:
    """The team whose key signs a run's callbacks (:func:`team_of`); None (the default team's key) for work submitted
    with authentication off, whose owner is the anonymous caller and which has no team tag."""
    team = team_of(tags)
    return None if team == ANONYMOUS_OWNER and TEAM_TAG not in tags else team


def experiment_ids(client: MlflowClient, base: str, team_experiments: Iterable[str]) -> list[str]:
    """Every experiment convtune keeps runs in: ``base`` itself (no teams, and runs from before teams) and each
    team's, as recorded (``team_experiments``), never one that is only named like a team's."""
    found = client.get_experiment_by_name(base)
    return [*([found.experiment_id] if found is not None else []), *team_experiments]
