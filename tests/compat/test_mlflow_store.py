"""The MLflow internals models.compat.mlflow_store relies on, against the installed MLflow.

The client's store (a local store: the same ``_tracking_client.store`` a server's REST store sits
behind), the REST helpers against a small HTTP server of the test's own, and the proxied artifact
layout: against MLflow's own ``mlflow-artifacts`` URI resolution, and (integration) a real
``mlflow server --artifacts-destination``.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from models.compat import CompatError, installed_version, mlflow_store
from tests.conftest import Service, free_port, mlflow_healthy, wait_for

MODULE = r"models\.compat\.mlflow_store"


@pytest.fixture(scope="module")
def local_client(tmp_path_factory: pytest.TempPathFactory) -> MlflowClient:
    """A client of a local sqlite store (MLflow's file store is retired; its schema takes seconds to create, once)."""
    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path_factory.mktemp('mlflow-local') / 'mlflow.db'}")


def test_a_run_status_set_through_the_client_store_keeps_its_end_time(local_client: MlflowClient):
    experiment = local_client.create_experiment("compat")
    run = local_client.create_run(experiment)
    local_client.set_terminated(run.info.run_id, status="FAILED")
    ended = local_client.get_run(run.info.run_id).info.end_time

    mlflow_store.set_run_status(local_client, run.info.run_id, "RUNNING")

    info = local_client.get_run(run.info.run_id).info
    assert (info.status, info.end_time) == ("RUNNING", ended)


