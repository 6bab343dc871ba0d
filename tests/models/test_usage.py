"""The usage table (models.store.usage): open and ended rows, totals, quota use, estimates and the quota arithmetic."""

from __future__ import annotations

import time

import pytest
import redis

from models.spec.trial import TrialSpec
from models.store.usage import (
    DAY_S, QuotaUse, UsageRecord, UsageStore, check_quota, estimate_trial, note_throughput, samples_per_epoch, throughputs,
)


@pytest.fixture()
def store(tmp_path) -> UsageStore:
    return UsageStore(f"sqlite:///{tmp_path / 'usage.sqlite'}")


def spec(**overrides) -> TrialSpec:
    body = {"model": {"channels": [8, 16], "convs_per_stage": 1}, "optim": {"lr": 3e-3, "epochs": 4, "batch_size": 64}, "data": {"name": "digits"}}
    body.update(overrides)
    return TrialSpec.model_validate(body)


def test_a_reserved_run_is_open_until_its_worker_records_it_and_a_second_record_replaces_the_first(store):
    store.reserve("r1", "vision", "trial", "cpu", estimate=100.0)
    assert store.quota_use("vision").queued == 100.0
    store.record(UsageRecord("r1", "vision", "trial", "cpu", "cpu", device_seconds=10.0, cpu_seconds=8.0, flops=1e9))
    store.record(UsageRecord("r1", "vision", "trial", "cpu", "cpu", device_seconds=12.0, cpu_seconds=9.0, flops=2e9))  # a redelivery
    use = store.quota_use("vision")
    assert use.queued == 0.0 and use.used_total == 12.0
    row = store.get("r1")
    assert row["estimate"] == 100.0 and row["device_seconds"] == 12.0 and row["ended_at"] is not None


def test_a_reservation_after_the_end_record_leaves_the_ended_row(store):
    store.record(UsageRecord("r2", "vision", "trial", "cpu", "cpu", device_seconds=3.0))
    store.reserve("r2", "vision", "trial", "cpu", estimate=50.0)
    assert store.get("r2")["device_seconds"] == 3.0
    assert store.quota_use("vision").queued == 0.0


def test_totals_are_by_team_and_device_kind_within_the_span_and_a_team_sees_its_own(store):
    now = time.time()
    store.record(UsageRecord("a1", "a", "trial", "cpu", "cpu", device_seconds=1.0, cpu_seconds=2.0, flops=10.0, ended_at=now - 10))
    store.record(UsageRecord("a2", "a", "study_trial", "NVIDIA H100", "gpu", "s1", device_seconds=4.0, flops=40.0, ended_at=now - 5))
    store.record(UsageRecord("a3", "a", "trial", "cpu", "cpu", device_seconds=100.0, ended_at=now - 2 * DAY_S))  # outside
    store.record(UsageRecord("b1", "b", "trial", "cpu", "cpu", device_seconds=7.0, ended_at=now - 1))
    store.record(UsageRecord("n1", None, "trial", "cpu", "cpu", device_seconds=0.5, ended_at=now - 1))
    store.reserve("s1", "a", "study", "gpu", estimate=99.0)
    store.close("s1")  # a study's own row adds no use
    mine = store.totals(now - DAY_S, now, "a")
    assert [(t.team, t.device_kind, t.device_seconds, t.runs) for t in mine] == [("a", "NVIDIA H100", 4.0, 1), ("a", "cpu", 1.0, 1)]
    every = store.totals(now - DAY_S, now, every_team=True)
    assert {(t.team, t.device_kind): t.device_seconds for t in every} == {(None, "cpu"): 0.5, ("a", "NVIDIA H100"): 4.0, ("a", "cpu"): 1.0, ("b", "cpu"): 7.0}
    assert sum(t.device_seconds for t in store.all_time()) == 112.5
    assert store.study_totals("s1") == ({"device_seconds": 4.0, "cpu_seconds": 0.0, "train_flops": 40.0}, ["NVIDIA H100"])


