"""The API's collaborators, built once per app in ``create_app`` and reached through :func:`services`."""

from __future__ import annotations

from dataclasses import dataclass

import redis
from flask import Flask, current_app

from service.api.dispatch import Dispatcher, TaskSender
from service.api.runs import RunStore
from service.api.settings import ApiSettings

__all__ = ["Services", "init_app", "services"]


@dataclass
class Services:
    settings: ApiSettings
    runs: RunStore
    redis: redis.Redis
    dispatcher: Dispatcher


def init_app(app: Flask, settings: ApiSettings) -> Services:
    """Build the MLflow store, the Redis client and the Celery sender for ``app``."""
    runs = RunStore(settings.mlflow_tracking_uri, settings.experiment)
    redis_client = redis.Redis.from_url(settings.redis_url, socket_timeout=3, socket_connect_timeout=3)
    dispatcher = Dispatcher(settings, runs, TaskSender(settings), redis_client)
    app.extensions["convtune"] = built = Services(settings, runs, redis_client, dispatcher)
    return built


def services() -> Services:
    """The current app's collaborators."""
    return current_app.extensions["convtune"]
