"""A trial's MLflow run, seen from the worker: status, one batched call per epoch, artifacts.

The API created the run (SCHEDULED, params and tags logged once). The worker never logs params
again (MLflow params are immutable); it moves the run to RUNNING, logs metrics with
``step=epoch`` in one ``log_batch`` per epoch, the model and plots at the end, and ends the run
with convtune's outcome and reason tags.

Once told who owns the run (``still_owner``, the lease's :meth:`~workers.trial.lease.Lease.held`),
it writes nothing for a worker that lost it: the next holder logs those epochs again. An epoch is
logged once across deliveries: a worker that died between logging an epoch and checkpointing it
leaves ``convtune.epochs_done`` ahead of the checkpoint, and the delivery that resumes trains that
epoch again without logging it twice.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient
from torch import nn

from models.store import runs
from models.store.runs import TAG
from workers.training.batching import BatchPlan
from workers.training.outcomes import Ending, Superseded

__all__ = ["MlflowTracker", "pip_requirements"]

log = logging.getLogger(__name__)


def pip_requirements() -> list[str]:
    """What the logged model needs to load; explicit, since inferring them costs seconds per trial."""
    import numpy

    return [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={numpy.__version__}"]


class MlflowTracker:
    """Logs one trial into its existing MLflow run."""

    def __init__(self, client: MlflowClient, run_id: str, log_model: bool = True):
        self.client = client
        self.run_id = run_id
        self.log_model_enabled = log_model
        # Whether this worker still holds the run (set once it takes the lease); writes are skipped once it does not.
        self.still_owner: Callable[[], bool] = lambda: True
        self.logged_through = 0  # the last epoch the run has, as :meth:`status` read it

    def _may_write(self, what: str) -> bool:
        if self.still_owner():
            return True
        log.warning("run %s: this worker lost its lease; %s not logged", self.run_id, what)
        return False

    def status(self) -> str:
        """The run's MLflow status (and, kept, the last epoch it has logged)."""
        run = self.client.get_run(self.run_id)
        self.logged_through = int(run.data.tags.get(TAG.EPOCHS_DONE, "0"))
        return run.info.status

    def tags(self) -> dict[str, str]:
        return dict(self.client.get_run(self.run_id).data.tags)

    def start(self, device: str, attempt: int) -> None:
        """Mark the run RUNNING on this worker."""
        runs.start_run(self.client, self.run_id, {TAG.DEVICE: device, TAG.ATTEMPTS: str(attempt)}, first=attempt == 1)

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        if not self._may_write(f"epoch {epoch}"):
            return
        if epoch <= self.logged_through:
            log.info("run %s: epoch %d was logged by an earlier delivery; not logged twice", self.run_id, epoch)
            return
        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, epoch) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch, tags=[RunTag(TAG.EPOCHS_DONE, str(epoch))])
        self.logged_through = epoch

    def log_summary(self, rows: list[dict[str, Any]]) -> None:
        """The model summary table: each layer, its output shape, parameters and FLOPs."""
        if not self._may_write("the model summary"):
            return
        self.client.log_table(self.run_id, data=_columns(rows), artifact_file="model_summary.json")
        self.client.log_text(self.run_id, _summary_text(rows), "model_summary.txt")

    def log_result(self, model: nn.Module, example: torch.Tensor, history: list[dict[str, float]]) -> None:
        """At the end of training: the learning curves and the trained model."""
        if not self._may_write("the results"):
            return
        self.client.log_figure(self.run_id, learning_curve(history), "plots/learning_curve.png")
        self.client.log_dict(self.run_id, history, "history.json")
        if self.log_model_enabled:
            self._log_model(model, example)

    def _log_model(self, model: nn.Module, example: torch.Tensor) -> None:
        import mlflow
        import mlflow.pytorch
        from mlflow.models import infer_signature

        predictor = _Predictor(model).cpu().eval()
        x = example.detach().cpu()
        with torch.no_grad():
            y = predictor(x)
        signature = infer_signature(x.numpy(), y.numpy())
        # The fluent API is the only way to log a model. Its context would end the run FINISHED while
        # the rest of the results are still being logged (clients would see 'succeeded' with no
        # outcome yet), so it is left RUNNING here and :meth:`finish` gives it its real ending.
        mlflow.start_run(run_id=self.run_id)
        try:
            mlflow.pytorch.log_model(predictor, name="model", signature=signature, input_example=x.numpy(), pip_requirements=pip_requirements())
        finally:
            mlflow.end_run(status="RUNNING")

    def log_batches(self, plan: BatchPlan) -> None:
        """The batches the worker resolved (batch size, accumulation, effective LR), as tags: params are the API's, once."""
        if not self._may_write("the batches"):
            return
        tags = {
            TAG.BATCH_SIZE: str(plan.batch_size), TAG.ACCUMULATE_STEPS: str(plan.accumulate),
            TAG.EFFECTIVE_BATCH_SIZE: str(plan.effective), TAG.LR_EFFECTIVE: f"{plan.lr:.6g}",
            **({TAG.BATCH_PROBE: plan.note} if plan.note else {}),
        }
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def log_confusion(self, matrix: list[list[int]], class_names: list[str]) -> None:
        """The final model's confusion matrix on the validation set, as a plot and as JSON."""
        if not self._may_write("the confusion matrix"):
            return
        names = class_names if len(class_names) == len(matrix) else [str(i) for i in range(len(matrix))]
        self.client.log_dict(self.run_id, {"classes": names, "matrix": matrix, "rows": "true class", "columns": "predicted class"}, "confusion_matrix.json")
        self.client.log_figure(self.run_id, confusion_figure(matrix, names), "plots/confusion_matrix.png")

    def finish(self, ending: Ending) -> None:
        """End the run with its MLflow status and convtune's outcome and reason; Superseded if this worker lost it."""
        if not self.still_owner():
            raise Superseded(f"this worker lost the lease of run {self.run_id} before ending it ({ending.outcome})")
        runs.end_run(self.client, self.run_id, ending.mlflow_status, ending.outcome, ending.reason)


