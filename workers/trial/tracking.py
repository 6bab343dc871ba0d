"""A trial's MLflow run, seen from the worker: status, one batched call per epoch, artifacts.

The API created the run (SCHEDULED, params and tags logged once), or a study's step did a moment
before (RUNNING from the start). The worker never logs params again (MLflow params are immutable);
it moves the run to RUNNING, logs metrics with ``step=epoch`` in one ``log_batch`` per epoch, the
model and plots at the end, and ends the run with convtune's outcome and reason tags.

Artifacts (the summary table, the curves, the confusion matrix, the model) are uploaded a few at a
time on the process's upload threads while the worker goes on (evaluating, exporting the next
file), through the server or straight into its store (:func:`direct_artifact_uri`); :meth:`MlflowTracker.finish` waits for all of them before it ends the run, so a run seen
ended has every artifact, and an upload that failed (MLflow down) fails the delivery as any other
MLflow error does, for the task to retry.

Once told who owns the run (:meth:`MlflowTracker.hold`, the trial's lease), it writes nothing for a
worker that lost it: the next holder logs those epochs again. Each write asks the lease's store
itself first (the lease's cached answer may be up to half a TTL old), and the holder's fence goes
on the run with its start tags (``convtune.fence``). Before the two writes a late one would damage,
an epoch's ``convtune.epochs_done`` and the ending, it reads the run's fence and refuses (Superseded)
when a later holder's is there: a paused worker then neither moves ``epochs_done`` back nor ends a
run another worker trains.

What remains: MLflow has no compare-and-set, so a write can still land after the checks that let
it go. The strict lease check renews the lease for a whole TTL, so that takes this worker pausing
longer than the TTL between its checks and the server applying its request (or Redis losing the
key in that moment): a window of one request per paused worker, in which ``epochs_done`` may step
back until the next epoch's write, or a run see a second ending. The lease and fence guarantee the
rest: a stale holder is refused at its next write, never replaces a later holder's checkpoint, and
stops training at its next check.

An epoch is logged once across deliveries: a worker that died between logging an epoch and
checkpointing it leaves ``convtune.epochs_done`` ahead of the checkpoint, and the delivery that
resumes trains that epoch again without logging it twice.
"""

from __future__ import annotations

import contextvars
import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from mlflow.entities import Metric, RunInfo, RunTag
from mlflow.tracking import MlflowClient
from torch import nn

from models.compat import mlflow_store
from models.store import runs
from models.store.events import ENDED, EPOCH, STATUS, EventLog
from models.store.runs import TAG, client_status
from workers.training.batching import BatchPlan
from workers.training.outcomes import Ending, Superseded
from workers.training.train import ServedInputs
from workers.trial import logged_model
from workers.trial.export import exporter, input_contract
from workers.trial.figures import confusion_svg, learning_curve_svg

if TYPE_CHECKING:
    from workers.trial.lease import Lease

__all__ = ["MlflowTracker", "Uploads", "direct_artifact_uri", "pip_requirements"]

log = logging.getLogger(__name__)
UPLOAD_THREADS = 4


