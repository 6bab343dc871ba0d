"""One sweep of the reconciler: open runs against messages and leases; re-send or end what nothing carries."""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import optuna
import redis
from mlflow.tracking import MlflowClient

from models.compat.kombu_redis import UNACKED_INDEX_KEY, UNACKED_KEY
from models.logs import log_context
from models.messages import (
    QUEUES,
    TASK_DELIVER_CALLBACK,
    TASK_LR_FIND,
    TASK_RUN_TRIAL,
    TASK_STUDY_STEP,
    Message,
    RangeTestMessage,
    StudyStepMessage,
    TrialMessage,
    give_back,
)
from models.sealing import SealBroken
from models.spec.study import StudySpec
from models.store import fleet, runs
from models.store.budget import StudyBudget
from models.store.claims import open_claims
from models.store.runs import run_route
from models.store.share import Route, Share, waiting_lists, weights_of
from models.store.keys import (
    RECONCILER_COUNTS_KEY,
    RECONCILER_LOCK_KEY,
    RECONCILER_SUSPECTS_KEY,
    cancel_key,
    lease_key,
    resent_key,
    slot_lease_id,
)
from models.store.runs import KIND, TAG, TERMINAL_STATUSES
from models.store.search import USER_ATTR, open_storage, storage_kind
from models.store.teams import experiment_ids
from workers.callbacks.announce import announce_end
from workers.errors import WorkerError
from workers.reconciler.checkpoints import sweep_checkpoints
from workers.reconciler.judge import Held, Messages, Seen, Verdict, judge_run, judge_slot, parse_messages, run_status, unheld
from workers.reconciler.unserved import end_unserved
from workers.settings import WorkerSettings
from workers.study.report import finish_study
from workers.study.step import restore_counters
from workers.training.outcomes import Ending
from workers.trial.lease import renew_held

__all__ = ["Action", "Clients", "LockLost", "Reconciler", "SweepLock", "read_messages"]

log = logging.getLogger("workers.reconciler")
# The kind of work each task carries, as the actions are counted (``convtune_reconciler_actions_total{kind}``).
_TASK_KINDS = {TASK_RUN_TRIAL: KIND.TRIAL, TASK_LR_FIND: KIND.LR_FINDER, TASK_STUDY_STEP: KIND.STUDY, TASK_DELIVER_CALLBACK: "callback"}


class Action(NamedTuple):
    """One thing a sweep did: to which run, what, why."""

    kind: str
    action: str
    run_id: str
    why: str


class LockLost(WorkerError):
    """The sweep lock lapsed and another reconciler took it: this sweep stops where it is."""


class SweepLock:
    """One sweep at a time across hosts: SET NX PX with a token, renewed while sweeping, kept half an interval after.

    Every worker tries every 0.5-1 interval, so the fleet sweeps about once or twice an interval,
    however many workers there are.
    """

    def __init__(self, client: redis.Redis, interval_s: float):
        self.client = client
        self.hold_ms = max(1000, int(interval_s * 1000))
        self.token = uuid.uuid4().hex

    def acquire(self) -> bool:
        return bool(self.client.set(RECONCILER_LOCK_KEY, self.token, nx=True, px=self.hold_ms))

    def hold(self, fraction: float = 1.0) -> None:
        """Keep the lock ``fraction`` of an interval from now; LockLost if it lapsed and another took it."""
        if not renew_held(self.client, RECONCILER_LOCK_KEY, self.token, max(1, int(self.hold_ms * fraction))):
            raise LockLost("the sweep lock lapsed and another reconciler took it")


@dataclass
class Clients:
    """What the reconciler, and a study's report it may call, need of a worker runtime: no device, no CUDA."""

    settings: WorkerSettings
    mlflow: MlflowClient
    redis: redis.Redis


def read_messages(client: redis.Redis, now: float) -> Messages:
    """Every queue's waiting messages and the unacked ones, read in one transaction (one consistent view)."""
    pipe = client.pipeline(transaction=True)
    for name in waiting_lists(client, QUEUES):  # the device queues, and the teams' waiting queues
        pipe.lrange(name, 0, -1)
    pipe.hgetall(UNACKED_KEY)
    pipe.zrange(UNACKED_INDEX_KEY, 0, -1, withscores=True)
    *lists, unacked, index = pipe.execute()
    return parse_messages((item for items in lists for item in items), unacked, dict(index), now)


