"""A trial's model as an MLflow 3 logged model: created, its files uploaded, linked to the run, made READY.

``mlflow.pytorch.log_model(name=...)`` does the same the slow way (it exports, reloads and checks the
model, then makes its requests one after another). Here the directory is written by the fast exporter
(:mod:`workers.trial.export`) and MLflow is asked three times: ``create_logged_model`` (on an upload
thread while the model is exported), ``log_outputs`` (the run's "Models" in MLflow's UI) beside the
files' uploads, and ``finalize_logged_model`` (READY) once the files are in the model's artifact location. The files go straight into the server's store when the worker may
write there (``CONVTUNE_ARTIFACTS_DESTINATION``), as the run's artifacts do; a logged model's proxied
location ``mlflow-artifacts:/<experiment>/models/<id>/artifacts`` has the same layout as a run's.

A file that fails to upload marks the model FAILED and fails the delivery (its error comes out of
the run's uploads, as any upload's does); the delivery that retries creates a new model.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, wait
from pathlib import Path
from typing import TYPE_CHECKING

from models.compat import mlflow_store

if TYPE_CHECKING:
    from mlflow.entities import LoggedModel
    from mlflow.tracking import MlflowClient

__all__ = ["MODEL_NAME", "create", "upload"]

MODEL_NAME = "model"  # what runs:/<run>/model finds: the run's logged model of this name
MODEL_TYPE = "convtune.image_classifier"

Submit = Callable[..., Future]


def create(client: MlflowClient, experiment_id: str, run_id: str, submit: Submit) -> Future:
    """Ask for the run's logged model on an upload thread; the future's result is the :class:`LoggedModel`."""
    return submit(client.create_logged_model, experiment_id, name=MODEL_NAME, source_run_id=run_id, model_type=MODEL_TYPE)


def upload(client: MlflowClient, run_id: str, model: LoggedModel, local: Path, destination: str | None, submit: Submit) -> None:
    """Link ``model`` to the run, and every file under ``local`` into its artifacts, each its own upload; then make it READY."""
    from mlflow.entities import LoggedModelOutput

    submit(client.log_outputs, run_id, [LoggedModelOutput(model.model_id, step=0)])  # as log_model does: linked before its files
    uri = mlflow_store.artifact_store_uri(model.artifact_location, destination)
    repository = mlflow_store.artifact_repository(uri, client.tracking_uri)
    files = []
    for file in sorted(p for p in local.rglob("*") if p.is_file()):
        parent = file.parent.relative_to(local)
        files.append(submit(repository.log_artifact, str(file), "/".join(parent.parts) or None))
    # Submitted after its files: the pool runs tasks in order, so those are running or done when this one waits.
    submit(_ready, client, model.model_id, files)


def _ready(client: MlflowClient, model_id: str, files: list[Future]) -> None:
    from mlflow.entities import LoggedModelStatus

    wait(files)
    failed = next((f.exception() for f in files if f.exception() is not None), None)
    if failed is not None:
        client.finalize_logged_model(model_id, LoggedModelStatus.FAILED)
        raise failed
    client.finalize_logged_model(model_id, LoggedModelStatus.READY)

