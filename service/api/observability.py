"""``/metrics`` in Prometheus format and one JSON log line per request.

Request counts and latencies are prometheus-flask-exporter's default metrics, grouped by the URL
rule a request matched (``route="/trials/<trial_id>"``, never the raw path) and its status:
``convtune_http_request_duration_seconds{method,route,status}`` (a histogram; its ``_count`` is
the requests per route and status), ``convtune_http_request_total{method,status}`` and
``convtune_http_request_exceptions_total``. Scrapes of ``/metrics`` are not counted. Under
gunicorn (several processes) ``PROMETHEUS_MULTIPROC_DIR`` is set by ``service.api.gunicorn_conf``
before any worker imports prometheus_client, every process writes its samples there, and a scrape
of any process sums them all (``MultiProcessCollector``). Values that live outside the API are
read at scrape time by :class:`LiveCollector`: queue depth (Redis list lengths of the Celery
queues), trials by outcome (a Redis hash the workers increment), the reconciler's actions by kind
and action (a Redis hash it increments, :mod:`workers.reconciler`), workers per queue (Celery's
``inspect``, cached for a few seconds), whether a worker serves each queue (their heartbeats,
:mod:`models.store.fleet`: a queue unserved for ``unserved_queue_s`` refuses submits) and each
team's compute by device kind (the usage table, :mod:`models.store.usage`, cached for a few seconds):
``convtune_device_seconds_total``, ``convtune_cpu_seconds_total``, ``convtune_train_flops_total``.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import uuid
from typing import Any

import redis
from flask import Flask, Request, Response, current_app, g, request
from flask_openapi3 import APIBlueprint, Tag
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_flask_exporter import PrometheusMetrics

from models.logs import bind, clear, current_ids
from models.messages import CALLBACK_QUEUE, QUEUES, queue_lists
from models.store import fleet
from models.store.keys import OUTCOME_COUNTS_KEY, RECONCILER_COUNTS_KEY
from models.store.share import waiting_by_team
from models.store.usage import UsageTotal, open_usage
from service.api.auth import current_principal
from service.api.openapi import PUBLIC_ERRORS
from service.api.settings import ApiSettings

__all__ = ["bp", "init_app"]

log = logging.getLogger("convtune.access")
bp = APIBlueprint(
    "metrics", __name__, abp_tags=[Tag(name="operations", description="Probes and metrics; no token needed.")], abp_responses=PUBLIC_ERRORS,
)
WORKERS_CACHE_S = 15.0
USAGE_CACHE_S = 5.0
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{8,128}$")


class LiveCollector:
    """Reads the values that live outside the API when Prometheus scrapes."""

    def __init__(self, redis_client: redis.Redis, celery: Any, study_storage: str | None = None):
        self.redis = redis_client
        self.celery = celery
        self.study_storage = study_storage  # where the usage table is (None: no usage counters)
        self._workers: tuple[float, dict[str, int]] = (0.0, {})
        self._usage: tuple[float, list[UsageTotal]] = (-USAGE_CACHE_S, [])
        self._lock = threading.Lock()

    def collect(self):
        depth = GaugeMetricFamily("convtune_queue_depth", "Messages waiting for each queue's workers (its teams' waiting queues included).", labels=["queue"])
        team_depth = GaugeMetricFamily(
            "convtune_team_queue_depth", "Messages of each team waiting for a queue's workers (the fair share feeds them by weight).", labels=["queue", "team"],
        )
        outcomes = CounterMetricFamily("convtune_trials_ended", "Trials that ended, by outcome.", labels=["outcome"])
        reconciled = CounterMetricFamily(
            "convtune_reconciler_actions", "Stranded work the reconciler re-sent or ended, by kind of run and action.", labels=["kind", "action"],
        )
        served = GaugeMetricFamily(
            "convtune_queue_served", "1 while some worker's heartbeat named the queue recently (CONVTUNE_UNSERVED_QUEUE_S), else 0.", labels=["queue"],
        )
        try:
            pipe = self.redis.pipeline()
            lists = {queue: queue_lists(queue) for queue in (*QUEUES, CALLBACK_QUEUE)}
            for names in lists.values():
                for name in names:
                    pipe.llen(name)
            pipe.hgetall(OUTCOME_COUNTS_KEY)
            pipe.hgetall(RECONCILER_COUNTS_KEY)
            results = pipe.execute()
            at = 0
            waiting = waiting_by_team(self.redis, QUEUES)
            for queue, names in lists.items():
                depth.add_metric([queue], sum(results[at : at + len(names)]) + sum(waiting.get(queue, {}).values()))
                at += len(names)
            for queue, teams in waiting.items():
                for team, count in sorted(teams.items(), key=lambda item: item[0] or ""):
                    team_depth.add_metric([queue, team or ""], count)
            for outcome, count in sorted(results[-2].items()):
                outcomes.add_metric([outcome.decode()], int(count))
            for field, count in sorted(results[-1].items()):
                kind, _, action = field.decode().partition(":")
                reconciled.add_metric([kind, action], int(count))
            serving = fleet.served_queues(self.redis, QUEUES)
            for queue in QUEUES:
                served.add_metric([queue], 1 if queue in serving else 0)
        except redis.RedisError:
            pass  # an empty family: the scrape still answers, convtune_up says the rest
        yield depth
        yield team_depth
        yield outcomes
        yield reconciled
        yield served
        workers = GaugeMetricFamily("convtune_workers", "Celery workers consuming each queue (answering within 1 s).", labels=["queue"])
        for queue, count in sorted(self.workers().items()):
            workers.add_metric([queue], count)
        yield workers
        yield from self.usage_counters()

    def usage_counters(self):
        """Each team's device-seconds, CPU seconds and training FLOPs by device kind, since the usage table began."""
        families = [
            CounterMetricFamily("convtune_device_seconds", "Device-seconds of training (wall time x devices), by team and device kind.", labels=["team", "device_kind"]),
            CounterMetricFamily("convtune_cpu_seconds", "CPU seconds of training processes, by team and device kind.", labels=["team", "device_kind"]),
            CounterMetricFamily("convtune_train_flops", "Training FLOPs (forward x samples x 3), by team and device kind.", labels=["team", "device_kind"]),
        ]
        for total in self.usage():
            labels = [total.team or "", total.device_kind]
            for family, value in zip(families, (total.device_seconds, total.cpu_seconds, total.flops), strict=True):
                family.add_metric(labels, value)
        yield from families

    def usage(self) -> list[UsageTotal]:
        if self.study_storage is None:
            return []
        with self._lock:
            at, totals = self._usage
            if time.monotonic() - at < USAGE_CACHE_S:
                return totals
            try:
                totals = open_usage(self.study_storage).all_time()
            except Exception as exc:  # noqa: BLE001 - the table is unreachable: the last totals (counters never go back), and a log line
                log.warning("usage counters not read: %s: %s", type(exc).__name__, str(exc)[:200])
            self._usage = (time.monotonic(), totals)
            return totals

    def workers(self) -> dict[str, int]:
        with self._lock:
            at, counts = self._workers
            if time.monotonic() - at < WORKERS_CACHE_S:
                return counts
            counts = {q: 0 for q in (*QUEUES, CALLBACK_QUEUE)}
            try:
                replies = self.celery.control.inspect(timeout=1.0).active_queues() or {}
            except Exception:  # the broker is down: no worker can be reached either
                replies = {}
            for queues in replies.values():
                for queue in queues:
                    counts[queue["name"]] = counts.get(queue["name"], 0) + 1
            self._workers = (time.monotonic(), counts)
            return counts


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def route(req: Request) -> str:
    """The URL rule a request matched; the exporter names its label after this function."""
    return req.url_rule.rule if req.url_rule is not None else "<unmatched>"