def test_an_open_study_counts_its_estimate_less_what_its_trials_used(store):
    store.reserve("st", "a", "study", "cpu", estimate=100.0)
    store.record(UsageRecord("t1", "a", "study_trial", "cpu", "cpu", "st", device_seconds=30.0))
    use = store.quota_use("a")
    assert use.queued == 70.0 and use.used_total == 30.0
    assert store.open_runs("a") == ["st"]
    assert store.close("st") and not store.close("st")
    assert store.quota_use("a").queued == 0.0


def test_samples_per_epoch_of_the_built_in_sets():
    assert samples_per_epoch(spec()) == 1797 - round(0.2 * 1797)
    assert samples_per_epoch(spec(data={"name": "shapes", "num_samples": 1000, "val_fraction": 0.1})) == 900
    assert samples_per_epoch(spec(data={"name": "npz", "path": "x.npz"})) is None


def test_the_flops_estimate_is_training_flops_over_the_measured_throughput_and_falls_back_in_order():
    s = spec(time_limit_s=600, devices=1)
    seconds, how = estimate_trial(s, 1_000_000, 1e9)
    assert how == "flops" and seconds == pytest.approx(3 * 1e6 * samples_per_epoch(s) * 4 / 1e9)
    assert estimate_trial(s, 1_000_000, None) == (600.0, "time_limit")  # no throughput measured yet
    assert estimate_trial(s, 1_000_000, 1e9, how="time_limit") == (600.0, "time_limit")
    assert estimate_trial(spec(), 1_000_000, None, 42.0) == (42.0, "measured")
    assert estimate_trial(spec(), None, None) == (0.0, "unknown")


def test_within_both_quotas_is_no_refusal():
    use = QuotaUse(used=[(time.time() - 100, 50.0)], queued=20.0)
    assert check_quota(use, 10.0, device_seconds_per_day=100.0, queued_device_seconds=40.0) is None
    assert check_quota(use, 10.0, device_seconds_per_day=None, queued_device_seconds=None) is None


def test_over_the_queued_quota_names_it_and_waits_for_queued_work():
    refusal = check_quota(QuotaUse([], 30.0), 20.0, device_seconds_per_day=None, queued_device_seconds=40.0, now=1000.0)
    assert (refusal.quota, refusal.limit, refusal.used, refusal.estimate) == ("queued_device_seconds", 40.0, 30.0, 20.0)
    assert refusal.frees_at == 1060.0 and refusal.retry_after_s == 60


def test_over_the_daily_quota_frees_up_when_enough_use_leaves_the_window():
    now = 10 * DAY_S
    use = QuotaUse(used=[(now - 20 * 3600, 30.0), (now - 10 * 3600, 40.0), (now - 3600, 20.0)], queued=5.0)
    refusal = check_quota(use, 30.0, device_seconds_per_day=100.0, queued_device_seconds=None, now=now)
    # 30 + 40 + 20 + 5 + 30 = 125: 25 over; the oldest 30 leaves the window 4 h from now
    assert refusal.quota == "device_seconds_per_day" and refusal.used == 95.0
    assert refusal.frees_at == now - 20 * 3600 + DAY_S and refusal.retry_after_s == 4 * 3600


def test_a_submit_alone_over_a_limit_never_frees_up():
    refusal = check_quota(QuotaUse([], 0.0), 500.0, device_seconds_per_day=100.0, queued_device_seconds=None)
    assert refusal.frees_at is None
    assert check_quota(QuotaUse([], 0.0), 500.0, device_seconds_per_day=None, queued_device_seconds=100.0).frees_at is None


def test_throughput_is_a_moving_average_per_queue(redis_url):
    client = redis.Redis.from_url(redis_url)
    client.delete("convtune:usage:throughput", "convtune:usage:seconds")
    assert throughputs(client, ["cpu"]) == {"cpu": (None, None)}
    note_throughput(client, "cpu", flops=1e10, device_seconds=10.0)
    note_throughput(client, "cpu", flops=2e10, device_seconds=10.0)
    note_throughput(client, "cpu", flops=1e6, device_seconds=0.1)  # too short to measure throughput; still a trial's seconds
    rate, seconds = throughputs(client, ["cpu"])["cpu"]
    assert rate == pytest.approx(1e9 + 0.2 * 1e9)
    assert seconds == pytest.approx(10.0 + 0.2 * (0.1 - 10.0))
