"""One worker process's settings, clients and device, built once (:func:`runtime`) and passed on."""

from __future__ import annotations

import gc
import logging
import os
import time
from functools import lru_cache
from pathlib import Path

import mlflow
import redis
import torch
from mlflow.tracking import MlflowClient

from workers.settings import WorkerSettings
from workers.training.threads import apply_threads, thread_policy

__all__ = ["WorkerRuntime", "runtime", "settle_heap"]

log = logging.getLogger(__name__)


class WorkerRuntime:
    """One worker process's settings, clients and device."""

    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        # MLflow's defaults (7 retries with backoff, 120 s a request) take minutes to notice a dead
        # server: fail in seconds instead, and let the task's retry policy (workers.failures) wait.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(settings.mlflow_max_retries))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(settings.mlflow_timeout_s))
        # Ending a run would otherwise read it back (one more request per run) to print its URL on stdout.
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        self.mlflow = MlflowClient(settings.mlflow_tracking_uri)
        # mlflow.register_model (a study's register_as) reads the process-wide tracking URI.
        mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
        self.redis = redis.Redis.from_url(settings.redis_url, socket_timeout=settings.broker_timeout_s, socket_connect_timeout=settings.broker_timeout_s)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # A worker owns the GPUs it sees; on a CPU host, the processes it may spawn for one trial.
        self.devices_owned = torch.cuda.device_count() if self.device.type == "cuda" else settings.cpu_devices
        self.threads = thread_policy(settings.host_training_processes, settings.torch_threads)

    def warm_up(self) -> None:
        """Take this process's share of the cores, then run a first optimizer step: it imports torch._dynamo (slow: docs/performance.md) once per process, not per trial."""
        t0 = time.perf_counter()
        apply_threads(self.threads)
        param = torch.nn.Parameter(torch.zeros(1, device=self.device))
        optimizer = torch.optim.AdamW([param])
        param.sum().backward()
        optimizer.step()
        gc.freeze()  # see settle_heap()
        log.info("worker warmed up on %s in %.2fs; %s", self.device, time.perf_counter() - t0, self.threads)

    def checkpoint_path(self, run_id: str) -> Path:
        """The base name of ``run_id``'s checkpoints: each holder of its lease writes a fenced file beside it
        (``workers.training.train.fenced_checkpoint``), and a delivery resumes from the highest fence's."""
        return self.settings.checkpoint_dir / f"{run_id}.pt"


@lru_cache(maxsize=1)
def runtime() -> WorkerRuntime:
    """This process's clients and device, built on first use."""
    return WorkerRuntime(WorkerSettings())


@lru_cache(maxsize=1)
def settle_heap() -> None:
    """After this process's first task (once): collect, then keep what is left out of every later collection.

    A worker's heap is mostly modules and caches that live as long as the process (torch, MLflow,
    Optuna; what the first trial imports and builds). Python's full collections walk all of it,
    a pause in the middle of whichever trial they hit (docs/performance.md, "The end of a study,
    and Python's collector"). Frozen (:func:`gc.freeze`) at warm-up
    and here, they walk only what later trials made. Collecting first keeps the first task's cyclic
    garbage from living on.
    """
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    log.info("worker settled after its first task: %d objects kept out of the collector (%.0f ms)", gc.get_freeze_count(), 1000 * (time.perf_counter() - t0))