def pip_requirements() -> list[str]:
    """What the logged model needs to load; explicit, since inferring them costs seconds per trial."""
    import numpy

    return [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={numpy.__version__}"]


def direct_artifact_uri(artifact_uri: str, destination: str | None) -> str:
    """Where to write a run's artifacts: straight into the server's store when this worker can reach it.

    A server started with ``--artifacts-destination D`` gives runs ``mlflow-artifacts:/<experiment>/<run>/artifacts``
    URIs and stores what it is sent under ``D/<experiment>/<run>/artifacts``. Each file sent through it is
    one HTTP request the (single) server answers; a worker told ``D`` (``CONVTUNE_ARTIFACTS_DESTINATION``:
    the same directory on one host, or the same object store) writes there itself, and the server
    serves the files as if it had stored them. Any other URI, or no destination, is returned as it is.
    The layout is MLflow's: :func:`models.compat.mlflow_store.artifact_store_uri`.
    """
    return mlflow_store.artifact_store_uri(artifact_uri, destination)


class Uploads:
    """One run's artifact uploads, run on the process's upload threads; :meth:`wait` for them all.

    Files go straight to the run's artifact repository, resolved once per run: through
    ``MlflowClient.log_artifact`` each upload first reads the run for its artifact URI (until
    MLflow's cache has it, which concurrent first uploads all miss).
    """

    _pool: ThreadPoolExecutor | None = None  # per process, made on first use (after a prefork worker forks)

    def __init__(self, client: MlflowClient, run_id: str, destination: str | None = None):
        self.client, self.run_id, self.destination = client, run_id, destination
        self.artifact_uri: str | None = None  # known once the run was read (MlflowTracker.status) or created
        self.pending: list[Future] = []
        self._staging: Path | None = None
        self._repository: Any = None

    @classmethod
    def pool(cls) -> ThreadPoolExecutor:
        if cls._pool is None:
            cls._pool = ThreadPoolExecutor(max_workers=UPLOAD_THREADS, thread_name_prefix="artifact-upload")
        return cls._pool

    @classmethod
    def forget_pool(cls) -> None:
        """After a fork, in the child: the parent's pool came without its threads (its submits would never run)."""
        cls._pool = None

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        # In the caller's log context: what an upload logs is the run's (workers.trial.recording keeps its lines).
        future = self.pool().submit(contextvars.copy_context().run, fn, *args, **kwargs)
        self.pending.append(future)
        return future

    def file(self, local: Path, artifact_path: str | None = None) -> None:
        """Upload ``local`` into ``artifact_path`` (a directory of the run's artifacts; None: the root)."""
        repository = self.repository()
        self.submit(repository.log_artifact, str(local), artifact_path)

    def text(self, text: str, artifact_file: str) -> None:
        directory = artifact_file.rpartition("/")[0]
        local = self.staging() / "text" / artifact_file
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(text, encoding="utf-8")
        self.file(local, directory or None)

    def directory(self, local: Path, artifact_path: str) -> None:
        """Every file under ``local``, each its own upload, as ``artifact_path/...``."""
        for file in sorted(p for p in local.rglob("*") if p.is_file()):
            parent = file.parent.relative_to(local)
            self.file(file, "/".join((artifact_path, *parent.parts)))

    def repository(self) -> Any:
        if self._repository is None:
            uri = direct_artifact_uri(self.artifact_uri or self.client.get_run(self.run_id).info.artifact_uri, self.destination)
            self._repository = mlflow_store.artifact_repository(uri, self.client.tracking_uri)
        return self._repository

    def staging(self) -> Path:
        """A local directory for files waiting to be uploaded, removed by :meth:`wait`."""
        if self._staging is None:
            self._staging = Path(tempfile.mkdtemp(prefix=f"convtune-{self.run_id}-"))
        return self._staging

    def wait(self) -> None:
        """Block until every upload is done; raise the first one's error."""
        try:
            for future in self.pending:
                future.result()
        finally:
            self.pending = []
            if self._staging is not None:
                shutil.rmtree(self._staging, ignore_errors=True)
                self._staging = None


class MlflowTracker:
    """Logs one trial into its existing MLflow run.

    ``artifacts_destination``: where the MLflow server stores proxied artifacts (its
    ``--artifacts-destination``), when this worker can write there itself (see :func:`direct_artifact_uri`).
    """

    def __init__(self, client: MlflowClient, run_id: str, log_model: bool = True, artifacts_destination: str | None = None):
        self.client = client
        self.run_id = run_id
        self.log_model_enabled = log_model
        # Whether this worker still holds the run (set once it takes the lease, :meth:`hold`); writes are skipped once it does not.
        self.still_owner: Callable[[], bool] = lambda: True
        # The same, asked of the lease's store before each write (None: ``still_owner``).
        self.confirm_owner: Callable[[], bool] | None = None
        # This holder's lease fence (None: not fenced); fence_seen, the run's as :meth:`status` read it.
        self.fence: int | None = None
        self.fence_seen = 0
        self.logged_through = 0  # the last epoch the run has, as :meth:`status` read it
        self.uploads = Uploads(client, run_id, artifacts_destination)
        self._starting: dict[str, str] | None = None  # start tags not sent yet (:meth:`starting`)
        self._created: RunInfo | None = None  # this process created the run RUNNING a moment ago (:meth:`created`)
        # The run's team tag, as :meth:`status` read it (or :meth:`created` was told): whose folder of the data root it reads.
        # The tag, not team_of(): work submitted with auth off (owner 'anonymous', no team tag) reads the root, as the API checked it.
        self.team: str | None = None
        self._lost_checkpoint: str | None = None  # why its checkpoint could not be read (:meth:`checkpoint_lost`)
        # The trial's last epoch: its metrics wait for the ending and go in its request (:meth:`finish`), one fewer a trial.
        self.final_epoch: int | None = None
        self._held: tuple[int, list[Metric]] | None = None
        self._epoch_sent: Future | None = None  # the last epoch's metrics, on their way (:meth:`log_epoch`)
        self.run_tags: dict[str, str] = {}  # the run's tags, as :meth:`status` read them (or :meth:`created` found them)
        # What the delivery used (workers.trial.accounting), sent with the ending: metrics and tags in the same request.
        self.usage_metrics: dict[str, float] = {}
        self.usage_tags: dict[str, str] = {}
        self.experiment_id: str | None = None  # the run's, as :meth:`status` read it (or :meth:`created` was told)
        self.model_id: str | None = None  # its logged model, once :meth:`log_result` created it (a tag of the ending)
        # Sent with the start tags: the code, libraries, device and data of this delivery (workers.trial.provenance).
        self.provenance: dict[str, str] = {}
        # The delivery's log and system metrics (a workers.trial.recording.Recorder, which imports this module), told when the run
        # starts, of each epoch and of the ending; None: not recorded.
        self.recorder: Any = None
        # Where the run's events go for clients that follow it (models.store.events); None: nowhere.
        self.events: EventLog | None = None

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        """Tell clients that follow the run what happened (best effort: never raises, see models.store.events)."""
        if self.events is not None:
            self.events.publish(self.run_id, kind, data)

    def created(self, info: RunInfo, team: str | None) -> None:
        """The run of ``team`` was created RUNNING by this process a moment ago (``runs.create_started_run``): nothing to read back.

        :meth:`status` answers from ``info`` and starting it sends only its tags: two requests fewer a trial.
        """
        self._created, self.team = info, team
        self.experiment_id = info.experiment_id
        self.run_tags = runs.created_tags(info.run_id)
        self.uploads.artifact_uri = info.artifact_uri

    def hold(self, lease: Lease) -> None:
        """Write as the holder of ``lease`` from now on: its cheap check, its strict one before each write, its fence."""
        self.still_owner = lease.held
        self.confirm_owner = lambda: lease.held(strict=True)
        self.fence = lease.fence

    def may_write(self, what: str, strict: bool = True) -> bool:
        """Whether this worker still holds the run; ``strict`` (before a write): asked of the lease's store itself."""
        owns = self.confirm_owner if strict and self.confirm_owner is not None else self.still_owner
        if owns():
            return True
        log.warning("run %s: this worker lost its lease; %s not logged", self.run_id, what)
        return False

    def superseded(self, what: str) -> bool:
        """Whether the run carries a later holder's fence than this worker's (one request; False when not fenced)."""
        if self.fence is None:
            return False
        theirs = int(self.client.get_run(self.run_id).data.tags.get(TAG.FENCE, "0"))
        if theirs <= self.fence:
            return False
        log.warning("run %s: a later holder (fence %d) writes it, not this one (%d); %s not logged", self.run_id, theirs, self.fence, what)
        return True

    def _fence_tags(self) -> dict[str, str]:
        return {} if self.fence is None else {TAG.FENCE: str(self.fence)}

    def status(self) -> str:
        """The run's MLflow status (and, kept, the last epoch it has logged)."""
        if self._created is not None:
            return self._created.status  # nothing logged yet
        run = self.client.get_run(self.run_id)
        self.logged_through = int(run.data.tags.get(TAG.EPOCHS_DONE, "0"))
        self.fence_seen = int(run.data.tags.get(TAG.FENCE, "0"))
        self.team = run.data.tags.get(TAG.TEAM)
        self.run_tags = dict(run.data.tags)
        self.uploads.artifact_uri = run.info.artifact_uri
        self.experiment_id = run.info.experiment_id
        return run.info.status

    def tags(self) -> dict[str, str]:
        return dict(self.client.get_run(self.run_id).data.tags)

    def start(self, device: str, attempt: int) -> None:
        """Mark the run RUNNING on this worker."""
        runs.start_run(self.client, self.run_id, {**self.provenance, TAG.DEVICE: device, TAG.ATTEMPTS: str(attempt), **self._fence_tags()}, first=attempt == 1)
        if self.recorder is not None:
            self.recorder.running()  # system metrics from here: the run is RUNNING
        self.publish(STATUS, {"status": "running", "attempt": attempt})

    def starting(self, device: str, attempt: int) -> None:
        """Like :meth:`start`, sent with the batches (:meth:`log_batches`) when training begins: two requests fewer per trial."""
        first = {TAG.STARTED_AT: runs.now()} if attempt == 1 else {}
        self._starting = {**self.provenance, TAG.DEVICE: device, TAG.ATTEMPTS: str(attempt), **self._fence_tags(), **first}

    def log_epoch(self, epoch: int, metrics: dict[str, float], at_ms: int | None = None, after: Future | None = None) -> None:
        """See :meth:`workers.training.train.Tracker.log_epoch`."""
        if not self.may_write(f"epoch {epoch}", strict=False):  # the write itself asks the lease's store (_send_epoch, finish)
            return
        if epoch <= self.logged_through:
            log.debug("run %s: epoch %d was logged by an earlier delivery; not logged twice", self.run_id, epoch)
            return
        stamp = at_ms if at_ms is not None else int(time.time() * 1000)
        batch = [Metric(key, float(value), stamp, epoch) for key, value in metrics.items()]
        self.publish(EPOCH, {"epoch": epoch, "metrics": {m.key: m.value for m in batch}})
        if epoch == self.final_epoch:  # the run ends next: these go with the ending (lost with it if this worker is)
            self._held = (epoch, batch)
            return
        # Sent while the next epoch trains, one epoch in flight at most (in order; the previous one's error surfaces
        # here or in finish). The checkpoint of this epoch may then land before its metrics: a delivery that resumes
        # from it logs the epochs its checkpoint has and the run lacks (run_trial replays the restored history).
        if self._epoch_sent is not None:
            self._epoch_sent.result()
        self._epoch_sent = self.uploads.pool().submit(contextvars.copy_context().run, self._send_epoch, epoch, batch, after)
        self.uploads.pending.append(self._epoch_sent)
        self.logged_through = epoch
        if self.recorder is not None:
            self.recorder.progress()  # the log's lines so far, when a snapshot is due

    def _send_epoch(self, epoch: int, batch: list[Metric], after: Future | None = None) -> None:
        if after is not None:
            wait([after])  # the epoch's checkpoint first (its error is the training loop's to raise)
        # Asked again on the upload thread, of Redis and of the run: a worker paused between the two (SIGSTOP, a frozen
        # VM) may have lost the trial meanwhile, and the new holder logs this epoch itself (from its checkpoint, or by
        # training it), and later ones, whose epochs_done this one must not set back. Paused after these checks, its
        # request may still land late (see the module's doc): its epoch's checkpoint is written by then, so the new
        # holder resumed from it and offered the same metrics with the same stamp, which MLflow keeps once.
        if self.may_write(f"epoch {epoch}") and not self.superseded(f"epoch {epoch}"):
            self.client.log_batch(self.run_id, metrics=batch, tags=[RunTag(TAG.EPOCHS_DONE, str(epoch))])

    def log_summary(self, rows: list[dict[str, Any]]) -> None:
        """The model summary table: each layer, its output shape, parameters and FLOPs."""
        if not self.may_write("the model summary"):
            return
        # What MlflowClient.log_table writes (pandas' "split" JSON, tagged as a table for the UI), without
        # its four requests and pandas: this run has no table yet, and the tag goes with the start tags.
        keys = list(rows[0]) if rows else []
        table = {"columns": keys, "data": [[json.dumps(r[k]) if isinstance(r[k], (list, tuple)) else r[k] for k in keys] for r in rows]}
        self.uploads.text(json.dumps(table), "model_summary.json")
        self.uploads.text(_summary_text(rows), "model_summary.txt")
        tag, tables = mlflow_store.tables_tag("model_summary.json")
        if self._starting is not None:
            self._starting[tag] = tables
        else:
            self.uploads.submit(self.client.set_tag, self.run_id, tag, tables)

    def log_result(self, model: nn.Module, example: torch.Tensor, history: list[dict[str, float]], served: ServedInputs | None = None) -> None:
        """At the end of training: the learning curves and the trained model (``served``: its raw input and classes)."""
        if not self.may_write("the results"):
            return
        created = None
        if self.log_model_enabled:  # asked first: the request runs while the curves are written and the model exported
            experiment_id = self.experiment_id or self.client.get_run(self.run_id).info.experiment_id
            created = logged_model.create(self.client, experiment_id, self.run_id, self.uploads.submit)
        self.uploads.text(learning_curve_svg(history), "plots/learning_curve.svg")
        self.uploads.text(json.dumps(history, indent=2), "history.json")
        if created is not None:
            self._log_model(model, example, served, created)

    def _log_model(self, model: nn.Module, example: torch.Tensor, served: ServedInputs | None, created: Future) -> None:
        """The served net (:class:`_Predictor`) as the run's MLflow logged model (:mod:`workers.trial.logged_model`, ``created``),
        written by :mod:`workers.trial.export`: raw images in when ``served`` says what they are; its id goes on the run with the ending."""
        local = self.uploads.staging() / "model"
        contract = None if served is None else input_contract(served)
        logged = created.result()
        exporter().save(_Predictor(model).cpu().eval(), example, local, self.run_id, pip_requirements(), contract, logged.model_id)
        logged_model.upload(self.client, self.run_id, logged, local, self.uploads.destination, self.uploads.submit)
        self.model_id = logged.model_id

    def checkpoint_lost(self, why: str) -> None:
        """The checkpoint there was could not be read (the trial trains from epoch 1): said on the run with its batches."""
        self._lost_checkpoint = why

    def log_batches(self, plan: BatchPlan) -> None:
        """The batches the worker resolved (batch size, accumulation, effective LR), as tags: params are the API's, once."""
        if not self.may_write("the batches"):
            return
        tags = {
            TAG.BATCH_SIZE: str(plan.batch_size), TAG.ACCUMULATE_STEPS: str(plan.accumulate),
            TAG.EFFECTIVE_BATCH_SIZE: str(plan.effective), TAG.LR_EFFECTIVE: f"{plan.lr:.6g}",
            **({TAG.BATCH_PROBE: plan.note} if plan.note else {}),
            **({TAG.CHECKPOINT_LOST: self._lost_checkpoint[:5000]} if self._lost_checkpoint else {}),
        }
        starting, self._starting = self._starting, None
        if starting is None or self._created is not None:  # RUNNING already: the tags are all there is to send
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in {**(starting or {}), **tags}.items()])
        else:
            runs.start_run(self.client, self.run_id, {**starting, **tags}, first=False)  # STARTED_AT, when first, is in ``starting``
        if self.recorder is not None:
            self.recorder.running()  # system metrics from here: the run is RUNNING
        if starting is not None:
            self.publish(STATUS, {"status": "running", "attempt": int(starting.get(TAG.ATTEMPTS, "1"))})

    def log_confusion(self, matrix: list[list[int]], class_names: list[str]) -> None:
        """The final model's confusion matrix on the validation set, as a plot and as JSON."""
        if not self.may_write("the confusion matrix"):
            return
        names = class_names if len(class_names) == len(matrix) else [str(i) for i in range(len(matrix))]
        document = {"classes": names, "matrix": matrix, "rows": "true class", "columns": "predicted class"}
        self.uploads.text(json.dumps(document, indent=2), "confusion_matrix.json")
        self.uploads.text(confusion_svg(matrix, names), "plots/confusion_matrix.svg")

    def finish(self, ending: Ending) -> None:
        """Wait for the uploads, then end the run with its MLflow status and convtune's outcome and reason.

        Raises Superseded when this worker lost the lease (asked of its store), or the run carries a later
        holder's fence: that holder ends the run, once.
        """
        if self.recorder is not None:
            self.recorder.ending()  # the log's final version and the last system metrics, with the other uploads
        self.uploads.wait()
        if not self.may_write(f"the ending ({ending.outcome})") or self.superseded(f"the ending ({ending.outcome})"):
            raise Superseded(f"this worker lost the lease of run {self.run_id} before ending it ({ending.outcome})")
        tags, self._starting = self._starting or {}, None  # it ended before training began: its start tags go with the ending
        tags.update(self.usage_tags)
        if self.model_id is not None:
            tags[TAG.MODEL_ID] = self.model_id
        held, self._held = self._held, None
        if held is not None:
            tags[TAG.EPOCHS_DONE] = str(held[0])
        runs.end_run(
            self.client, self.run_id, ending.mlflow_status, ending.outcome, ending.reason, metrics=self.usage_metrics, tags=tags, logged=held[1] if held else (),
        )
        self.publish(ENDED, {"status": client_status(ending.mlflow_status, ending.outcome), "outcome": ending.outcome, "reason": ending.reason})


class _Predictor(nn.Module):
    """The trained net as it is served: logits, or probabilities for a sigmoid head."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.output_activation(self.net(x))  # (N, K)


def _summary_text(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    if rows:
        keys = list(rows[0])
        widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
        out.write("  ".join(k.ljust(w) for k, w in zip(keys, widths)) + "\n")
        for r in rows:
            out.write("  ".join(str(r[k]).ljust(w) for k, w in zip(keys, widths)) + "\n")
    return out.getvalue()


# Celery's prefork pool forks replacement training processes from the worker's main process, whose
# reconciler uploads a finished study's files through Uploads: a child must make its own threads.
os.register_at_fork(after_in_child=Uploads.forget_pool)
