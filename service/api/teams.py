"""/teams: what an operator hands a team: the key its callback receivers verify signatures with.

Each team's webhook key is derived from the service's secret key (:func:`models.callbacks.webhook_key`),
so there is nothing to store: this route computes it. Only admins read it (a team's key lets its
holder forge that team's events); ``convtune webhook-key --team T`` prints the same where the
secret key is at hand.
"""

from __future__ import annotations

from flask_openapi3 import APIBlueprint, Tag
from pydantic import BaseModel, Field

from models.callbacks import DEFAULT_TEAM, webhook_key, webhook_secret
from models.store.teams import TEAM_NAME
from service.api.auth import current_principal
from service.api.errors import Conflict, Forbidden
from service.api.openapi import BEARER, PROTECTED_ERRORS, problems
from service.api.settings import ApiSettings
from service.api.wiring import services

__all__ = ["WebhookKey", "bp", "team_webhook_key"]

bp = APIBlueprint("teams", __name__, url_prefix="/teams", abp_tags=[Tag(name="teams")], abp_security=BEARER, abp_responses=PROTECTED_ERRORS)


class TeamPath(BaseModel):
    team: str = Field(pattern=TEAM_NAME, description=f"The team's name ('{DEFAULT_TEAM}': the team of callbacks when authentication is off).")


class WebhookKey(BaseModel):
    """A team's webhook signing key, as Standard Webhooks libraries take it."""

    team: str
    version: int = Field(description="The key's version (CONVTUNE_WEBHOOK_KEY_VERSIONS); a new one rotates it.")
    secret: str = Field(description="whsec_<base64 key>: give it to the team's receivers; they verify each delivery with it.")
    signing_versions: list[int] = Field(description="The versions that sign deliveries now, this one first: more than one while the key rotates.")


@bp.get("/<team>/webhook-key", responses={200: WebhookKey, **problems(403, 409)})
def get_webhook_key(path: TeamPath):
    """Show a team's webhook signing key (admins only)."""
    if not current_principal().is_admin:
        raise Forbidden("only an admin token may read a team's webhook key")
    return team_webhook_key(services().settings, path.team).model_dump()


def team_webhook_key(settings: ApiSettings, team: str) -> WebhookKey:
    """``team``'s current webhook key; Conflict when the service has no secret key (callbacks are off)."""
    master = settings.master_key
    if not master:
        raise Conflict("this service has no secret key (CONVTUNE_SECRET_KEY): callbacks are off and no team has a webhook key")
    versions = settings.webhook_versions(team)
    return WebhookKey(team=team, version=versions[0], secret=webhook_secret(webhook_key(master, team, versions[0])), signing_versions=versions)
