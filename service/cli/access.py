"""``convtune mlflow-access``: who reads a team's work in MLflow (docs/mlflow-access.md).

Run where the API runs (its CONVTUNE_MLFLOW_TRACKING_URI and CONVTUNE_EXPERIMENT, and MLflow's admin
in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD): ``docker compose exec api convtune
mlflow-access sync``, ``kubectl -n convtune exec deploy/convtune-api -- convtune mlflow-access sync``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import click

from service.cli.follow import EXIT_UNAVAILABLE

__all__ = ["mlflow_access"]


@click.group("mlflow-access")
def mlflow_access() -> None:
    """Let each team's people read its experiment and registered models in MLflow, and no one else's.

    A team's people are the MLflow users in its role, convtune-team-TEAM (MLflow's basic-auth app).
    """


@mlflow_access.command()
def sync() -> None:
    """Grant every team's role READ on the team's experiment and registered models (idempotent)."""
    from models.store.claims import open_claims

    settings = _settings()
    access = _access(settings.mlflow_tracking_uri)
    grants = _or_exit(lambda: access.sync(open_claims(settings.study_storage), settings.experiment))
    for grant in grants:
        click.echo(f"convtune-team-{grant.team}: READ on {grant.resource_type} {grant.resource}")
    click.echo(f"{len(grants)} grants in place on {settings.mlflow_tracking_uri}", err=True)


@mlflow_access.command()
@click.argument("team")
@click.argument("usernames", nargs=-1, required=True)
def add(team: str, usernames: tuple[str, ...]) -> None:
    """Put MLflow users (already created) in TEAM's role: they read the team's work from now on."""
    access = _access(_settings().mlflow_tracking_uri)
    for username in usernames:
        _or_exit(lambda username=username: access.add_person(team, username))
        click.echo(f"{username} reads team {team}'s work")


@mlflow_access.command()
@click.argument("team")
@click.argument("usernames", nargs=-1, required=True)
def remove(team: str, usernames: tuple[str, ...]) -> None:
    """Take MLflow users out of TEAM's role: they no longer read the team's work."""
    access = _access(_settings().mlflow_tracking_uri)
    for username in usernames:
        _or_exit(lambda username=username: access.remove_person(team, username))
        click.echo(f"{username} no longer reads team {team}'s work")


def _settings():
    from service.api.settings import ApiSettings

    return ApiSettings()


def _access(tracking_uri: str):
    import re

    from models.store.access import TeamAccess
    from models.store.teams import TEAM_NAME

    team = click.get_current_context().params.get("team")
    if team is not None and not re.match(TEAM_NAME, team):
        raise click.BadParameter(f"{team!r} is not a team name ({TEAM_NAME})", param_hint="TEAM")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return TeamAccess(tracking_uri)


def _or_exit(call: Callable[[], object]):
    """``call()``; on AccessNotGranted, its message and exit 3 (the service unavailable or refusing)."""
    from models.store.access import AccessNotGranted

    try:
        return call()
    except AccessNotGranted as exc:
        click.echo(f"convtune mlflow-access: {exc}", err=True)
        sys.exit(EXIT_UNAVAILABLE)

