"""Who reads a team's work in MLflow: one MLflow role per team, READ on the team's experiment and models.

The deploy runs MLflow's basic-auth app with ``default_permission = NO_PERMISSIONS``: a signed-in
person reads nothing that was not granted. convtune keeps one role per team, ``convtune-team-<team>``
(in MLflow's one workspace, ``default``), and grants it READ on

- the team's experiment ``{experiment}/{team}`` (its runs, metrics and artifacts), when the API first
  uses it in a process (:meth:`TeamAccess.grant_experiment`, called by ``service.api.runs.RunStore``);
- each registered model a study of the team registers (:meth:`TeamAccess.grant_registered_model`,
  called by ``workers.study.report`` after registering).

Which people are in a team is MLflow's to know: an operator assigns a person's MLflow user to the
team's role (``convtune mlflow-access add TEAM USER``, or MLflow's own role API) and it takes effect
at once, for every experiment and model the role holds. ``convtune mlflow-access sync``
(:meth:`TeamAccess.sync`) grants every team's existing experiments and registered models, so a deploy
converges after an outage or on turning this on. Every call is idempotent: what already exists is
left as it is. The service's own MLflow user (``MLFLOW_TRACKING_USERNAME``) must be an MLflow admin.

Only for a tracking server that runs basic-auth (``CONVTUNE_MLFLOW_TEAM_ACCESS=true``): the one-host
stack has no MLflow users and no teams. MLflow's errors are translated here into
:class:`AccessNotGranted`.

MLflow's client for these routes (``mlflow.server.auth.client.AuthServiceClient``) imports MLflow's
server and Flask, which neither the API's start nor a worker should pay for: this module calls the
same REST routes with MLflow's own request helper (the same credentials and TLS settings as
``MlflowClient``; :func:`models.compat.mlflow_store.rest_call`). The routes and the workspace name are the assumptions ``tests/models/test_access.py``
checks against the installed MLflow.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from models.compat import mlflow_store
from models.errors import ConvtuneError
from models.store.teams import TEAM_NAME

if TYPE_CHECKING:
    from models.store.claims import ModelClaims

__all__ = ["AccessNotGranted", "Grant", "TeamAccess", "team_role"]

log = logging.getLogger(__name__)

ROLE_PREFIX = "convtune-team-"
# With workspaces off (convtune's deploy), every role and resource is in this one workspace.
WORKSPACE = "default"
# MLflow's basic-auth routes (mlflow.server.auth.routes), as of MLflow 3.17.
ROUTES = {
    "create_role": ("/api/3.0/mlflow/roles/create", "POST"),
    "list_roles": ("/api/3.0/mlflow/roles/list", "GET"),
    "add_role_permission": ("/api/3.0/mlflow/roles/permissions/add", "POST"),
    "assign_role": ("/api/3.0/mlflow/roles/assign", "POST"),
    "unassign_role": ("/api/3.0/mlflow/roles/unassign", "DELETE"),
}
_TEAM = re.compile(TEAM_NAME)


class AccessNotGranted(ConvtuneError):
    """MLflow refused a grant or did not answer; the message says which and what to check."""


@dataclass(frozen=True)
class Grant:
    """READ for team ``team``'s role on one MLflow resource (``experiment`` by id, ``registered_model`` by name)."""

    team: str
    resource_type: str
    resource: str


def team_role(team: str) -> str:
    """The MLflow role whose members read ``team``'s work."""
    assert _TEAM.match(team), f"team names are checked where they are configured: {team!r}"
    return f"{ROLE_PREFIX}{team}"


