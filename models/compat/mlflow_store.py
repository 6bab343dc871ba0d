"""MLflow: the client's tracking store, its REST helper, its artifact repositories and tables tag, the proxied artifact layout.

What convtune takes from MLflow beyond its documented client API:

- ``MlflowClient._tracking_client.store``, the store behind a client, whose ``update_run_info(run_id,
  status, end_time=, run_name=)`` changes a run's status in one request (``MlflowClient.update_run``
  reads the whole run first);
- ``mlflow.utils.credentials.get_default_host_creds`` and ``mlflow.utils.rest_utils.http_request`` /
  ``verify_rest_response``: MLflow's own credentials, TLS settings and error translation for REST
  routes its client does not wrap without importing MLflow's server (the basic-auth role routes);
- the artifact layout of ``mlflow server --artifacts-destination D``: a run's artifact URI is
  ``mlflow-artifacts:/<experiment>/<run>/artifacts`` and the server keeps its files under
  ``D/<experiment>/<run>/artifacts``, so a worker that can reach ``D`` writes there itself;
- ``mlflow.store.artifact.artifact_repository_registry.get_artifact_repository``: the repository
  behind an artifact URI, whose ``log_artifact(local, artifact_path)`` uploads one file (the
  workers upload on threads of their own, to that URI or the store's path of it);
- ``mlflow.utils.mlflow_tags.MLFLOW_LOGGED_ARTIFACTS``: the run tag listing a run's tables
  (``[{"path": ..., "type": "table"}]``), as ``MlflowClient.log_table`` writes it and the UI and
  ``MlflowClient.load_table`` read it.

Checked on mlflow 3.18.0 (``tests/compat/test_mlflow_store.py``). MLflow is imported only inside
the functions: the API's start does not pay for it here.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from models.compat._base import CompatError, require

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

__all__ = ["artifact_repository", "artifact_store_uri", "rest_call", "set_run_status", "tables_tag"]

_LIBRARY = "mlflow"
PROXIED_SCHEME = "mlflow-artifacts"


def set_run_status(client: MlflowClient, run_id: str, status: str) -> None:
    """Set run ``run_id``'s status (a RunStatus name) in one request to the client's store, leaving its end time as it is.

    Raises CompatError when the client has no store of that shape (the caller may use ``client.update_run``).
    """
    from mlflow.entities import RunStatus

    tracking = require(client, "_tracking_client", _LIBRARY, "MlflowClient keeps its tracking client in _tracking_client", __name__)
    store = require(tracking, "store", _LIBRARY, "the tracking client exposes its store as .store", __name__)
    update = require(store, "update_run_info", _LIBRARY, "a tracking store changes a run's status with update_run_info", __name__)
    update(run_id, RunStatus.from_string(status), end_time=None, run_name=None)  # type: ignore[operator]


def rest_call(tracking_uri: str, endpoint: str, method: str, **kwargs: Any) -> Any:
    """One request to the tracking server's REST ``endpoint`` with MLflow's credentials and settings; the response.

    Raises MlflowException (with MLflow's ``error_code``) for an error answer, CompatError when this
    MLflow has no such helpers.
    """
    try:
        from mlflow.utils.credentials import get_default_host_creds
        from mlflow.utils.rest_utils import http_request, verify_rest_response
    except ImportError as exc:
        raise CompatError(_LIBRARY, "mlflow.utils.credentials and mlflow.utils.rest_utils keep MLflow's REST request helpers", __name__,
                          str(exc)) from exc
    return verify_rest_response(http_request(get_default_host_creds(tracking_uri), endpoint, method, **kwargs), endpoint)


def artifact_store_uri(artifact_uri: str, destination: str | None) -> str:
    """Where a server started with ``--artifacts-destination destination`` keeps the files of ``artifact_uri``.

    Only a proxied URI (``mlflow-artifacts:/...``) moves; any other URI, or no destination, is returned as it is.
    """
    parsed = urlparse(artifact_uri)
    if not destination or parsed.scheme != PROXIED_SCHEME:
        return artifact_uri
    return f"{destination.rstrip('/')}/{parsed.path.lstrip('/')}"


def artifact_repository(artifact_uri: str, tracking_uri: str) -> Any:
    """MLflow's artifact repository for ``artifact_uri``: its ``log_artifact(local, artifact_path)`` uploads one file.

    Raises CompatError when this MLflow has no such registry, or a repository without ``log_artifact``.
    """
    try:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    except ImportError as exc:
        raise CompatError(_LIBRARY, "mlflow.store.artifact.artifact_repository_registry.get_artifact_repository gives the repository of a URI",
                          __name__, str(exc)) from exc
    repository = get_artifact_repository(artifact_uri, tracking_uri=tracking_uri)
    require(repository, "log_artifact", _LIBRARY, "an artifact repository uploads a file with log_artifact(local, artifact_path)", __name__)
    return repository


def tables_tag(*paths: str) -> tuple[str, str]:
    """The run tag (name, value) marking the JSON artifacts ``paths`` as tables, as ``MlflowClient.log_table`` writes it.

    Raises CompatError when this MLflow names no such tag.
    """
    try:
        from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS
    except ImportError as exc:
        raise CompatError(_LIBRARY, "mlflow.utils.mlflow_tags.MLFLOW_LOGGED_ARTIFACTS names the run tag listing its tables", __name__,
                          str(exc)) from exc
    return MLFLOW_LOGGED_ARTIFACTS, json.dumps([{"path": path, "type": "table"} for path in paths])
