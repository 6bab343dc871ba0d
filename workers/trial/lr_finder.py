"""The learning-rate range test in a worker: train with a growing LR, record the loss, read the LRs off it.

:func:`workers.training.range_test.range_test` is the training (the rules live, torch-free, in :mod:`models.spec.tuning`);
:func:`execute_lr_find` is one delivery of a ``convtune.lr_find`` message, run like a trial's:
duplicate deliveries skipped through the MLflow run's status, a lease held while it runs (a
delivery that finds it held, say a dead process's, raises LeaseHeld and is retried once it could
lapse), starts capped at ``max_attempts`` (a redelivered test starts again from its first step),
one outcome at the end, and nothing written by a worker that lost the lease (Superseded: each
write asks the lease's store, and the ending checks the run's fence, as a trial's does). The
MLflow run gets the curve as metric series (``lr_finder.lr``, ``lr_finder.loss``,
``lr_finder.smoothed_loss`` at step = optimizer step), the two LRs as metrics and tags, the whole
result as ``lr_finder.json`` and ``plots/lr_range_test.svg``, the curve with both LRs marked
(:func:`workers.trial.figures.range_test_svg`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from mlflow.entities import Metric, RunTag

from models.data import data_root_for
from models.spec.space import FloatParam
from models.spec.study import StudySpec
from models.spec.tuning import LrRangeResult, LrRangeSpec, NoSuggestion, analyse_range, lr_search_range
from models.store import runs
from models.store.keys import cancel_key
from models.store.runs import KIND, TAG
from models.store.search import USER_ATTR
from workers.errors import WorkerError
from workers.failures import is_infrastructure
from workers.training.outcomes import Ending, Superseded, classify
from workers.training.range_test import Curve, range_test
from workers.training.train import TrainingContext
from workers.trial.accounting import Meter, record_usage
from workers.trial.execution import LeaseHeld, admit, count_attempt, fence_floor, forget_attempt, lost_too_often, tracker_for
from workers.trial.figures import range_test_svg
from workers.trial.lease import Lease
from workers.trial.provenance import provenance_tags
from workers.trial.recording import recording
from workers.trial.tracking import MlflowTracker

__all__ = ["LrAutoFailed", "execute_lr_find", "run_and_record", "with_lr_range"]

log = logging.getLogger(__name__)


def execute_lr_find(run_id: str, payload: dict, rt: Any) -> str:
    """Run one delivery of the range test ``run_id``; its outcome, or ``skipped`` for a duplicate.

    Raises LeaseHeld when another process holds its lease (a live one, or a dead one's until it
    lapses), Superseded when this worker lost the lease midway, and infrastructure errors.
    """
    tracker = tracker_for(rt, run_id, log_model=False)
    spec, ending = admit(tracker, run_id, payload, LrRangeSpec, rt, "range test")
    if spec is None:
        return ending.outcome if ending is not None else "skipped"
    lease = Lease(rt.redis, run_id, rt.settings.lease_ttl_s)
    if not lease.acquire(floor=fence_floor(tracker)):
        raise LeaseHeld(run_id, rt.settings.lease_ttl_s)
    with lease:
        tracker.hold(lease)
        attempt = count_attempt(rt, run_id)
        if attempt > rt.settings.max_attempts:
            return _end(tracker, lost_too_often(attempt, rt.settings.max_attempts), rt)
        try:
            with recording(tracker, attempt, rt.settings.system_metrics_interval_s, rt.settings.run_log_max_bytes):
                ctx = _context(rt, tracker.team, lambda: bool(rt.redis.exists(cancel_key(run_id))), lease.held)
                tracker.provenance = provenance_tags(spec.trial.data, ctx.data_root, rt.device)
                tracker.start(str(rt.device), attempt)  # a redelivered test starts again from its first step
                meter = Meter(ctx.device, 1, ctx.samples)
                ending, _ = run_and_record(spec, tracker, ctx)
                meter.charge(tracker)
                return _end(tracker, ending, rt)
        except Superseded as exc:
            log.warning("range test %s: %s; stopped without recording anything", run_id, exc.reason)
            raise
        except Exception as exc:
            if is_infrastructure(exc):
                forget_attempt(rt, run_id)
            raise


def _context(rt: Any, team: str | None, should_cancel: Callable[[], bool], still_owner: Callable[[], bool]) -> TrainingContext:
    """A range test's training context: ``team``'s data (the run's, or its study's), this worker's device and limits."""
    return TrainingContext(
        device=rt.device, data_root=data_root_for(rt.settings.data_root, team), check_every_steps=rt.settings.cancel_check_steps,
        should_cancel=should_cancel, still_owner=still_owner,
        cpu_memory_limit_bytes=rt.settings.cpu_memory_limit_mb * 2**20, gpu_memory_fraction=rt.settings.gpu_memory_fraction,
    )