class TeamAccess:
    """Grants on a basic-auth tracking server, made as the process's MLflow user (an admin)."""

    def __init__(self, tracking_uri: str):
        self.tracking_uri = tracking_uri
        self._role_ids: dict[str, int] = {}

    def grant_experiment(self, team: str, experiment_id: str) -> None:
        """Let ``team``'s people read the experiment ``experiment_id``; AccessNotGranted when MLflow refuses."""
        self._grant(Grant(team, "experiment", experiment_id))

    def grant_registered_model(self, team: str, name: str) -> None:
        """Let ``team``'s people read the registered model ``name``; AccessNotGranted when MLflow refuses."""
        self._grant(Grant(team, "registered_model", name))

    def add_person(self, team: str, username: str) -> None:
        """Put the MLflow user ``username`` in ``team``'s role (it must exist); AccessNotGranted otherwise."""
        role_id = self._role_id(team)
        with self._translated(f"adding {username!r} to {team_role(team)!r}"):
            self._call_or_exists("assign_role", json={"username": username, "role_id": role_id})

    def remove_person(self, team: str, username: str) -> None:
        """Take the MLflow user ``username`` out of ``team``'s role; AccessNotGranted when MLflow refuses."""
        role_id = self._role_id(team)
        with self._translated(f"removing {username!r} from {team_role(team)!r}"):
            self._call("unassign_role", json={"username": username, "role_id": role_id})

    def sync(self, claims: ModelClaims, experiment: str) -> list[Grant]:
        """Grant every team its experiment under ``experiment`` and every registered model name it claimed, as the service
        recorded them (:mod:`models.store.claims`: a name or a tag in MLflow is anyone's to write); what it granted."""
        experiments = claims.team_experiments(experiment)
        grants = [Grant(team, "experiment", eid) for team, eid in sorted(experiments.items())]
        grants += [Grant(c.team, "registered_model", c.name) for c in sorted(claims.claimed(), key=lambda c: c.name) if c.team is not None]
        for grant in grants:
            self._grant(grant)
        return grants

    def _grant(self, grant: Grant) -> None:
        role_id = self._role_id(grant.team)
        with self._translated(f"granting {team_role(grant.team)!r} READ on {grant.resource_type} {grant.resource!r}"):
            self._call_or_exists(
                "add_role_permission",
                json={"role_id": role_id, "resource_type": grant.resource_type, "resource_pattern": grant.resource, "permission": "READ"},
            )

    def _role_id(self, team: str) -> int:
        """The id of ``team``'s role, created on first use."""
        name = team_role(team)
        if name not in self._role_ids:
            with self._translated(f"creating the role {name!r}"):
                about = f"convtune: reads team {team}'s work"
                created = self._call_or_exists("create_role", json={"workspace": WORKSPACE, "name": name, "description": about})
                if created is None:  # another process (or an earlier start) made it
                    roles = self._call("list_roles", params={"workspace": WORKSPACE})["roles"]
                    created = {"role": next(r for r in roles if r["name"] == name)}
                self._role_ids[name] = int(created["role"]["id"])
        return self._role_ids[name]

    def _call_or_exists(self, route: str, **kwargs: Any) -> dict[str, Any] | None:
        """Call ``route``; None when what it creates already exists."""
        from mlflow.exceptions import MlflowException

        try:
            return self._call(route, **kwargs)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_ALREADY_EXISTS":
                return None
            raise

    def _call(self, route: str, **kwargs: Any) -> dict[str, Any]:
        endpoint, method = ROUTES[route]
        response = mlflow_store.rest_call(self.tracking_uri, endpoint, method, **kwargs)
        return response.json() if response.content else {}

    @contextmanager
    def _translated(self, doing: str) -> Iterator[None]:
        from mlflow.exceptions import MlflowException

        try:
            yield
        except MlflowException as exc:
            hint = {
                "ENDPOINT_NOT_FOUND": "does the tracking server run `mlflow server --app-name basic-auth`?",
                "UNAUTHENTICATED": "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an MLflow admin",
                "PERMISSION_DENIED": "the MLflow user in MLFLOW_TRACKING_USERNAME must be an MLflow admin",
                "RESOURCE_DOES_NOT_EXIST": "create the MLflow user first (deploy/README.md, 'People')",
            }.get(exc.error_code, "")
            raise AccessNotGranted(f"{doing} failed in MLflow: {_short(exc)}{f' ({hint})' if hint else ''}") from exc
        except (OSError, StopIteration, KeyError) as exc:  # unreachable, or an answer not of this MLflow's shape
            raise AccessNotGranted(f"{doing} failed: MLflow did not answer as expected: {_short(exc)}") from exc


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:300]
