"""What :mod:`models.store.access` assumes of the installed MLflow's basic-auth app (STYLE.md 14): an upgrade that
moves a route, renames the workspace or drops a resource type fails here, by name, not in a deploy's grants."""

from __future__ import annotations

import pytest

from models.store.access import ROUTES, WORKSPACE, team_role


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_each_route_is_mlflows_own(route: str) -> None:
    from mlflow.server.auth import client, routes

    endpoint, _method = ROUTES[route]
    assert getattr(routes, route.upper()) == endpoint, f"MLflow moved {route}: update models.store.access.ROUTES"
    assert hasattr(client.AuthServiceClient, route), f"MLflow's own client no longer has {route}"


def test_roles_live_in_mlflows_default_workspace() -> None:
    from mlflow.utils.workspace_utils import DEFAULT_WORKSPACE_NAME

    assert WORKSPACE == DEFAULT_WORKSPACE_NAME


def test_a_role_may_be_granted_read_on_one_experiment_and_one_registered_model() -> None:
    from mlflow.server.auth import permissions

    for resource_type in ("experiment", "registered_model"):
        permissions._validate_permission_for_resource_type("READ", resource_type)
        permissions._validate_resource_pattern("123", resource_type)  # one resource, not a wildcard
    assert permissions.NO_PERMISSIONS.name == "NO_PERMISSIONS" and not permissions.NO_PERMISSIONS.can_read


def test_a_team_role_is_named_after_the_team() -> None:
    assert team_role("alpha") == "convtune-team-alpha"
    with pytest.raises(AssertionError):
        team_role("not a team")
