"""Submitting trials: accepted trials/s and p50/p99 of ``POST /trials`` under 32 clients (issue 10).

Against the floor of the accept path, in the same run: the message alone, published with Celery's
``send_task`` (the project's own :func:`models.messages.send`, the API's last step, the same
``TrialMessage`` payload) on the same Redis from the same 32 client threads, to a queue no worker
consumes (``bench-nobody``, purged afterwards). Then ``POST /trials`` through ``convtune up
--cpu-workers 2`` (the CLI's own code path), in four cases:

  sqlite     the stack's own MLflow server (sqlite, one server worker), as ``convtune up`` starts it
  postgres   an ``mlflow server`` of this benchmark's own (--mlflow-workers server workers, 2 as the
             deploy image runs it; local artifacts) on a fresh database of the local Postgres
             (``postgresql+psycopg://postgres@127.0.0.1:5432/convtune_bench_<random>``, dropped at the
             end), which ``convtune up`` reuses (it reuses an MLflow that already answers on its
             --mlflow-port), as deployed (deploy/docker-compose.yml; without its basic-auth app)
  idle       nothing else runs on the stack
  training   a study (parallelism 2, long trials) keeps both workers training through the whole
             measurement: the POSTs start once two of its trials run in MLflow, and the table says
             how many still ran when the last POST was answered; cancelled afterwards

Each client is a thread with its own ``httpx.Client`` and its own API token (auth on, as deployed:
each token's rate limits and queued-trials quota are the service's defaults, which N requests over
32 tokens stay under), posting its share of N tiny valid specs (``channels [8, 16]``, one epoch,
digits) one after another; each request's latency is the client's clock around it. The trials go to
the queue the stack's workers do not serve (``gpu`` on a CPU host, ``cpu`` on a GPU one): accepted,
never trained. Before each case the queued trials of the previous one are ended (KILLED) and their
messages purged, so every case starts from an empty queue; each client sends one untimed warm-up
request first. accepts/s = 2xx answers / (first request sent -> last answer received); p50/p99 over
every timed request; non-2xx answers and transport errors are counted and shown, never dropped.
The CPU columns divide what the API (gunicorn) and the MLflow server processes spent while the
POSTs ran by the accepts (with workers training, the MLflow server's share includes their requests).
One private Redis (no persistence) for everything: db 0 for the baseline, db 1 and 2 for the two
stacks (so no message or rate-limit key of one stack reaches the other).

Targets (Postgres): idle accepts/s >= 0.25x the raw publish rate, idle p99 <= 100 ms, and >= 50
accepts/s with the workers training.

    python bench/submit.py [--quick] [--requests 600] [--clients 32] [--mlflow-workers 2]

``--quick``: 128 requests; sqlite idle, postgres idle and postgres training only. Needs Postgres
on 127.0.0.1:5432 (trust auth for ``postgres``) and psycopg 3.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    ROOT,
    Stack,
    Target,
    _http_ok,
    _kill,
    _tail,
    convtune_up,
    cpu_delta,
    emit,
    free_port,
    note,
    print_table,
    private_redis,
    process_cpu,
    wait_until,
)

TINY_SPEC = {"model": {"channels": [8, 16], "convs_per_stage": 1}, "optim": {"epochs": 1}, "data": {"name": "digits"}}
RAW_QUEUE = "bench-nobody"
EXPERIMENT = "convtune"  # the API's default CONVTUNE_EXPERIMENT
PG_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
PG_URI = "postgresql+psycopg://postgres@127.0.0.1:5432/{db}"
DEFAULT_SUBMIT_LIMIT_PER_MIN = 60  # service.api.settings.ApiSettings.submit_rate_limit ("60/minute")
# The background study: trials long enough (100 epochs of small_trials' base network) to outlast a measurement.
TRAINING_STUDY = {
    "name": "submit bench: background training",
    "base": {"model": {"channels": [32, 64], "convs_per_stage": 2, "norm": "none"}, "optim": {"epochs": 100}, "data": {"name": "digits"},
             "divergence": {"enabled": False}},
    "search_space": {"optim.lr": {"type": "float", "low": 1e-3, "high": 3e-3, "log": True}},
    "sampler": {"name": "random"},
    "pruner": {"name": "none"},
    "n_trials": 8,
    "parallelism": 2,
}


# --- measuring -------------------------------------------------------------------------------------


@dataclass
class Result:
    """N calls from ``clients`` threads: what was accepted, how fast, how long each call took, what failed."""

    requests: int
    accepted: int
    wall_s: float
    latencies_ms: list[float]
    statuses: Counter = field(default_factory=Counter)  # non-2xx answers by status
    errors: Counter = field(default_factory=Counter)  # transport errors by exception type
    first_failure: str | None = None
    training: str | None = None  # "k/2 -> m/2": workers training when the POSTs began -> when they ended
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds spent meanwhile by role (API, MLflow server, workers)

    def cpu_ms_per_accept(self, role: str) -> float | None:
        return 1000 * self.cpu_s[role] / self.accepted if role in self.cpu_s and self.accepted else None

    @property
    def rate(self) -> float:
        return self.accepted / self.wall_s if self.wall_s > 0 else float("nan")

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile of the timed calls' latencies (ms)."""
        ordered = sorted(self.latencies_ms)
        return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else float("nan")

    def failures(self) -> str:
        parts = [f"HTTP {s}: {n}" for s, n in sorted(self.statuses.items())] + [f"{e}: {n}" for e, n in sorted(self.errors.items())]
        return ", ".join(parts) or "0"

    def figures(self, raw_rate: float | None) -> dict[str, Any]:
        return {
            "requests": self.requests, "accepted": self.accepted, "accepts_per_s": self.rate, "wall_s": self.wall_s,
            "ratio_vs_raw": self.rate / raw_rate if raw_rate else None, "p50_ms": self.percentile(0.50), "p99_ms": self.percentile(0.99),
            "max_ms": max(self.latencies_ms, default=float("nan")), "non_2xx": {str(k): v for k, v in self.statuses.items()},
            "errors": dict(self.errors), **({"workers_training": self.training} if self.training else {}),
            **({"cpu_ms_per_accept": {role: self.cpu_ms_per_accept(role) for role in self.cpu_s}} if self.cpu_s else {}),
        }


