"""A run's own log and its system metrics (workers.trial.recording), without MLflow: a local artifact store."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest

from models.logs import log_context
from workers.trial import recording as rec
from workers.trial.recording import LOG_ARTIFACT, Recorder, RunLog, SystemMetrics, log_artifact, recording
from workers.trial.tracking import Uploads

log = logging.getLogger("workers.training.train")


@pytest.fixture(autouse=True)
def info_level():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)
    yield
    root.setLevel(level)


def tracker(tmp_path: Path, run_id: str = "run1") -> Any:
    """What the recorder uses of a tracker: its id, client, uploads (into a local folder) and lease check."""
    uploads = Uploads(SimpleNamespace(tracking_uri="http://127.0.0.1:1"), run_id)  # type: ignore[arg-type]
    uploads.artifact_uri = (tmp_path / "artifacts").as_uri()
    return SimpleNamespace(run_id=run_id, client=uploads.client, uploads=uploads, recorder=None, may_write=lambda what, strict=True: True)


def test_the_log_keeps_only_its_runs_lines(tmp_path: Path):
    handler = RunLog("run1")
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with log_context(trial_id="run1"):
            log.warning("mine")
        with log_context(trial_id="run2"):
            log.warning("another trial's")
        log.warning("no trial's")
        log.warning("said for it", extra={"trial_id": "run1"})
        logging.getLogger("mlflow.system_metrics.system_metrics_monitor").info("Started monitoring", extra={"trial_id": "run1"})
    finally:
        root.removeHandler(handler)
    text = handler.text()
    assert "WARNING workers.training.train: mine" in text and "said for it" in text
    assert "another trial's" not in text and "no trial's" not in text and "Started monitoring" not in text


def test_a_long_log_keeps_its_start_and_its_end_within_the_limit():
    handler = RunLog("run1", max_bytes=4096)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with log_context(trial_id="run1"):
            for i in range(500):
                log.warning("line %d", i)
            try:
                raise RuntimeError("the end")
            except RuntimeError:
                log.exception("trial failed")
    finally:
        root.removeHandler(handler)
    text = handler.text()
    assert len(text.encode()) <= 4096 + 200
    assert "line 0\n" in text and "lines left out here" in text and "line 250\n" not in text
    assert "Traceback (most recent call last)" in text and "RuntimeError: the end" in text  # the failure is at the end: kept


def test_snapshots_go_as_the_trial_goes_and_the_final_version_at_its_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(rec, "SNAPSHOT_EVERY_S", 0.0)
    t = tracker(tmp_path)
    stored = tmp_path / "artifacts" / LOG_ARTIFACT
    with recording(t, attempt=1, interval_s=0, max_log_bytes=1 << 20) as recorder:
        assert t.recorder is recorder
        recorder.progress()  # nothing logged yet: nothing sent
        assert not t.uploads.pending
        log.warning("epoch 1 was slow")
        recorder.progress()
        t.uploads.pending[-1].result()
        assert "epoch 1 was slow" in stored.read_text()
        recorder.progress()  # nothing new
        assert len(t.uploads.pending) == 1
        log.error("it failed")
        recorder.ending()
        t.uploads.wait()
    assert t.recorder is None
    assert stored.read_text().splitlines()[-1].endswith("ERROR workers.training.train: it failed")
    log.warning("after the end")  # the handler is gone with the block
    assert "after the end" not in recorder.log.text()


def test_snapshots_wait_their_interval(tmp_path: Path):
    t = tracker(tmp_path)
    with recording(t, attempt=2, interval_s=0, max_log_bytes=1 << 20) as recorder:
        recorder._sent_at = time.monotonic()  # one went out a moment ago
        log.warning("soon")
        recorder.progress()
        assert not t.uploads.pending
        recorder.ending()
        t.uploads.wait()
    assert "soon" in (tmp_path / "artifacts" / "logs/trial.attempt-2.log").read_text()
    assert log_artifact(1) == LOG_ARTIFACT


class FakeMonitor:
    made: ClassVar[list[FakeMonitor]] = []

    def __init__(self, run_id: str, sampling_interval: float, resume_logging: bool, tracking_uri: str):
        self.run_id, self.interval, self.resume, self.uri = run_id, sampling_interval, resume_logging, tracking_uri
        self.started = self.finished = False
        FakeMonitor.made.append(self)

    def start(self) -> None:
        self.started = True

    def finish(self) -> None:
        self.finished = True


@pytest.fixture()
def fake_monitor(monkeypatch: pytest.MonkeyPatch) -> type[FakeMonitor]:
    import mlflow.system_metrics.system_metrics_monitor as module

    FakeMonitor.made = []
    monkeypatch.setattr(module, "SystemMetricsMonitor", FakeMonitor)
    monkeypatch.setattr(rec, "system_metrics_available", lambda: True)
    return FakeMonitor


def test_system_metrics_start_only_after_one_interval_of_training(fake_monitor):
    short = SystemMetrics("run1", "http://mlflow", interval_s=5.0)
    short.start()
    short.stop()  # a trial shorter than one interval: no monitor, and its timer ends at once
    short._timer.join(1)
    assert fake_monitor.made == [] and not short._timer.is_alive()

    long = SystemMetrics("run2", "http://mlflow", interval_s=0.05, resume=True)
    long.start()
    deadline = time.monotonic() + 5
    while long.monitor is None and time.monotonic() < deadline:
        time.sleep(0.01)
    (monitor,) = fake_monitor.made
    assert monitor.started and (monitor.run_id, monitor.interval, monitor.resume, monitor.uri) == ("run2", 0.05, True, "http://mlflow")
    long.stop()
    assert monitor.finished and long.monitor is None


def test_system_metrics_are_off_at_zero(fake_monitor):
    off = SystemMetrics("run1", "http://mlflow", interval_s=0)
    off.start()
    assert off._timer is None
    off.stop()


def test_the_ending_stops_the_monitor_on_the_upload_threads(tmp_path: Path, fake_monitor):
    t = tracker(tmp_path)
    recorder = Recorder(t, attempt=1, interval_s=0.01, max_log_bytes=1 << 20)
    recorder.metrics.start()
    deadline = time.monotonic() + 5
    while recorder.metrics.monitor is None and time.monotonic() < deadline:
        time.sleep(0.01)
    recorder.ending()
    t.uploads.wait()
    assert fake_monitor.made[0].finished
