"""The real Flask app wired to the session's Redis, mlflow server and worker, plus polling helpers."""

from __future__ import annotations

import pytest
from flask.testing import FlaskClient
from mlflow.tracking import MlflowClient

from service.api import create_app
from service.api.settings import ApiSettings
from tests.conftest import TEST_SECRET_KEY

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def api_settings(redis_url: str, mlflow_uri: str, experiment: str) -> ApiSettings:
    # The session's own experiment (tests/conftest.py), which the workers' reconciler sweeps too.
    return ApiSettings(
        redis_url=redis_url, mlflow_tracking_uri=mlflow_uri, experiment=experiment, default_queue="cpu",
        auth_disabled=True,  # auth and rate limits have their own tests (test_api_auth.py, test_api_limits.py)
        rate_limit="100000/minute", submit_rate_limit="100000/minute",
        callback_allowed_networks=["127.0.0.0/8"],  # the tests' receivers listen on loopback
        secret_key=TEST_SECRET_KEY,  # the workers' too (worker_env): callbacks need it
        # Off: many tests park work on a queue no worker serves on purpose (it stays queued), and whether a test's
        # worker served a queue in the last minutes depends on the order the tests ran in. The check is on where
        # the API runs with its workers: test_fleet.py, test_stack.py, test_load.py, tests/deploy.
        unserved_queue_s=0,
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