def hammer(n: int, clients: list[Any], call: Callable[[Any, int], int | None], warm_up: bool = True) -> Result:
    """Issue calls 0..n-1 from one thread per client (client i takes i, i+C, i+2C...), all released at once.

    ``call(client, i)`` returns an HTTP status (None: no status, a success) or raises (a transport
    error). Each client first makes one untimed call when ``warm_up``.
    """
    count = len(clients)
    barrier = threading.Barrier(count + 1)
    lat: list[list[float]] = [[] for _ in clients]
    outcome: list[list[tuple[int | None, str | None]]] = [[] for _ in clients]
    ends = [0.0] * count

    def one(c: int, i: int) -> tuple[float, int | None, str | None]:
        t = time.perf_counter()
        try:
            status, error = call(clients[c], i), None
        except Exception as exc:  # noqa: BLE001 - counted and shown, never hidden
            status, error = None, f"{type(exc).__name__}: {str(exc)[:200]}"
        return (time.perf_counter() - t) * 1000, status, error

    def worker(c: int) -> None:
        if warm_up:
            one(c, -1 - c)
        barrier.wait()
        for i in range(c, n, count):
            ms, status, error = one(c, i)
            lat[c].append(ms)
            outcome[c].append((status, error))
        ends[c] = time.perf_counter()

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in range(count)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    result = Result(n, 0, max(ends) - t0, [ms for per in lat for ms in per])
    for per in outcome:
        for status, error in per:
            if error is not None:
                result.errors[error.split(":")[0]] += 1
                result.first_failure = result.first_failure or error
            elif status is None or 200 <= status < 300:
                result.accepted += 1
            else:
                result.statuses[status] += 1
    return result