class _Predictor(nn.Module):
    """The trained net as it is served: logits, or probabilities for a sigmoid head."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.output_activation(self.net(x))  # (N, K)


def learning_curve(history: list[dict[str, float]]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    epochs = list(range(1, len(history) + 1))
    fig = Figure(figsize=(9, 3.5))
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    loss_ax.plot(epochs, [h["val_loss"] for h in history], marker="o", label="validation")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="Loss")
    loss_ax.legend()
    acc_ax.plot(epochs, [h["val_accuracy"] for h in history], marker="o", color="tab:green")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="Validation accuracy", ylim=(0, 1))
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def confusion_figure(matrix: list[list[int]], names: list[str]) -> Any:
    """Counts of true (rows) against predicted (columns) classes, each cell annotated."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    k = len(matrix)
    side = min(12.0, 2.5 + 0.45 * k)
    fig = Figure(figsize=(side, side))
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set(xticks=range(k), yticks=range(k), xlabel="predicted class", ylabel="true class", title="Confusion matrix (validation)")
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_yticklabels(names)
    if k <= 30:
        top = max((max(row) for row in matrix), default=0)
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                ax.text(j, i, str(count), ha="center", va="center", fontsize=8, color="white" if count > top / 2 else "black")
    fig.tight_layout()
    return fig


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    keys = list(rows[0]) if rows else []
    return {k: [json.dumps(r[k]) if isinstance(r[k], (list, tuple)) else r[k] for r in rows] for k in keys}


def _summary_text(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    if rows:
        keys = list(rows[0])
        widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
        out.write("  ".join(k.ljust(w) for k, w in zip(keys, widths)) + "\n")
        for r in rows:
            out.write("  ".join(str(r[k]).ljust(w) for k, w in zip(keys, widths)) + "\n")
    return out.getvalue()
