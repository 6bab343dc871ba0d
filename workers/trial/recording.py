"""What a delivery records beside its metrics: its own log lines, and the host's system metrics.

:func:`recording` runs around one delivery of a trial or range test, under its lease:

- **Its log** (:class:`RunLog`): a handler on the root logger keeps the lines logged for this run
  (those whose log context, :mod:`models.logs`, names its id; the tracker's upload threads carry
  the context of the code that queued them), warnings, errors and the traceback of a failure
  included, as text. The run gets it as the artifact ``logs/trial.log`` (a later attempt's as
  ``logs/trial.attempt-N.log``, so a retry keeps what the one before it wrote): a snapshot at an
  epoch's upload when lines came since the last one (at most one every ``SNAPSHOT_EVERY_S``, one
  in flight at a time, on the tracker's upload threads: never a request per line), and the final
  version as the run ends. It keeps at most ``max_bytes``: past that, the first half and the
  latest lines, with a note of how many were left out between them.
- **System metrics** (:class:`SystemMetrics`): MLflow's own monitor (``system/cpu_utilization_percentage``,
  memory, disk, network, and GPU where ``nvidia-ml-py`` is installed) sampling every
  ``interval_s``, where ``psutil`` is installed. It starts only once the run is RUNNING (the monitor
  stops at a run in any other status) and the delivery has trained for one interval: a shorter trial
  would get no sample, and pays nothing (no thread, no request).
"""

from __future__ import annotations

import collections
import importlib.util
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, wait
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from models.logs import current_ids, log_context

if TYPE_CHECKING:
    from workers.trial.tracking import MlflowTracker

__all__ = ["LOG_ARTIFACT", "Recorder", "RunLog", "SystemMetrics", "log_artifact", "recording"]

log = logging.getLogger(__name__)
LOG_ARTIFACT = "logs/trial.log"
SNAPSHOT_EVERY_S = 5.0
# MLflow's monitor says at INFO when it starts and stops, once per trial: only its warnings are worth a line.
_QUIET_LOGGERS = ("mlflow.system_metrics",)


def log_artifact(attempt: int) -> str:
    """The artifact that holds attempt ``attempt``'s log: ``logs/trial.log`` for the first."""
    return LOG_ARTIFACT if attempt <= 1 else f"logs/trial.attempt-{attempt}.log"