def run_and_record(spec: LrRangeSpec, tracker: MlflowTracker, ctx: TrainingContext) -> tuple[Ending, LrRangeResult | None]:
    """Run the test, logging its curve as it goes and its result at the end; how it ended, and the result.

    Raises Superseded (the worker lost the test's lease) and infrastructure errors: neither is the test's ending.
    """
    try:
        curve, reason = range_test(spec, ctx, on_steps=lambda c, first: _log_steps(tracker, c, first))
        result = analyse_range(spec, curve.lrs, curve.losses, reason)
    except NoSuggestion as exc:
        return Ending("FAILED", "error", f"no suggestion: {exc}"), None
    except Superseded:
        raise
    except Exception as exc:
        if is_infrastructure(exc):
            raise
        ending = classify(exc)
        log.log(logging.ERROR if ending.outcome == "error" else logging.INFO, "range test %s ended %s: %s", tracker.run_id, ending.outcome, ending.reason, exc_info=ending.outcome == "error")
        return ending, None
    if not tracker.may_write("the result"):
        raise Superseded(f"this worker lost the lease of range test {tracker.run_id} at its end")
    _log_result(tracker, spec, result)
    summary = (
        f"suggested lr {result.suggested_lr:.3g}, largest stable lr {result.largest_stable_lr:.3g} "
        f"({result.steps_done} steps; {result.stop_reason})"
    )
    return Ending("FINISHED", "succeeded", summary), result


class LrAutoFailed(WorkerError):
    """A study's ``lr_auto`` range test gave no range; the message says why."""


def with_lr_range(study_id: str, spec: StudySpec, stored: Any, rt: Any, should_stop: Callable[[], bool]) -> StudySpec:
    """``spec`` with ``optim.lr`` searched log-uniformly in the range its ``lr_auto`` range test found.

    The first step of the study to get here runs the test (holding a lease), logs it as a child run
    of the study and stores the range in the Optuna study; every step then reads it from there. A
    step that finds the lease held raises LeaseHeld: its task is sent again later instead of
    blocking a worker while the test runs. Raises LrAutoFailed when the test ended without a range.
    """
    assert spec.lr_auto is not None, "only for studies with lr_auto"
    found = stored.user_attrs.get(USER_ATTR.LR_AUTO)
    if found is None:
        lease = Lease(rt.redis, f"{study_id}-lr-auto", rt.settings.lease_ttl_s)
        if not lease.acquire():
            raise LeaseHeld(f"{study_id} (its lr_auto range test)", retry_in_s=min(5, rt.settings.lease_ttl_s))
        with lease:
            # Read again (Study.user_attrs asks the storage): a step that held the lease before may have stored it.
            found = stored.user_attrs.get(USER_ATTR.LR_AUTO)
            if found is None:
                try:
                    found = _study_range_test(study_id, spec, rt, should_stop, lease)
                except Superseded as exc:  # another step runs the test now: read its result later
                    raise LeaseHeld(f"{study_id} (its lr_auto range test)", retry_in_s=min(5, rt.settings.lease_ttl_s)) from exc
                stored.set_user_attr(USER_ATTR.LR_AUTO, found)
    if "error" in found:
        raise LrAutoFailed(found["error"])
    lr = FloatParam(low=found["low"], high=found["high"], log=True)
    return spec.model_copy(update={"search_space": {"optim.lr": lr, **spec.search_space}})


