"""The real Flask app wired to the session's Redis, mlflow server and worker, plus polling helpers."""

from __future__ import annotations

import uuid

import pytest
from flask.testing import FlaskClient
from mlflow.tracking import MlflowClient

from service.api import create_app
from service.api.settings import ApiSettings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def api_settings(redis_url: str, mlflow_uri: str) -> ApiSettings:
    # Its own experiment per session, so counts of runs are this session's alone.
    return ApiSettings(
        redis_url=redis_url, mlflow_tracking_uri=mlflow_uri, experiment=f"test-{uuid.uuid4().hex[:8]}", default_queue="cpu",
        auth_disabled=True,  # auth and rate limits have their own tests (test_api_auth.py, test_api_limits.py)
        rate_limit="100000/minute", submit_rate_limit="100000/minute",
    )


@pytest.fixture(scope="session")
def app(api_settings: ApiSettings):
    return create_app(api_settings)


@pytest.fixture()
def client(app) -> FlaskClient:
    return app.test_client()


@pytest.fixture(scope="session")
def mlflow_client(mlflow_uri: str) -> MlflowClient:
    return MlflowClient(mlflow_uri)