def run_raw(redis_url: str, n: int, clients: int) -> Result:
    """The message alone: ``models.messages.send`` (Celery's send_task) from ``clients`` threads to a queue nobody reads."""
    import redis
    from celery import Celery

    from models.messages import TrialMessage, celery_config, queue_lists, send
    from models.spec.trial import TrialSpec

    spec = TrialSpec.model_validate({**TINY_SPEC, "queue": "gpu"}).model_dump(mode="json")  # the payload the API sends
    app = Celery("bench-raw", set_as_current=False)
    # As the API's sender (service.api.wiring), with one pooled broker connection per thread: no thread waits for one.
    app.conf.update(celery_config(redis_url, 4 * 3600, socket_timeout_s=2.0, sender=True))
    app.conf.broker_pool_limit = clients

    def publish(_client: None, _i: int) -> None:
        send(app, TrialMessage(trial_id=uuid.uuid4().hex, spec=spec), RAW_QUEUE)

    r = redis.Redis.from_url(redis_url)
    try:
        result = hammer(n, [None] * clients, publish)
        landed = sum(r.llen(name) for name in queue_lists(RAW_QUEUE))
        note(f"raw: {result.accepted}/{n} published in {result.wall_s:.2f}s; {landed} messages in '{RAW_QUEUE}' (warm-ups included)")
    finally:
        r.delete(*queue_lists(RAW_QUEUE))
        app.close()
    return result


def run_posts(stack: Stack, tokens: list[str], queue: str, n: int) -> Result:
    """N ``POST /trials`` from one thread per token, each with its own httpx.Client."""
    import httpx

    body = {**TINY_SPEC, "queue": queue}
    clients = [httpx.Client(base_url=stack.api_url, timeout=60, headers={"Authorization": f"Bearer {t}"}) for t in tokens]
    first_bad: list[str] = []

    def post(client: httpx.Client, _i: int) -> int:
        answer = client.post("/trials", json=body)
        if answer.status_code >= 300 and not first_bad:
            first_bad.append(f"HTTP {answer.status_code}: {answer.text[:300]}")
        return answer.status_code

    try:
        result = hammer(n, clients, post)
    finally:
        for c in clients:
            c.close()
    result.first_failure = result.first_failure or (first_bad[0] if first_bad else None)
    return result


# --- the stacks ------------------------------------------------------------------------------------


@dataclass
class Tokens:
    """One API token per client plus an admin token (the background study), and CONVTUNE_AUTH_TOKENS for them."""

    clients: list[str]
    admin: str
    env: str


def make_tokens(label: str, count: int) -> Tokens:
    from service.api.auth import hash_token, new_token

    clients = [new_token() for _ in range(count)]
    admin = new_token()
    config = [{"name": f"bench-{label}-c{i:02d}", "sha256": hash_token(t), "scopes": ["read", "submit"]} for i, t in enumerate(clients)]
    config.append({"name": f"bench-{label}-admin", "sha256": hash_token(admin), "scopes": ["admin"]})
    return Tokens(clients, admin, json.dumps(config))


@dataclass
class PostgresMlflow:
    database: str
    port: int
    popen: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 240) -> None:
        t0 = time.monotonic()
        if not wait_until(lambda: self.popen.poll() is not None or _http_ok(f"{self.url}/health"), timeout_s, 0.5) or self.popen.poll() is not None:
            raise RuntimeError(f"mlflow server on Postgres did not become ready; {self.log}:\n{_tail(self.log)}")
        note(f"mlflow server on Postgres ({self.database}) answers at {self.url} (waited {time.monotonic() - t0:.1f}s)")


