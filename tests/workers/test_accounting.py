"""What a delivery used (workers.trial.accounting): samples and FLOPs counted by the loops, the meter, the usage row."""

from __future__ import annotations

from types import SimpleNamespace

import redis
import torch

from models.data.sets import describe
from models.spec.plan import plan_network
from models.spec.trial import TrialSpec
from models.spec.tuning import LrRangeSpec
from models.store.runs import TAG
from models.store.usage import open_usage, throughputs
from tests.workers.trackers import ListTracker
from workers.training.outcomes import Cancelled
from workers.training.range_test import range_test
from workers.training.train import TrainingContext, run_trial
from workers.trial.accounting import Meter, device_kind, record_usage, study_trial_kind

CPU = torch.device("cpu")
TRAIN = 1797 - round(0.2 * 1797)  # digits' training share


def spec(**optim) -> TrialSpec:
    return TrialSpec.model_validate({"model": {"channels": [8, 16], "convs_per_stage": 1}, "optim": {"lr": 3e-3, "epochs": 2, "batch_size": 64, **optim}})


def test_a_trial_counts_every_sample_it_trained_on_and_its_forward_flops():
    s = spec()
    ctx = TrainingContext(device=CPU)
    run_trial(s, ListTracker(), ctx)
    assert ctx.samples.seen == 2 * TRAIN
    assert ctx.samples.flops_per_sample == plan_network(s.model, describe(s.data, None)).flops
    assert ctx.samples.train_flops == 3 * ctx.samples.flops_per_sample * 2 * TRAIN


def test_a_stopped_trial_counts_the_samples_it_trained_on_before_the_stop():
    calls = iter(range(10_000))
    ctx = TrainingContext(device=CPU, check_every_steps=2, should_cancel=lambda: next(calls) >= 1)
    try:
        run_trial(spec(epochs=3), ListTracker(), ctx)
    except Cancelled:
        pass
    assert 0 < ctx.samples.seen < TRAIN


def test_a_range_test_counts_its_steps_samples():
    ctx = TrainingContext(device=CPU)
    range_test(LrRangeSpec.model_validate({"trial": spec().model_dump(), "steps": 20}), ctx)
    assert 0 < ctx.samples.seen <= 20 * 64 and ctx.samples.flops_per_sample > 0


def test_the_meter_charges_wall_time_times_devices_cpu_time_and_flops_with_the_device_kind():
    ctx = TrainingContext(device=CPU)
    meter = Meter(CPU, 2, ctx.samples)
    ctx.samples.seen, ctx.samples.flops_per_sample = 100, 1000
    sum(i * i for i in range(200_000))  # some CPU time
    tracker = SimpleNamespace(usage_metrics={}, usage_tags={})
    meter.charge(tracker)
    assert tracker.usage_metrics["device_seconds"] > 0 and tracker.usage_metrics["cpu_seconds"] > 0
    assert tracker.usage_metrics["train_flops"] == 3 * 100 * 1000
    assert tracker.usage_tags == {TAG.DEVICE_KIND: "cpu"} and device_kind(CPU) == "cpu"


def test_a_study_trial_is_its_own_kind():
    assert study_trial_kind({TAG.KIND: "trial", TAG.STUDY_ID: "s"}) == "study_trial"
    assert study_trial_kind({TAG.KIND: "trial"}) == "trial"
    assert study_trial_kind({TAG.KIND: "lr_finder", TAG.STUDY_ID: "s"}) == "lr_finder"


def test_the_ended_run_is_recorded_once_and_moves_its_queues_throughput(tmp_path, redis_url):
    client = redis.Redis.from_url(redis_url)
    client.delete("convtune:usage:throughput", "convtune:usage:seconds")
    storage = str(tmp_path / "studies.journal")
    rt = SimpleNamespace(settings=SimpleNamespace(study_storage=storage), redis=client)
    tracker = SimpleNamespace(
        run_id="run-1", run_tags={TAG.KIND: "trial", TAG.TEAM: "vision", TAG.QUEUE: "cpu"},
        usage_metrics={"device_seconds": 2.0, "cpu_seconds": 1.5, "train_flops": 4e9}, usage_tags={TAG.DEVICE_KIND: "cpu"},
    )
    open_usage(storage).reserve("run-1", "vision", "trial", "cpu", estimate=30.0)
    record_usage(rt, tracker)
    record_usage(rt, tracker)  # a second ending of the same run (a redelivery): one row still
    row = open_usage(storage).get("run-1")
    assert (row["team"], row["device_seconds"], row["flops"], row["estimate"]) == ("vision", 2.0, 4e9, 30.0)
    assert row["ended_at"] is not None
    assert open_usage(storage).quota_use("vision").used_total == 2.0
    assert throughputs(client, ["cpu"])["cpu"][0] == 2e9


def test_a_failure_to_record_is_logged_and_never_raised(caplog):
    rt = SimpleNamespace(settings=SimpleNamespace(study_storage="postgresql://nobody@127.0.0.1:9/none"), redis=None)
    tracker = SimpleNamespace(run_id="run-2", run_tags={}, usage_metrics={}, usage_tags={})
    record_usage(rt, tracker)
    assert "its usage was not recorded" in caplog.text
