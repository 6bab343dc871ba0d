"""Load: 300 POST /trials from 16 concurrent clients against the real API under gunicorn (``convtune api``,
two processes), the session's Redis and mlflow server, and a real Celery CPU worker.

What it holds the service to: every answer is a 202, a 429 or a 503 (no other 5xx, no client
timeout), and every trial that got a 202 ends (a terminal status) within ``END_BOUND_S`` of the end
of the burst. It prints the accept rate and the end-to-end time.

Each client has its own token, as separate CI jobs would, with the product's default rate limits
(600/minute, 60 POSTs/minute per token: 16 clients posting ~19 each stay under them) and a queued
quota of ``QUEUED_CAP`` per token, so the burst also meets 429s and the worker's backlog stays
bounded. The API and the worker use their own Redis database: the session's worker, if a test
started it, cannot take these trials. The worker runs with ``CONVTUNE_LOG_MODEL=false``: logging a
model costs more than training the tiny trial, and this test measures the service, not MLflow's
model packaging.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
import redis
from mlflow.tracking import MlflowClient

from models.store.runs import TAG, TERMINAL_STATUSES
from service.api.auth import hash_token
from tests.conftest import Service, free_port, start_worker, wait_for
from tests.helpers import experiments_named, tiny_trial

pytestmark = pytest.mark.integration

REQUESTS = 300
CLIENTS = 16
QUEUED_CAP = 3  # per token: at most 16 x 3 trials wait at once
CLIENT_TIMEOUT_S = 30.0  # a request the API has not answered by then is a failure ("never a timeout")
END_BOUND_S = 240.0  # every accepted trial ends within this long after the burst's last answer: <=~60 trials at 1-2.5 s each here, x2 for a busy host
LOAD_REDIS_DB = 14
CLI = [sys.executable, "-c", "from service.cli.main import main; main()"]
TOKENS = [f"ct_load_{i}_{uuid.uuid4().hex}" for i in range(CLIENTS)]


@pytest.fixture(scope="module")
def load_redis_url(redis_url: str) -> str:
    url = redis_url.rsplit("/", 1)[0] + f"/{LOAD_REDIS_DB}"
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture(scope="module")
def load_experiment() -> str:
    return f"load-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def load_worker(load_redis_url: str, worker_env: dict[str, str], load_experiment: str) -> Iterator[Service]:
    """A CPU worker on this test's Redis database, whose reconciler sweeps this test's experiment (and no other)."""
    env = {**worker_env, "CONVTUNE_REDIS_URL": load_redis_url, "CONVTUNE_EXPERIMENT": load_experiment, "CONVTUNE_LOG_MODEL": "false"}
    w = start_worker("load-worker", env)
    yield w
    w.stop()


@pytest.fixture(scope="module")
def api_url(load_redis_url: str, mlflow_uri: str, worker_env: dict[str, str], load_experiment: str) -> Iterator[str]:
    """``convtune api``: gunicorn with two processes, auth on, one token per client, default rate limits."""
    port = free_port()
    tokens = [{"name": f"load-{i}", "sha256": hash_token(t), "scopes": ["read", "submit"]} for i, t in enumerate(TOKENS)]
    env = {
        "CONVTUNE_REDIS_URL": load_redis_url, "CONVTUNE_MLFLOW_TRACKING_URI": mlflow_uri, "CONVTUNE_DEFAULT_QUEUE": "cpu",
        "CONVTUNE_EXPERIMENT": load_experiment, "CONVTUNE_AUTH_TOKENS": json.dumps(tokens),
        "CONVTUNE_STUDY_STORAGE": worker_env["CONVTUNE_STUDY_STORAGE"], "CONVTUNE_MAX_QUEUED_TRIALS_PER_TOKEN": str(QUEUED_CAP),
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    server = Service("load-api", [*CLI, "api", "--bind", f"127.0.0.1:{port}", "--workers", "2"], env)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    if not wait_for(lambda: ready() or not server.alive(), 90) or not server.alive():
        server.stop()
        pytest.fail(f"convtune api did not start:\n{server.log()[-3000:]}")
    yield url
    server.stop()


def test_300_posts_from_16_clients_answer_202_429_or_503_and_every_202_ends(api_url, load_worker, mlflow_uri, load_experiment):
    spec = tiny_trial(optim={"epochs": 1})
    todo = iter(range(REQUESTS))
    lock = threading.Lock()
    answers: list[tuple[int, float, str | None]] = []  # (status, seconds, trial id); status 0: no answer
    failures: list[str] = []

    def client(token: str) -> None:
        with httpx.Client(base_url=api_url, timeout=CLIENT_TIMEOUT_S, headers={"Authorization": f"Bearer {token}"}) as http:
            while True:
                with lock:
                    if next(todo, None) is None:
                        return
                t0 = time.perf_counter()
                try:
                    response = http.post("/trials", json=spec)
                except httpx.HTTPError as exc:  # a timeout or a dropped connection: never acceptable
                    with lock:
                        answers.append((0, time.perf_counter() - t0, None))
                        failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                trial_id = response.json()["id"] if response.status_code == 202 else None
                with lock:
                    answers.append((response.status_code, time.perf_counter() - t0, trial_id))
                    if response.status_code not in (202, 429, 503):
                        failures.append(f"{response.status_code}: {response.text[:300]}")

    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(t,), daemon=True) for t in TOKENS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=REQUESTS * CLIENT_TIMEOUT_S)
    burst_s = time.monotonic() - started

    statuses = Counter(status for status, _, _ in answers)
    accepted = [trial_id for status, _, trial_id in answers if status == 202]

    def latency(of: set[int]) -> str:
        times = sorted(seconds for status, seconds, _ in answers if status in of)
        return f"p50 {times[len(times) // 2]:.3f}s p99 {times[int(len(times) * 0.99)]:.3f}s max {times[-1]:.3f}s" if times else "-"

    print(
        f"\nload: {len(answers)} POST /trials from {CLIENTS} clients in {burst_s:.1f}s = {len(answers) / burst_s:.1f} answers/s, "
        f"{len(accepted) / burst_s:.1f} accepted/s; statuses {dict(sorted(statuses.items()))}; latency: all {latency(set(statuses))}, "
        f"202 {latency({202})}, 429 {latency({429})}"
    )
    assert len(answers) == REQUESTS and not any(t.is_alive() for t in threads)
    assert not failures, f"{len(failures)} answers other than 202/429/503 or none at all: {failures[:5]}"
    assert accepted, "nothing was accepted"
    assert len(set(accepted)) == len(accepted)

    mlflow = MlflowClient(mlflow_uri)
    experiments = experiments_named(mlflow, load_experiment)  # each token is a team of its own: an experiment each

    def runs() -> dict[str, object]:
        found, token = {}, None
        while True:
            page = mlflow.search_runs(experiments, max_results=1000, page_token=token)
            found.update({run.info.run_id: run for run in page})
            token = page.token
            if not token:
                return found

    def all_ended() -> bool:
        by_id = runs()
        return all(by_id[t].info.status in TERMINAL_STATUSES for t in accepted)

    ended = wait_for(all_ended, END_BOUND_S, interval_s=2)
    end_to_end_s = time.monotonic() - started
    by_id = runs()
    outcomes = Counter(by_id[t].info.status for t in accepted)
    latency_s = sorted((by_id[t].info.end_time - by_id[t].info.start_time) / 1000 for t in accepted if by_id[t].info.end_time)
    print(
        f"load: {len(accepted)} accepted trials ended {dict(outcomes)}; end to end {end_to_end_s:.1f}s from the first POST "
        f"({end_to_end_s - burst_s:.1f}s after the last answer); accept-to-end per trial max {latency_s[-1] if latency_s else float('nan'):.1f}s"
    )
    assert ended, f"not ended {END_BOUND_S:.0f}s after the burst: {dict(outcomes)}"
    # A run the client never heard of (created, then its message refused: a 503) was ended at once, not left queued.
    stray = {t: run.info.status for t, run in by_id.items() if t not in set(accepted)}
    assert all(status == "FAILED" for status in stray.values()), stray
    not_succeeded = {t: by_id[t].data.tags.get(TAG.REASON) for t in accepted if by_id[t].info.status != "FINISHED"}
    assert not not_succeeded, f"accepted tiny trials that did not succeed: {list(not_succeeded.items())[:5]}"