@contextmanager
def postgres_mlflow(workers: int) -> Iterator[PostgresMlflow]:
    """A fresh database on the local Postgres and an ``mlflow server`` on it (started, not waited for); both gone at the end."""
    import psycopg

    database = f"convtune_bench_{secrets.token_hex(4)}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')
    try:
        home = Path(tempfile.mkdtemp(prefix="convtune-bench-submit-pg-"))
        port, log = free_port(), home / "mlflow.log"
        argv = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
                "--backend-store-uri", PG_URI.format(db=database), "--artifacts-destination", str(home / "artifacts")]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
        with open(log, "ab") as out:
            popen = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        note(f"mlflow server on Postgres database {database}: starting on port {port} (log {log})")
        try:
            yield PostgresMlflow(database, port, popen, log)
        finally:
            if popen.poll() is None:
                _kill(popen.pid, signal.SIGTERM)
                try:
                    popen.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    _kill(popen.pid, signal.SIGKILL)
                    popen.wait()
    finally:
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        note(f"dropped database {database}")


def unserved_queue() -> str:
    """The queue the stack's workers do not read: ``convtune up`` starts ``gpu`` workers on a GPU host, ``cpu`` ones elsewhere."""
    from service.stack.supervisor import gpu_count

    return "cpu" if gpu_count() else "gpu"


@contextmanager
def run_urls_unprinted() -> Iterator[None]:
    """MLflow's client writes "View run ... at: URL" to stdout for every run it ends: not on this benchmark's stdout."""
    name, before = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", os.environ.get("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT")
    os.environ[name] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def end_queued(stack: Stack, queue: str) -> int:
    """End (KILLED) every run still queued on ``queue`` and purge its messages: the next case starts from an empty queue."""
    import redis
    from mlflow.tracking import MlflowClient

    from models.messages import queue_lists
    from models.store.runs import TAG

    client = MlflowClient(stack.mlflow_url)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    ids: list[str] = []
    if experiment is not None:
        token = None
        while True:
            page = client.search_runs([experiment.experiment_id], filter_string=f"attributes.status = 'SCHEDULED' and tags.`{TAG.QUEUE}` = '{queue}'",
                                      max_results=5000, page_token=token)
            ids += [r.info.run_id for r in page]
            token = page.token
            if not token:
                break
    with ThreadPoolExecutor(8) as pool, run_urls_unprinted():
        list(pool.map(lambda run_id: client.set_terminated(run_id, "KILLED"), ids))
    r = redis.Redis.from_url(stack.redis_url)
    r.delete(*queue_lists(queue))
    return len(ids)


