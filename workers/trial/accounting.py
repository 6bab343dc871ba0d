"""What a delivery used, measured where it trains and recorded twice when its run ends.

A :class:`Meter` runs around the training of a trial or range test: wall time on its devices times
their number (``device_seconds``), the CPU time of this process and of the rank processes it waited
for (``cpu_seconds``), and the training FLOPs of the samples it trained on (``train_flops``: forward
FLOPs per sample x samples x 3, for the backward pass). :meth:`Meter.charge` hands them to the
tracker, which sends them with the run's ending in the same request (metrics, and the tag
``convtune.device_kind``). :func:`record_usage` then writes the run's row in the service's usage
table (:mod:`models.store.usage`), closing the estimate the API opened at accept, and moves the
queue's measured throughput. Every ending a worker writes records a row, one that trained nothing
with zeros: the row closes all the same. A failure to record is logged and never fails the run.
"""

from __future__ import annotations

import logging
import os
import time
from functools import lru_cache

import torch

from models.store.runs import KIND, TAG
from models.store.usage import UsageRecord, note_throughput, open_usage
from workers.training.train import TrainedSamples
from workers.trial.tracking import MlflowTracker

__all__ = ["Meter", "device_kind", "record_usage", "study_trial_kind"]

log = logging.getLogger(__name__)


@lru_cache(maxsize=8)
def device_kind(device: torch.device) -> str:
    """What ``device`` is, for accounting: ``cpu``, or the CUDA device's name (``NVIDIA H100 80GB HBM3``)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


class Meter:
    """Measures one delivery's training (see the module's doc); started at construction."""

    def __init__(self, device: torch.device, devices: int, samples: TrainedSamples):
        self.device, self.devices, self.samples = device, devices, samples
        self._wall = time.perf_counter()
        self._cpu = _cpu_seconds()

    def charge(self, tracker: MlflowTracker) -> None:
        """Give ``tracker`` what was used until now, to send with the run's ending."""
        wall = time.perf_counter() - self._wall
        tracker.usage_metrics = {
            "device_seconds": wall * self.devices,
            "cpu_seconds": max(0.0, _cpu_seconds() - self._cpu),
            "train_flops": self.samples.train_flops,
        }
        tracker.usage_tags = {TAG.DEVICE_KIND: device_kind(self.device)}


def _cpu_seconds() -> float:
    """CPU time of this process (every thread) and of its children it waited for (a data-parallel trial's ranks)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def study_trial_kind(tags: dict[str, str]) -> str:
    """A run's kind in the usage table: ``trial``, ``lr_finder``, or ``study_trial`` (a trial of a study)."""
    kind = tags.get(TAG.KIND, KIND.TRIAL)
    return "study_trial" if kind == KIND.TRIAL and tags.get(TAG.STUDY_ID) else kind


def record_usage(rt, tracker: MlflowTracker) -> None:
    """Write the ended run's usage row and move its queue's throughput; a failure is logged, never raised."""
    tags, used = tracker.run_tags, tracker.usage_metrics
    queue = tags.get(TAG.QUEUE)
    record = UsageRecord(
        run_id=tracker.run_id, team=tags.get(TAG.TEAM), kind=study_trial_kind(tags), device_kind=tracker.usage_tags.get(TAG.DEVICE_KIND),
        queue=queue, study_id=tags.get(TAG.STUDY_ID), device_seconds=used.get("device_seconds", 0.0),
        cpu_seconds=used.get("cpu_seconds", 0.0), flops=used.get("train_flops", 0.0),
    )
    try:
        open_usage(rt.settings.study_storage).record(record)
    except Exception as exc:  # noqa: BLE001 - accounting never fails the run it accounts for
        log.warning("run %s: its usage was not recorded: %s: %s", tracker.run_id, type(exc).__name__, str(exc)[:300])
    if queue and record.device_seconds > 0:
        try:
            note_throughput(rt.redis, queue, record.flops, record.device_seconds)
        except Exception as exc:  # noqa: BLE001 - a moving average may miss a run
            log.warning("run %s: queue %s's throughput not moved: %s: %s", tracker.run_id, queue, type(exc).__name__, exc)