def test_a_client_without_its_tracking_client_is_named_in_a_clear_error(local_client: MlflowClient, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delattr(local_client, "_tracking_client")
    with pytest.raises(CompatError, match=rf"mlflow .* {MODULE} assumes: MlflowClient keeps its tracking client in _tracking_client"):
        mlflow_store.set_run_status(local_client, "any", "RUNNING")


class _Routes(BaseHTTPRequestHandler):
    """Answers as a tracking server's REST routes do: JSON, and MLflow's error body for an unknown resource."""

    def do_POST(self) -> None:
        sent = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/api/3.0/mlflow/roles/create":
            self._answer(200, {"role": {"name": sent["name"], "id": 7}})
        else:
            self._answer(404, {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": f"no route {self.path}"})

    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def rest_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Routes)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_rest_call_answers_json_and_raises_mlflow_errors_with_their_code(rest_server: str):
    answer = mlflow_store.rest_call(rest_server, "/api/3.0/mlflow/roles/create", "POST", json={"name": "r"})
    assert answer.json() == {"role": {"name": "r", "id": 7}}
    with pytest.raises(MlflowException) as raised:
        mlflow_store.rest_call(rest_server, "/api/3.0/mlflow/roles/gone", "POST", json={})
    assert raised.value.error_code == "RESOURCE_DOES_NOT_EXIST"


def test_rest_helpers_gone_from_mlflow_utils_are_named_in_a_clear_error(rest_server: str, monkeypatch: pytest.MonkeyPatch):
    import mlflow.utils.rest_utils

    monkeypatch.delattr(mlflow.utils.rest_utils, "verify_rest_response")
    with pytest.raises(CompatError, match=rf"mlflow .* {MODULE} assumes: mlflow.utils.credentials and mlflow.utils.rest_utils"):
        mlflow_store.rest_call(rest_server, "/api/3.0/mlflow/roles/create", "POST", json={"name": "r"})


def test_a_proxied_artifact_uri_is_the_path_mlflow_asks_its_server_for(tmp_path: Path):
    from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository

    uri = "mlflow-artifacts:/12/0123abcd/artifacts"
    served = MlflowArtifactsRepository.resolve_uri(uri, "http://tracking:5000")
    route = "http://tracking:5000/api/2.0/mlflow-artifacts/artifacts/"
    assert served.startswith(route), f"mlflow {installed_version('mlflow')} resolves {uri} to {served}: see {MODULE}"
    assert mlflow_store.artifact_store_uri(uri, str(tmp_path)) == f"{tmp_path}/{served[len(route):]}"
    assert mlflow_store.artifact_store_uri(uri, None) == uri
    assert mlflow_store.artifact_store_uri("s3://bucket/12/run/artifacts", str(tmp_path)) == "s3://bucket/12/run/artifacts"


def _run_with_local_artifacts(client: MlflowClient, name: str, store: Path) -> tuple[str, str]:
    """A run of a new experiment ``name`` whose artifacts live under ``store``: its experiment id and run id."""
    experiment = client.create_experiment(name, artifact_location=store.as_uri())
    return experiment, client.create_run(experiment).info.run_id


def test_an_artifact_repository_uploads_a_file_where_the_client_finds_it(local_client: MlflowClient, tmp_path: Path):
    _, run_id = _run_with_local_artifacts(local_client, "compat-artifacts", tmp_path / "store")
    local = tmp_path / "sent.txt"
    local.write_text("uploaded")
    repository = mlflow_store.artifact_repository(local_client.get_run(run_id).info.artifact_uri, local_client.tracking_uri)
    repository.log_artifact(str(local), "texts")
    assert [f.path for f in local_client.list_artifacts(run_id, "texts")] == ["texts/sent.txt"]
    assert Path(local_client.download_artifacts(run_id, "texts/sent.txt", str(tmp_path / "back"))).read_text() == "uploaded"


def test_a_table_written_with_the_tables_tag_is_one_mlflow_load_table_reads(local_client: MlflowClient, tmp_path: Path):
    experiment, run_id = _run_with_local_artifacts(local_client, "compat-tables", tmp_path / "store")
    table = tmp_path / "model_summary.json"  # pandas' "split" JSON, as convtune writes a model summary
    table.write_text(json.dumps({"columns": ["layer", "params"], "data": [["conv1", 448], ["fc", 650]]}))
    mlflow_store.artifact_repository(local_client.get_run(run_id).info.artifact_uri, local_client.tracking_uri).log_artifact(str(table))
    local_client.set_tag(run_id, *mlflow_store.tables_tag("model_summary.json"))

    loaded = local_client.load_table(experiment, "model_summary.json", run_ids=[run_id])
    assert loaded[["layer", "params"]].values.tolist() == [["conv1", 448], ["fc", 650]]


def test_an_artifact_registry_gone_from_mlflow_is_named_in_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    import mlflow.store.artifact.artifact_repository_registry as registry

    monkeypatch.delattr(registry, "get_artifact_repository")
    with pytest.raises(CompatError, match=rf"mlflow .* {MODULE} assumes: .*get_artifact_repository gives the repository of a URI"):
        mlflow_store.artifact_repository(tmp_path.as_uri(), "sqlite:///unused.db")


def test_a_tables_tag_gone_from_mlflow_tags_is_named_in_a_clear_error(monkeypatch: pytest.MonkeyPatch):
    import mlflow.utils.mlflow_tags

    monkeypatch.delattr(mlflow.utils.mlflow_tags, "MLFLOW_LOGGED_ARTIFACTS")
    with pytest.raises(CompatError, match=rf"mlflow .* {MODULE} assumes: .*MLFLOW_LOGGED_ARTIFACTS names the run tag listing its tables"):
        mlflow_store.tables_tag("model_summary.json")


@pytest.fixture(scope="module")
def proxying_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """``mlflow server --artifacts-destination D`` of this module's own: its address and D."""
    home = tmp_path_factory.mktemp("mlflow-compat")
    port = free_port()
    destination = home / "artifacts"
    server = Service(
        "mlflow-compat",
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}", "--artifacts-destination", str(destination)],
        {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    uri = f"http://127.0.0.1:{port}"
    if not wait_for(lambda: mlflow_healthy(uri) or not server.alive(), 120) or not server.alive():
        server.stop()
        pytest.fail(f"mlflow server did not start:\n{server.log()[-3000:]}")
    yield uri, destination
    server.stop()


@pytest.mark.integration
def test_the_server_keeps_a_runs_artifacts_where_the_adapter_says(proxying_server: tuple[str, Path], tmp_path: Path):
    uri, destination = proxying_server
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("compat-layout"))
    local = tmp_path / "sent.txt"
    local.write_text("through the server")
    client.log_artifact(run.info.run_id, str(local))
    direct = Path(mlflow_store.artifact_store_uri(run.info.artifact_uri, str(destination)))
    assert (direct / "sent.txt").read_text() == "through the server", (
        f"mlflow {installed_version('mlflow')} stores {run.info.artifact_uri} elsewhere than {direct}: see {MODULE}"
    )

    (direct / "written.txt").write_text("straight into the store")  # as a worker told the destination writes
    fetched = client.download_artifacts(run.info.run_id, "written.txt", str(tmp_path))
    assert Path(fetched).read_text() == "straight into the store"