def training_now(stack: Stack, study_id: str) -> int:
    """How many of the study's trials MLflow shows RUNNING (a worker is training them)."""
    from mlflow.tracking import MlflowClient

    from models.store.runs import TAG

    client = MlflowClient(stack.mlflow_url)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return 0
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{TAG.STUDY_ID}` = '{study_id}' and attributes.status = 'RUNNING'",
                              max_results=100)
    return sum(1 for r in runs if r.info.run_id != study_id)  # its trials, not the study's parent run


def measured_posts(stack: Stack, tokens: Tokens, queue: str, n: int, mlflow_pid: int | None) -> Result:
    """``run_posts``, with the CPU its processes spent meanwhile by role (``mlflow_pid``: a server of the bench's own)."""

    def cpu() -> dict[str, float]:
        by_role = process_cpu(stack.popen.pid)
        if mlflow_pid is not None:
            # Every process of that server's tree: its uvicorn's workers are multiprocessing children (spawn_main).
            by_role["mlflow server"] = by_role.get("mlflow server", 0.0) + sum(process_cpu(mlflow_pid).values())
        return by_role

    before = cpu()
    result = run_posts(stack, tokens.clients, queue, n)
    result.cpu_s = cpu_delta(before, cpu())
    return result


def run_case(stack: Stack, tokens: Tokens, queue: str, n: int, training: bool, cpu_workers: int, mlflow_pid: int | None = None) -> Result:
    """One case on a running stack: reset the queue, start the background study if ``training``, time N POSTs."""
    import httpx

    ended = end_queued(stack, queue)
    if ended:
        note(f"ended {ended} queued trials of the previous case and purged '{queue}'")
    if not training:
        return measured_posts(stack, tokens, queue, n, mlflow_pid)
    with httpx.Client(base_url=stack.api_url, timeout=60, headers={"Authorization": f"Bearer {tokens.admin}"}) as admin:
        study_id = admin.post("/studies", json=TRAINING_STUDY).raise_for_status().json()["id"]
        try:
            t0 = time.monotonic()
            if not wait_until(lambda: training_now(stack, study_id) >= cpu_workers, 240, 1.0):
                note(f"warning: {training_now(stack, study_id)}/{cpu_workers} workers training after 240 s; measuring anyway")
            else:
                note(f"study {study_id}: {cpu_workers} trials training after {time.monotonic() - t0:.1f}s")
            before = training_now(stack, study_id)
            result = measured_posts(stack, tokens, queue, n, mlflow_pid)
            result.training = f"{before}/{cpu_workers} -> {training_now(stack, study_id)}/{cpu_workers}"
        finally:
            cancelled = admin.post(f"/studies/{study_id}/cancel")
            if cancelled.status_code >= 300:
                note(f"warning: cancelling study {study_id}: HTTP {cancelled.status_code} {cancelled.text[:200]}")
    return result


def auth_env(tokens: Tokens, per_token_posts: int) -> dict[str, str]:
    """Auth on with these tokens; the default per-token submit limit, raised only when the run posts more than it allows."""
    env = {"CONVTUNE_AUTH_DISABLED": "false", "CONVTUNE_AUTH_TOKENS": tokens.env}
    if per_token_posts > DEFAULT_SUBMIT_LIMIT_PER_MIN - 5:
        env["CONVTUNE_SUBMIT_RATE_LIMIT"] = f"{2 * per_token_posts}/minute"
        env["CONVTUNE_RATE_LIMIT"] = f"{max(600, 4 * per_token_posts)}/minute"
        note(f"each token posts up to {per_token_posts} times a stack: submit rate limit raised to {env['CONVTUNE_SUBMIT_RATE_LIMIT']}")
    return env


def redis_db(url: str, db: int) -> str:
    return f"{url.rsplit('/', 1)[0]}/{db}"


# --- main ------------------------------------------------------------------------------------------


LABELS = {
    "raw": "raw send_task (Celery on Redis)",
    "sqlite_idle": "convtune, MLflow on sqlite, idle",
    "sqlite_training": "convtune, MLflow on sqlite, 2 workers training",
    "postgres_idle": "convtune, MLflow on Postgres, idle",
    "postgres_training": "convtune, MLflow on Postgres, 2 workers training",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="128 requests; sqlite idle, postgres idle and postgres training only")
    parser.add_argument("--requests", type=int, default=None, help="timed requests per case (600; --quick 128)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (threads, one httpx.Client and one token each)")
    parser.add_argument("--mlflow-workers", type=int, default=2, help="server workers of the Postgres case's MLflow (2, as the deploy image)")
    parser.add_argument("--cpu-workers", type=int, default=2, help="workers of the stack (issue 10's `convtune up --cpu-workers 2`)")
    args = parser.parse_args()
    n = args.requests or (128 if args.quick else 600)
    sqlite_cases = ["idle"] if args.quick else ["idle", "training"]
    postgres_cases = ["idle", "training"]
    queue = unserved_queue()
    # Per token and stack: each case's share plus its warm-up request.
    per_token = (math.ceil(n / args.clients) + 1) * max(len(sqlite_cases), len(postgres_cases))
    note(f"{n} requests a case from {args.clients} clients; trials go to queue '{queue}', which the stack's workers do not serve")

    results: dict[str, Result | dict[str, str]] = {}

    def measure(key: str, stack: Stack, tokens: Tokens, case: str, mlflow_pid: int | None = None) -> None:
        try:
            result = run_case(stack, tokens, queue, n, case == "training", args.cpu_workers, mlflow_pid)
        except Exception as exc:  # noqa: BLE001 - a case that cannot run is reported, the others still run
            results[key] = {"unavailable": f"{type(exc).__name__}: {str(exc)[:300]}"}
            note(f"{key}: could not run: {results[key]['unavailable']}")
            return
        results[key] = result
        note(f"{key}: {result.accepted}/{n} accepted in {result.wall_s:.2f}s ({result.rate:.1f}/s), p50 {result.percentile(0.5):.0f} ms, "
             f"p99 {result.percentile(0.99):.0f} ms, failures {result.failures()}" + (f", training {result.training}" if result.training else ""))
        if result.first_failure:
            note(f"{key}: first failure: {result.first_failure}")

    with private_redis() as redis_url:
        results["raw"] = run_raw(redis_db(redis_url, 0), n, args.clients)
        with postgres_mlflow(args.mlflow_workers) as pg:
            tokens = make_tokens("sqlite", args.clients)
            # The Postgres server migrates its fresh database while this stack starts.
            with convtune_up(redis_db(redis_url, 1), args.cpu_workers, auth_env(tokens, per_token), wait_workers=True) as stack:
                pg.wait_ready()
                for case in sqlite_cases:
                    measure(f"sqlite_{case}", stack, tokens, case)
            tokens = make_tokens("postgres", args.clients)
            with convtune_up(redis_db(redis_url, 2), args.cpu_workers, auth_env(tokens, per_token), mlflow_port=pg.port, wait_workers=True) as stack:
                for case in postgres_cases:
                    measure(f"postgres_{case}", stack, tokens, case, pg.popen.pid)

    raw = results["raw"]
    raw_rate = raw.rate if isinstance(raw, Result) else None
    rows, figures = [], {"requests": n, "clients": args.clients, "queue": queue, "cpu_workers": args.cpu_workers, "mlflow_workers_postgres": args.mlflow_workers}
    for key, label in LABELS.items():
        if key not in results:
            continue
        result = results[key]
        if not isinstance(result, Result):
            rows.append([label, "unavailable", "-", "-", "-", "-", "-", "-", result["unavailable"][:80], "-"])
            figures[key] = result
            continue
        ratio = result.rate / raw_rate if raw_rate else float("nan")
        rows.append([label, f"{result.accepted}/{result.requests}", round(result.rate, 1), round(ratio, 3),
                     round(result.percentile(0.5), 1), round(result.percentile(0.99), 1),
                     *(_ms(result.cpu_ms_per_accept(role)) for role in ("api", "mlflow server")), result.failures(), result.training or "-"])
        figures[key] = result.figures(raw_rate)
    print_table(
        f"POST /trials: {n} requests from {args.clients} concurrent clients (one token each), against raw send_task on the same Redis",
        ["how", "accepted", "accepts/s", "vs raw", "p50 ms", "p99 ms", "API CPU ms/accept", "MLflow server CPU ms/accept", "failures",
         "workers training (start -> end)"], rows,
    )

    def figure(key: str, name: str) -> float | None:
        return figures.get(key, {}).get(name) if isinstance(figures.get(key), dict) else None

    emit("submit", figures, {
        "postgres_idle_vs_raw": Target(figure("postgres_idle", "ratio_vs_raw"), ">=", 0.25),
        "postgres_idle_p99_ms": Target(figure("postgres_idle", "p99_ms"), "<=", 100),
        "postgres_training_accepts_per_s": Target(figure("postgres_training", "accepts_per_s"), ">=", 50),
    })


def _ms(value: float | None) -> float | str:
    return "-" if value is None else round(value, 1)


if __name__ == "__main__":
    main()