class Reconciler:
    """Sweeps the experiment's open runs against the queues and leases (see :mod:`workers.reconciler`)."""

    def __init__(self, clients: Clients, send_message: Callable[[Message, Route], None]):
        self.clients = clients
        self.settings = clients.settings
        self.send = send_message
        self.lock = SweepLock(clients.redis, self.settings.reconcile_interval_s)

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> Reconciler:
        """Its own clients (never the worker runtime's, which owns the device), sending with the workers' Celery app."""
        import mlflow

        from workers.celery_app import app

        # As the runtime does in the pool: a dead MLflow fails a sweep in seconds (the next one tries again), not minutes.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(settings.mlflow_max_retries))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(settings.mlflow_timeout_s))
        mlflow.set_tracking_uri(settings.mlflow_tracking_uri)  # a study's report registers its model with the fluent API
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=settings.broker_timeout_s, socket_connect_timeout=settings.broker_timeout_s)
        share = Share(client, app, enabled=settings.fair_share, weights=weights_of(settings.teams))
        return cls(Clients(settings, MlflowClient(settings.mlflow_tracking_uri), client), share.send)

    def run(self, stop: threading.Event) -> None:
        """Sweep whenever the lock is free, until ``stop`` is set; a failed sweep is logged and tried again."""
        interval = self.settings.reconcile_interval_s
        while not stop.wait(interval * random.uniform(0.5, 1.0)):
            try:
                if self.lock.acquire():
                    self.sweep()
            except LockLost as exc:
                log.warning("reconciler: sweep stopped: %s", exc)
            except Exception as exc:  # noqa: BLE001 - MLflow or Redis down: a later sweep tries again
                log.warning("reconciler: sweep failed (%s: %s); trying again in about %.0fs", type(exc).__name__, exc, interval)

    def sweep(self) -> list[Action]:
        """One pass over the open runs (the caller holds the lock); the actions taken."""
        sweep = _Sweep(self)
        sweep.run()
        return sweep.actions