class ApiMetrics:
    """The exporter's request metrics of this app, and the live values, scraped together."""

    def __init__(self, app: Flask, live: LiveCollector):
        # A registry per app: tests build several apps in one process. The exporter's own endpoint
        # is off (path=None): /metrics is a documented, public route of this module's blueprint.
        self.requests = PrometheusMetrics(
            app, path=None, registry=CollectorRegistry(), defaults_prefix="convtune", group_by=route, buckets=LATENCY_BUCKETS,
        )
        self.live = live

    def scrape(self) -> bytes:
        """Every process's request metrics (or this one's, outside gunicorn) and the live values, read now."""
        registry = CollectorRegistry()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # As the exporter's generate_metrics does: the files of every worker, this one's included.
            MultiProcessCollector(registry)
        else:
            registry.register(self.requests.registry)
        registry.register(self.live)
        return generate_latest(registry)


@bp.get("/metrics", responses={200: {"description": "Prometheus text exposition format.", "content": {"text/plain": {"schema": {"type": "string"}}}}})
@PrometheusMetrics.do_not_track()
def metrics():
    """Expose request counts and latency, queue depth, trials by outcome and workers per queue."""
    return Response(current_app.extensions["convtune.metrics"].scrape(), content_type=CONTENT_TYPE_LATEST)


def init_app(app: Flask, settings: ApiSettings, redis_client: redis.Redis, celery: Any) -> ApiMetrics:
    """Count and time every request (the exporter), log it as one line, and serve ``/metrics``."""
    api_metrics = ApiMetrics(app, LiveCollector(redis_client, celery, settings.study_storage))
    app.extensions["convtune.metrics"] = api_metrics

    def start() -> None:
        clear()
        g.started = time.perf_counter()
        # A caller's X-Request-ID (a short token) is kept, so its logs and ours can be joined.
        given = request.headers.get("X-Request-ID", "")
        g.request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        args = request.view_args or {}
        bind(request_id=g.request_id, trial_id=args.get("trial_id"), study_id=args.get("study_id"))

    def finish(response: Response) -> Response:
        elapsed = time.perf_counter() - g.get("started", time.perf_counter())
        response.headers["X-Request-ID"] = g.get("request_id", "")
        if request.endpoint != "metrics.metrics":
            log.info(
                "%s %s %s", request.method, request.path, response.status_code,
                extra={"method": request.method, "route": route(request), "status": response.status_code, "duration_ms": round(elapsed * 1000, 1),
                       "principal": current_principal().name, "remote_addr": request.remote_addr, **current_ids()},
            )
        return response

    def forget(_exc: BaseException | None) -> None:
        clear()  # lines logged between requests must not carry the last request's ids

    app.before_request(start)
    app.after_request(finish)
    app.teardown_request(forget)
    return api_metrics
