"""The API's collaborators, built once per app in ``create_app`` and reached through :func:`services`."""

from __future__ import annotations

from dataclasses import dataclass

import redis
from celery import Celery
from flask import Flask, current_app

from models.messages import Message, NotSent, celery_config
from models.store.share import Route, Share, weights_of
from models.store.access import TeamAccess
from service.api.errors import ServiceUnavailable
from service.api.runs import RunStore
from service.api.settings import ApiSettings

__all__ = ["Services", "init_app", "services"]


@dataclass
class Services:
    settings: ApiSettings
    runs: RunStore
    redis: redis.Redis
    celery: Celery  # used only to send
    share: Share  # sends work on its team's waiting queue (models.store.share)

    def send(self, message: Message, route: Route) -> None:
        """Publish ``message`` for ``route`` (its queue, team and priority); ServiceUnavailable (503) when the broker does not take it."""
        try:
            self.share.send(message, route)
        except NotSent as exc:
            raise ServiceUnavailable(str(exc)) from exc


def init_app(app: Flask, settings: ApiSettings) -> Services:
    """Build the MLflow store, the Redis client and the Celery sender for ``app``."""
    access = TeamAccess(settings.mlflow_tracking_uri) if settings.mlflow_team_access else None
    runs = RunStore(settings.mlflow_tracking_uri, settings.experiment, settings.study_storage, access)
    # Bounded, never retried by redis-py (from_url): Redis down or stalled answers 503 within seconds.
    redis_client = redis.Redis.from_url(settings.redis_url, socket_timeout=settings.redis_timeout_s, socket_connect_timeout=settings.redis_timeout_s)
    celery = Celery("convtune-api", set_as_current=False)
    celery.conf.update(celery_config(settings.redis_url, settings.visibility_timeout_s, socket_timeout_s=settings.redis_timeout_s, sender=True))
    share = Share(redis_client, celery, enabled=settings.fair_share, weights=weights_of(settings.teams))
    app.extensions["convtune"] = built = Services(settings, runs, redis_client, celery, share)
    return built


def services() -> Services:
    """The current app's collaborators."""
    return current_app.extensions["convtune"]