class _Sweep:
    """One sweep: what it saw, the findings waiting out their grace, what it did."""

    def __init__(self, reconciler: Reconciler):
        self.r = reconciler
        self.settings = reconciler.settings
        self.redis = reconciler.clients.redis
        self.mlflow = reconciler.clients.mlflow
        self.grace_s = self.settings.reconcile_grace_s
        # Longer than any retry (or a check on a held lease) keeps a message unacked on a live worker.
        self.stale_s = self.grace_s + max(self.settings.retry_backoff_max_s, self.settings.lease_ttl_s)
        self.actions: list[Action] = []
        seconds, micros = self.redis.time()  # one clock for every host: Redis'
        self.now = seconds + micros / 1e6
        self.first_seen = {k.decode(): float(v) for k, v in self.redis.hgetall(RECONCILER_SUSPECTS_KEY).items()}
        self.seen_now: dict[str, float] = {}

    def run(self) -> None:
        # Every team's, as the API recorded them (new teams appear at any time); never one only named like a team's.
        teams = open_claims(self.settings.study_storage).team_experiments(self.settings.experiment)
        experiments = experiment_ids(self.mlflow, self.settings.experiment, teams.values())
        if not experiments:
            return  # nothing was ever accepted
        # Messages first, runs second: a run created after this read has no message in it, and waits out the grace.
        self.messages = self.read_messages()
        open_runs = self._open_runs(experiments)
        ended = end_unserved(self, open_runs)  # work on a queue that lost its last worker (workers.reconciler.unserved)
        open_runs = [run for run in open_runs if run.info.run_id not in ended]
        children: dict[str, list[Any]] = defaultdict(list)
        for run in open_runs:
            if run.data.tags.get(TAG.STUDY_ID) and run.data.tags.get(TAG.KIND) != KIND.STUDY:
                children[run.data.tags[TAG.STUDY_ID]].append(run)
        studies = set()
        for run in open_runs:
            kind, run_id = run.data.tags.get(TAG.KIND), run.info.run_id
            try:
                if kind == KIND.STUDY:
                    studies.add(run_id)
                    self.study(run, children.get(run_id, []))
                elif kind in (KIND.TRIAL, KIND.LR_FINDER) and not run.data.tags.get(TAG.STUDY_ID):
                    self.standalone(run)
            except LockLost:
                raise
            except Exception as exc:  # noqa: BLE001 - one run's trouble must not stop the sweep
                log.warning("reconciler: could not check %s %s (%s: %s)", kind, run_id, type(exc).__name__, exc)
        for study_id, kids in children.items():
            if study_id not in studies:  # the study has ended (or is another experiment's): what it left open ends too
                self.orphans(study_id, kids, parent_open=False, carried=set())
        self.checkpoints()
        self._save_first_seen()
        self.r.lock.hold(0.5)  # the next sweep, by any worker, in half an interval or more

    def checkpoints(self) -> None:
        """Delete the checkpoints (and killed writers' temp files) of runs that ended: endings elsewhere leave them."""
        try:
            sweep_checkpoints(self.settings.checkpoint_dir, self.mlflow, time.time(), min_age_s=max(60.0, 2 * self.settings.lease_ttl_s))
        except Exception as exc:  # noqa: BLE001 - checkpoints wait for the next sweep
            log.warning("reconciler: checkpoint sweep failed (%s: %s)", type(exc).__name__, exc)

    # --- a trial or range test of no study ---

    def standalone(self, run: Any) -> None:
        run_id, status, kind = run.info.run_id, run_status(run), run.data.tags[TAG.KIND]
        verdict = judge_run(status, self.seen(run_id, run_id), self.stale_s)
        if verdict is None or not self.stranded(f"{kind}:{run_id}", verdict) or not self.still(run_id, status, lease_key(run_id)):
            return
        payload = self.submitted(run)
        if verdict.action == "cancelled":
            self.end(run, "KILLED", "cancelled", "cancelled on request", verdict.why, action="cancelled")
        elif payload is None:
            self.end(run, "FAILED", "error", "its spec is not on its run, so it cannot be sent again", verdict.why, action="ended")
        else:
            message: Message = TrialMessage(trial_id=run_id, spec=payload) if kind == KIND.TRIAL else RangeTestMessage(run_id=run_id, spec=payload)
            self.resend(kind, run_id, message, run_route(run.data.tags), verdict.why)

    # --- a study ---

    def study(self, run: Any, kids: list[Any]) -> None:
        """Restore its counters, re-send its stranded slots, end its orphans, and top it up or finish it when idle."""
        study_id, status = run.info.run_id, run_status(run)
        ours = storage_kind(self.settings.study_storage)
        if run.data.tags.get(TAG.STUDY_STORAGE, ours) != ours:
            return  # kept in another kind of storage: the workers that share it reconcile it
        budget = StudyBudget(self.redis, study_id)
        route = run_route(run.data.tags)
        state = budget.state()
        if not state:
            verdict = Verdict("restored", "its slot counters are missing (Redis lost them): rebuilt from the Optuna storage, then topped up")
            loaded = self.stranded(f"study:{study_id}:counters", verdict) and self.load_study(study_id)
            if not loaded or not self.still(study_id, status):
                return

            def restore() -> None:
                if restore_counters(budget, *loaded):  # else a step rebuilt them first, and topped up itself
                    self._send_steps(study_id, budget.top_up().slots, route)

            self.act(KIND.STUDY, study_id, "restored", verdict.why, restore)
            state = budget.state()
            if not state:
                return
        in_flight = budget.in_flight(int(state["claimed"]))
        lr_lease = bool(self.redis.exists(lease_key(f"{study_id}-lr-auto")))
        lr_open = any(k.data.tags.get(TAG.KIND) == KIND.LR_FINDER and run_status(k) == "RUNNING" for k in kids)
        lr_auto = "held" if lr_lease else ("lost" if lr_open else None)
        open_status = {k.info.run_id: run_status(k) for k in kids}
        carried: set[str] = set()
        for slot in in_flight:
            record = budget.slot_record(slot)
            trial_id = record[0] if record else None
            trial_status = None
            if trial_id is not None:
                carried.add(trial_id)
                trial_status = open_status.get(trial_id) or run_status(self.mlflow.get_run(trial_id))
            step = StudyStepMessage(study_id=study_id, slot=slot)
            verdict = judge_slot(trial_status, self.slot_seen(study_id, slot, trial_id, step.task_id), lr_auto, self.grace_s, self.stale_s)
            if verdict is None or not self.stranded(f"study:{study_id}:slot:{slot}", verdict):
                continue
            if self.redis.exists(lease_key(slot_lease_id(study_id, slot))):
                continue  # a step took the slot since it was seen
            if trial_id is None:
                if budget.slot_record(slot) is not None or self._settled(budget, study_id, slot, route, carried):
                    continue
            elif not self.still(trial_id, trial_status, lease_key(trial_id)):
                continue
            self.resend(KIND.STUDY, study_id, step, route, f"slot {slot}: {verdict.why}")
        self.orphans(study_id, kids, parent_open=True, carried=carried)
        if not in_flight:
            self._idle(run, budget, state, route)

    def _settled(self, budget: StudyBudget, study_id: str, slot: int, route: Route, carried: set[str]) -> bool:
        """A slot with no record whose trial Optuna knows (counters rebuilt without it): settle it instead of starting another.

        A running trial is recorded for the slot (and counted in ``carried``): the re-sent step resumes it.
        An ended one has its slot released, as its step would have done. Whether the slot is settled.
        """
        loaded = self.load_study(study_id)
        if not loaded:
            return True  # not in this worker's storage: leave it
        stored, spec = loaded
        mine = [t for t in stored.get_trials(deepcopy=False) if t.user_attrs.get(USER_ATTR.SLOT) == slot and USER_ATTR.TRIAL_ID in t.user_attrs]
        if not mine:
            return False
        trial = mine[-1]
        if trial.state == optuna.trial.TrialState.RUNNING:
            budget.record_slot(slot, trial.user_attrs[USER_ATTR.TRIAL_ID], trial.number)
            carried.add(trial.user_attrs[USER_ATTR.TRIAL_ID])
            return False
        top = budget.top_up(release_slot=slot)
        why = f"slot {slot}: its trial #{trial.number} ended but the slot was never released"
        self.act(KIND.STUDY, study_id, "released", why, lambda: self._send_steps(study_id, top.slots, route))
        if top.idle and top.released:
            self._finish(study_id, stored, spec, budget.stopped(), "its last slot released, nothing left in flight")
        return True

    def _idle(self, run: Any, budget: StudyBudget, state: dict[str, str], route: Route) -> None:
        """Nothing in flight: send the slots the budget still allows, or end the study with its results."""
        study_id = run.info.run_id
        verdict = Verdict("finished", "nothing in flight and nothing carries it")
        loaded = self.stranded(f"study:{study_id}:idle", verdict) and self.load_study(study_id)
        if not loaded or not self.still(study_id, run_status(run)):
            return
        stored, spec = loaded
        stopped = state.get("stopped") or json.loads(stored.user_attrs.get(USER_ATTR.STOPPED, "{}") or "{}").get("why", "")
        left = int(state["budget"]) - int(state["claimed"])
        if not stopped and left > 0:
            top = budget.top_up()
            why = f"nothing in flight with {left} trials left to run: sent slots {top.slots}"
            if top.slots:
                self.act(KIND.STUDY, study_id, "topped_up", why, lambda: self._send_steps(study_id, top.slots, route))
            return
        self._finish(study_id, stored, spec, stopped, "nothing in flight and nothing left to start")

    def _send_steps(self, study_id: str, slots: list[int], route: Route) -> None:
        for slot in slots:  # one not sent stays in flight with no message: a later sweep re-sends it
            self.r.send(StudyStepMessage(study_id=study_id, slot=slot), route)

    def _finish(self, study_id: str, stored: optuna.Study, spec: StudySpec, stopped: str, why: str) -> None:
        def do() -> None:
            try:
                finish_study(study_id, self.r.clients, stored, spec, stopped)  # type: ignore[arg-type] - a runtime without a device
            except Exception as exc:  # noqa: BLE001 - never leave the parent open with nothing left to end it (as a step does)
                runs.end_run(self.mlflow, study_id, "FAILED", "error", f"the study ended but its results could not be recorded: {exc}")

        self.act(KIND.STUDY, study_id, "cancelled" if stopped == "cancelled" else "finished", why, do)

    def orphans(self, study_id: str, kids: list[Any], parent_open: bool, carried: set[str]) -> None:
        """End a study's open trials and range tests that no slot in flight (nor the lr_auto lease) carries."""
        lr_lease = bool(self.redis.exists(lease_key(f"{study_id}-lr-auto")))
        for run in kids:
            run_id, status, kind = run.info.run_id, run_status(run), run.data.tags.get(TAG.KIND, KIND.TRIAL)
            if run_id in carried or (lr_lease if kind == KIND.LR_FINDER else self.redis.exists(lease_key(run_id))):
                continue
            at_once = kind == KIND.LR_FINDER and status == "RUNNING"  # it runs inside the lr_auto lease, which lapsed
            why = "its study's lr_auto range test lost its worker" if at_once else (
                "no step of its study carries it" if parent_open else "its study has ended")
            verdict = Verdict("ended", why, after_grace=not at_once)
            if not self.stranded(f"{kind}:{run_id}:orphan", verdict) or not self.still(run_id, status):
                continue
            if self.redis.exists(cancel_key(run_id)) or (not parent_open and self.mlflow.get_run(study_id).info.status == "KILLED"):
                self.end(run, "KILLED", "cancelled", "cancelled with its study", why, action="cancelled")
            else:
                self.end(run, "FAILED", "worker_lost", "its worker was lost and nothing resumes it", why, action="ended")

    # --- seeing and acting ---

    def read_messages(self) -> Messages:
        """The queues and the unacked messages, after giving back to their queues those held by workers that died.

        Only once some worker beats (:mod:`models.store.fleet`): with no beat at all (workers that do
        not beat, or a Redis that lost everything) nothing can tell a live worker's message from a dead one's.
        """
        messages = read_messages(self.redis, self.now)
        if not messages.held or not fleet.live_workers(self.redis):
            return messages
        min_held_s = max(self.grace_s, fleet.BEAT_TTL_S + fleet.BEAT_S)  # longer than a beat lives, plus a beat of clock skew
        lost = unheld(messages, fleet.held_task_ids(self.redis), min_held_s)
        for held in lost:
            self._give_back(held)
        return read_messages(self.redis, self.now) if lost else messages

    def _give_back(self, held: Held) -> None:
        """Put one message no live worker holds back on its queue (at once: the next free worker takes it)."""
        raw = self.redis.hget(UNACKED_KEY, held.tag)
        if raw is None:
            return  # acked since it was read
        kind = _TASK_KINDS.get(held.task, "task")
        why = f"{held.task} message held unacked {held.held_s:.0f}s by a worker that no longer beats (it died): given back to its queue"
        self.act(kind, held.task_id, "requeued", why, lambda: give_back(self.redis, held.tag, raw))

    def slot_seen(self, study_id: str, slot: int, trial_id: str | None, task_id: str) -> Seen:
        """A study slot's view: its step message, and a lease carrying it, its trial's or its starting step's."""
        seen = self.seen(trial_id, task_id)
        return seen if seen.lease else seen._replace(lease=bool(self.redis.exists(lease_key(slot_lease_id(study_id, slot)))))

    def seen(self, run_id: str | None, task_id: str) -> Seen:
        """Redis' view of a run (its lease and cancel flag) and of a task's message."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.exists(lease_key(run_id) if run_id else "-")
        pipe.exists(cancel_key(run_id) if run_id else "-")
        pipe.exists(resent_key(task_id))
        lease, cancel, resent = (bool(v) for v in pipe.execute())
        return Seen(bool(run_id) and lease, bool(run_id) and cancel, task_id in self.messages.waiting, self.messages.held_for(task_id), resent)

    def resend(self, kind: str, run_id: str, message: Message, route: Route, why: str) -> None:
        """Send ``message`` again (on its team's waiting queue), and remember it for the grace (the copy on its way carries the work)."""

        def do() -> None:
            self.r.send(message, route)
            self.redis.set(resent_key(message.task_id), "1", ex=max(1, int(self.grace_s)))

        self.act(kind, run_id, "resent", why, do)

    def stranded(self, finding: str, verdict: Verdict) -> bool:
        """Note ``finding`` (kept while later sweeps see it too); whether to act now: at once, or seen so for the grace."""
        first = self.first_seen.get(finding, self.now)
        self.seen_now[finding] = first
        return not verdict.after_grace or self.now - first >= self.grace_s

    def still(self, run_id: str, status: str | None, lease: str | None = None) -> bool:
        """Read the run (and its lease) again right before acting: a worker may have taken or ended it since."""
        if lease is not None and self.redis.exists(lease):
            return False
        return run_status(self.mlflow.get_run(run_id)) == status

    def act(self, kind: str, run_id: str, action: str, why: str, do: Callable[[], Any]) -> None:
        """Do one action (the lock still held), log it as one line and count it."""
        self.r.lock.hold()
        do()
        with log_context(**({"study_id": run_id} if kind == KIND.STUDY else {"trial_id": run_id})):
            log.warning("reconciler: %s %s %s: %s", action, kind, run_id, why)
        self.redis.hincrby(RECONCILER_COUNTS_KEY, f"{kind}:{action}", 1)
        self.actions.append(Action(kind, action, run_id, why))

    def end(self, run: Any, status: str, outcome: str, reason: str, why: str, *, action: str) -> None:
        """End a run no worker will end (models.store.runs.end_run); a trial's end is counted and announced as a worker's is."""
        run_id, kind = run.info.run_id, run.data.tags.get(TAG.KIND, KIND.TRIAL)
        ending = Ending(status, outcome, f"{reason} (ended by the reconciler: {why})")

        def do() -> None:
            runs.end_run(self.mlflow, run_id, ending.mlflow_status, ending.outcome, ending.reason)
            if kind == KIND.TRIAL:
                callback = (self.submitted(run) or {}).get("callback_url")
                announce_end(run_id, ending, callback, self.r.clients)  # type: ignore[arg-type] - a runtime without a device

        self.act(kind, run_id, action, why, do)

    def submitted(self, run: Any) -> dict[str, Any] | None:
        """The run's spec as submitted, its sealed secrets (its callback) put back; None without a spec.

        Secrets this worker cannot open (no or another CONVTUNE_SECRET_KEY) are left out, and said.
        """
        tags = runs.with_spec(self.mlflow, run.info.run_id, run.data.tags)
        try:
            return runs.run_spec(tags, self.settings.sealer())
        except SealBroken as exc:
            log.error("reconciler: run %s: %s; it goes on without its callback", run.info.run_id, exc)
            return json.loads(tags[TAG.SPEC])

    def load_study(self, study_id: str) -> tuple[optuna.Study, StudySpec] | None:
        """The study from this worker's storage, with its spec; None (logged) when it is not there."""
        try:
            stored = optuna.load_study(study_name=study_id, storage=open_storage(self.settings.study_storage))
        except KeyError:
            log.warning("reconciler: study %s is not in this worker's %s storage; left alone", study_id, storage_kind(self.settings.study_storage))
            return None
        return stored, StudySpec.model_validate_json(stored.user_attrs[USER_ATTR.SPEC], context={"stored": True})

    # --- reading ---

    def _open_runs(self, experiments: list[str]) -> list[Any]:
        """The experiments' SCHEDULED and RUNNING runs (the tracking server takes no IN on statuses: not the ended ones)."""
        ended = " and ".join(f"attributes.status != '{status}'" for status in TERMINAL_STATUSES)
        found: list[Any] = []
        for i in range(0, len(experiments), 100):  # the tracking server takes at most 100 experiments a search
            token = None
            while True:
                page = self.mlflow.search_runs(experiments[i : i + 100], filter_string=ended, max_results=1000, page_token=token)
                found.extend(run for run in page if run.info.status in ("SCHEDULED", "RUNNING"))
                token = page.token
                if not token:
                    break
        return found

    def _save_first_seen(self) -> None:
        """Keep only the findings seen on this sweep: one that stopped being true starts its grace again."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(RECONCILER_SUSPECTS_KEY)
        if self.seen_now:
            pipe.hset(RECONCILER_SUSPECTS_KEY, mapping=self.seen_now)
            pipe.expire(RECONCILER_SUSPECTS_KEY, int(max(3600, 10 * self.grace_s)))
        pipe.execute()