def _study_range_test(study_id: str, spec: StudySpec, rt: Any, should_stop: Callable[[], bool], lease: Lease) -> dict[str, Any]:
    assert spec.lr_auto is not None
    test = LrRangeSpec(trial=spec.base, **spec.lr_auto.model_dump(exclude={"decades"}))
    parent = rt.mlflow.get_run(study_id)
    test_id = runs.create_run(
        rt.mlflow, parent.info.experiment_id, name="lr_auto: range test",
        # No secret in MLflow: the base's callback_url is dropped (the study's spec in the Optuna storage keeps it).
        tags={
            TAG.KIND: KIND.LR_FINDER, TAG.PARENT: study_id, TAG.STUDY_ID: study_id, **runs.spec_tags(test.model_dump(mode="json"), None),
            **{k: parent.data.tags[k] for k in (TAG.OWNER, TAG.TEAM) if k in parent.data.tags},  # the study's team's, like its trials
        },
    )
    tracker = tracker_for(rt, test_id, log_model=False)
    tracker.hold(lease)  # a run of its own: its fence is the study's lr_auto lease's
    ctx = _context(rt, parent.data.tags.get(TAG.TEAM), should_stop, lease.held)
    with recording(tracker, 1, rt.settings.system_metrics_interval_s, rt.settings.run_log_max_bytes):
        tracker.provenance = provenance_tags(test.trial.data, ctx.data_root, rt.device)
        tracker.start(str(rt.device), 1)
        tracker.run_tags = {TAG.KIND: KIND.LR_FINDER, TAG.STUDY_ID: study_id, **{k: v for k, v in parent.data.tags.items() if k in (TAG.TEAM, TAG.QUEUE)}}
        meter = Meter(ctx.device, 1, ctx.samples)
        ending, result = run_and_record(test, tracker, ctx)
        meter.charge(tracker)
        _end(tracker, ending, rt)
    if result is None:
        return {"error": f"lr_auto: its range test {test_id} ended {ending.outcome}: {ending.reason}", "test_id": test_id}
    low, high = lr_search_range(result.suggested_lr, result.largest_stable_lr, spec.lr_auto.decades)
    rt.mlflow.log_batch(study_id, tags=[RunTag(TAG.LR_AUTO_RANGE, f"[{low:.6g}, {high:.6g}]"), RunTag(TAG.LR_AUTO_TEST_ID, test_id)])
    log.info("study %s: lr_auto searches optim.lr in [%.3g, %.3g] (range test %s)", study_id, low, high, test_id)
    return {"low": low, "high": high, "suggested_lr": result.suggested_lr, "largest_stable_lr": result.largest_stable_lr, "test_id": test_id}


def _log_steps(tracker: MlflowTracker, curve: Curve, first: int) -> None:
    if not tracker.may_write(f"steps from {first + 1}"):
        return  # the next holder starts the test again and logs its own curve
    now = int(time.time() * 1000)
    metrics = []
    for step in range(first, len(curve.lrs)):
        for key, series in (("lr_finder.lr", curve.lrs), ("lr_finder.loss", curve.losses), ("lr_finder.smoothed_loss", curve.ema)):
            metrics.append(Metric(key, float(series[step]), now, step + 1))
    for i in range(0, len(metrics), 900):  # log_batch takes at most 1,000 metrics
        tracker.client.log_batch(tracker.run_id, metrics=metrics[i : i + 900], tags=[RunTag(TAG.STEPS_DONE, str(len(curve.lrs)))])
    if tracker.recorder is not None:
        tracker.recorder.progress()  # the log's lines so far, when a snapshot is due


def _log_result(tracker: MlflowTracker, spec: LrRangeSpec, result: LrRangeResult) -> None:
    now = int(time.time() * 1000)
    client, run_id = tracker.client, tracker.run_id
    client.log_batch(
        run_id,
        metrics=[Metric("suggested_lr", result.suggested_lr, now, 0), Metric("largest_stable_lr", result.largest_stable_lr, now, 0)],
        tags=[RunTag(TAG.SUGGESTED_LR, f"{result.suggested_lr:.6g}"), RunTag(TAG.LARGEST_STABLE_LR, f"{result.largest_stable_lr:.6g}")],
    )
    client.log_dict(run_id, result.model_dump(mode="json"), "lr_finder.json")
    client.log_text(run_id, range_test_svg(spec, result), "plots/lr_range_test.svg")


def _end(tracker: MlflowTracker, ending: Ending, rt: Any) -> str:
    tracker.finish(ending)
    record_usage(rt, tracker)  # the run's row in the usage table, closed with what it used
    return ending.outcome