class RunLog(logging.Handler):
    """The log lines of one run, kept as text within ``max_bytes`` (see the module's doc)."""

    def __init__(self, run_id: str, max_bytes: int = 1 << 20, level: int = logging.INFO):
        super().__init__(level)
        self.run_id = run_id
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self._head: list[str] = []
        self._head_bytes = 0
        self._tail: collections.deque[str] = collections.deque()
        self._tail_bytes = 0
        self._budget = max(max_bytes // 2, 1)
        self.left_out = 0  # lines dropped between the head and the tail
        self.version = 0  # lines taken so far: a snapshot is due when it moved

    def note(self, message: str) -> None:
        """A line of the recorder's own (the log's header), kept as a record of this run would be."""
        record = logging.LogRecord("convtune.run", logging.INFO, __file__, 0, message, None, None)
        with self.lock:  # type: ignore[union-attr]
            self.emit(record)

    def filter(self, record: logging.LogRecord) -> bool:  # type: ignore[override]
        if record.name.startswith(_QUIET_LOGGERS) and record.levelno < logging.WARNING:
            return False
        return (getattr(record, "trial_id", None) or current_ids().get("trial_id")) == self.run_id and super().filter(record)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is logging's own error to report
            self.handleError(record)
            return
        size = len(line.encode("utf-8", "replace"))
        self.version += 1
        if self._head_bytes + size <= self._budget and not self._tail:
            self._head.append(line)
            self._head_bytes += size
            return
        self._tail.append(line)
        self._tail_bytes += size
        while self._tail_bytes > self._budget and len(self._tail) > 1:
            self._tail_bytes -= len(self._tail.popleft().encode("utf-8", "replace"))
            self.left_out += 1

    def text(self) -> str:
        """Everything kept, in order; a note where lines were left out."""
        with self.lock:  # type: ignore[union-attr]
            middle = [f"... {self.left_out} lines left out here: the log passed its size limit ...\n"] if self.left_out else []
            return "".join([*self._head, *middle, *self._tail])


class SystemMetrics:
    """MLflow's ``SystemMetricsMonitor`` on one run, started after one interval of training (see the module's doc)."""

    def __init__(self, run_id: str, tracking_uri: str, interval_s: float, resume: bool = False):
        self.run_id, self.tracking_uri, self.interval_s, self.resume = run_id, tracking_uri, interval_s, resume
        self.monitor: Any = None
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self._stopped = False

    def start(self) -> None:
        """Start the monitor in ``interval_s`` (nothing when off, where psutil is missing, or when started or stopped already)."""
        if self._timer is not None or self._stopped or self.interval_s <= 0 or not system_metrics_available():
            return
        self._timer = threading.Timer(self.interval_s, self._begin)
        self._timer.daemon = True
        self._timer.start()

    def _begin(self) -> None:
        with self._lock:
            if self._stopped:
                return
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                for name in _QUIET_LOGGERS:
                    logging.getLogger(name).setLevel(logging.WARNING)
                monitor = SystemMetricsMonitor(
                    self.run_id, sampling_interval=self.interval_s, resume_logging=self.resume, tracking_uri=self.tracking_uri,
                )
                monitor.start()
            except Exception as exc:  # noqa: BLE001 - system metrics are a help, never a reason to fail a trial
                log.warning("run %s: system metrics not recorded: %s: %s", self.run_id, type(exc).__name__, exc)
                return
            self.monitor = monitor

    def stop(self) -> None:
        """Stop sampling; the monitor's last samples are sent before this returns (one request or two)."""
        with self._lock:
            self._stopped = True
            if self._timer is not None:
                self._timer.cancel()
            monitor, self.monitor = self.monitor, None
        if monitor is not None:
            monitor.finish()


_available: bool | None = None


def system_metrics_available() -> bool:
    """Whether MLflow's system metrics can be sampled here (``psutil`` installed); logged once per process when not."""
    global _available
    if _available is None:
        _available = importlib.util.find_spec("psutil") is not None
        if not _available:
            log.info("system metrics are off: psutil is not installed (pip install psutil, and nvidia-ml-py for GPUs)")
    return _available


class Recorder:
    """One delivery's log and system metrics, told by its tracker when epochs go out and when the run ends."""

    def __init__(self, tracker: MlflowTracker, attempt: int, interval_s: float, max_log_bytes: int):
        self.tracker = tracker
        self.artifact = log_artifact(attempt)
        self.log = RunLog(tracker.run_id, max_log_bytes)
        self.log.note(f"run {tracker.run_id}, attempt {attempt}: on host {socket.gethostname()}, process {os.getpid()}")
        self.metrics = SystemMetrics(tracker.run_id, tracker.client.tracking_uri, interval_s, resume=attempt > 1)
        # The header alone is not worth a snapshot, and the first comes one interval in: a short trial sends its log once, at its end.
        self._sent_version = self.log.version
        self._sent_at = time.monotonic()
        self._in_flight: Future | None = None
        self._ended = False

    def running(self) -> None:
        """The run is RUNNING and training begins: system metrics start one interval from now (MLflow's monitor samples RUNNING runs only)."""
        if not self._ended:
            self.metrics.start()

    def progress(self) -> None:
        """An epoch (or a range test's steps) went out: upload a snapshot of the log if one is due."""
        if self._ended or self.log.version == self._sent_version or time.monotonic() - self._sent_at < SNAPSHOT_EVERY_S:
            return
        if self._in_flight is not None and not self._in_flight.done():
            return  # the one before is still on its way: these lines go with the next
        self._snapshot()

    def ending(self) -> None:
        """The run ends now: stop the system metrics and upload the log's final version (both on the upload threads)."""
        if self._ended:
            return
        self._ended = True
        if self.metrics.monitor is not None:
            self.tracker.uploads.submit(self.metrics.stop)
        else:
            self.metrics.stop()
        if self._in_flight is not None:
            wait([self._in_flight])  # in order: an earlier snapshot must not land over the final version
        if self.log.version and self.tracker.may_write("the log", strict=False):
            self._snapshot()

    def _snapshot(self) -> None:
        self._sent_version, self._sent_at = self.log.version, time.monotonic()
        uploads = self.tracker.uploads
        uploads.text(self.log.text(), self.artifact)
        self._in_flight = uploads.pending[-1]


@contextmanager
def recording(tracker: MlflowTracker, attempt: int, interval_s: float, max_log_bytes: int) -> Iterator[Recorder]:
    """Record the run's log and system metrics while the block runs (the delivery of attempt ``attempt``).

    Every line logged inside the block carries the run's id (``trial_id``), a study's trial's too.
    The tracker finishes the recording as it ends the run (:meth:`Recorder.ending`); leaving the
    block without an ending (Superseded, an infrastructure error) stops the system metrics and
    uploads nothing more.
    """
    recorder = Recorder(tracker, attempt, interval_s, max_log_bytes)
    root = logging.getLogger()
    root.addHandler(recorder.log)
    tracker.recorder = recorder
    try:
        with log_context(trial_id=tracker.run_id):
            yield recorder
    finally:
        tracker.recorder = None
        root.removeHandler(recorder.log)
        recorder._ended = True
        recorder.metrics.stop()
