"""Real components for the integration tests: Redis, an ``mlflow server``, Celery worker processes.

Each is started once per session by these fixtures (Redis is reused when one already answers:
the tests then use their own database number), and stopped by pid at the end. Their logs are kept
under ``test-artifacts/`` and printed when a fixture fails to start.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis

ROOT = Path(__file__).resolve().parents[1]
# Under pytest-xdist each test process is a session of its own: its own logs folder, its own Redis (below).
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
ARTIFACTS = Path(os.environ.get("CONVTUNE_TEST_ARTIFACTS", ROOT / "test-artifacts")) / XDIST_WORKER
TEST_REDIS_DB = int(os.environ.get("CONVTUNE_TEST_REDIS_DB", "11"))
# The secret key of the session's API and workers (models.sealing): callbacks need one.
TEST_SECRET_KEY = "convtune-test-secret-key"


# The files that take longest, longest first (`--durations` of a whole run). pytest-xdist hands out
# whole files (--dist loadfile), by default those with the most tests first: the few long tests of a
# deployment file then started last and ran alone while the other process idled. Started first, the
# many short files fill the gaps at the end.
SLOWEST_FILES = (
    "tests/deploy/test_compose_as_processes.py",
    "tests/integration/test_faults.py",
    "tests/deploy/test_k8s_as_processes.py",
    "tests/integration/test_studies.py",
    "tests/integration/test_study_recovery.py",
    "tests/integration/test_ci_examples.py",
    "tests/integration/test_leases.py",
    "tests/integration/test_fleet.py",
    "tests/integration/test_load.py",
    "tests/integration/test_stack.py",
    "tests/integration/test_worker_recovery.py",
    "tests/integration/test_tuning.py",
    "tests/service/test_worker_signals.py",
    "tests/e2e/test_mlflow_ui.py",
)


def pytest_configure(config: pytest.Config) -> None:
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The slowest files first, then the other files that start processes, then the rest (each file's tests in order)."""

    def path(item: pytest.Item) -> str:
        return item.nodeid.split("::", 1)[0]

    starts_processes = {path(item) for item in items if item.get_closest_marker("integration")}

    def rank(item: pytest.Item) -> tuple[int, int]:
        if path(item) in SLOWEST_FILES:
            return 0, SLOWEST_FILES.index(path(item))
        return (1, 0) if path(item) in starts_processes else (2, 0)

    items.sort(key=rank)  # stable: a file's tests stay together and in order, as do files of one rank


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread_per_test_process() -> None:
    """Under pytest-xdist, the tests that train in their own process use one torch thread each.

    torch's default is a thread per core in every process: two test processes on two cores (plus
    the workers and servers the integration tests start) would run twice as many busy threads as
    cores, and its OpenMP threads spin while they wait for each other (workers.training.threads
    gives the product's workers their share the same way).
    """
    if XDIST_WORKER and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


class Service:
    """A process a fixture started: stopped by pid (its whole process group)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None):
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log_path = ARTIFACTS / f"{name}.log"
        self.argv, self.env = argv, env
        self.uri: str | None = None  # where it answers, for a server
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True, cwd=ROOT)

    def start_again(self) -> None:
        """Start the same command again (after a stop), its output appended to the same log."""
        assert not self.alive(), f"{self.name} still runs"
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(self.env or {})}, start_new_session=True, cwd=ROOT,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, sig)
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
            except ProcessLookupError:
                pass


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def start_redis(name: str, *options: str) -> tuple[Service, str]:
    """A redis-server of a test's own on a free port (nothing kept on disk unless ``options`` say), answering; (server, url)."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("no redis-server to start: apt-get install redis-server")
    port = free_port()
    started = Service(name, [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *options])
    url = f"redis://127.0.0.1:{port}/0"
    assert wait_for(lambda: redis_answers(url), 10), started.log()
    return started, url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis: the machine's on 6379 (own database number), else a redis-server we start.

    Under pytest-xdist, a redis-server of each test process's own: the tests that take a database
    of their own (fleet, leases, load, stack) name fixed numbers, which two processes would share.
    """
    url = os.environ.get("CONVTUNE_TEST_REDIS_URL", f"redis://127.0.0.1:6379/{TEST_REDIS_DB}")
    started = None
    if XDIST_WORKER and "CONVTUNE_TEST_REDIS_URL" not in os.environ or not redis_answers(url):
        started, url = start_redis("redis")
    redis.Redis.from_url(url).flushdb()
    yield url
    if started:
        started.stop()


def mlflow_healthy(uri: str) -> bool:
    try:
        return httpx.get(f"{uri}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A real ``mlflow server`` (sqlite store, local artifacts, one worker) on a free port; its address is ``.uri``."""
    home = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    server = Service(
        "mlflow",
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}", "--artifacts-destination", str(home / "artifacts")],
        {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    server.uri = f"http://127.0.0.1:{port}"
    if not wait_for(lambda: mlflow_healthy(server.uri) or not server.alive(), 120) or not server.alive():
        server.stop()
        pytest.fail(f"mlflow server did not start:\n{server.log()[-3000:]}")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_uri(mlflow_server: Service) -> str:
    """The session's ``mlflow server`` (a fault test stops it and starts it again: the same port and stores)."""
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server.uri
    return mlflow_server.uri


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The workers' shared data root."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def experiment() -> str:
    """The session's own MLflow experiment (counts of runs are this session's alone): the API's and the workers'."""
    return f"test-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def worker_env(redis_url: str, mlflow_uri: str, data_root: Path, experiment: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {
        "CONVTUNE_REDIS_URL": redis_url,
        "CONVTUNE_MLFLOW_TRACKING_URI": mlflow_uri,
        "CONVTUNE_EXPERIMENT": experiment,  # the experiment the reconciler sweeps: the API's
        "CONVTUNE_DATA_ROOT": str(data_root),
        "CONVTUNE_CALLBACK_ALLOWED_NETWORKS": '["127.0.0.0/8"]',  # the tests' callback receivers listen on loopback
        "CONVTUNE_SECRET_KEY": TEST_SECRET_KEY,  # the API's (api_settings): both open sealed callback URLs and sign callbacks
        "CONVTUNE_CHECKPOINT_DIR": str(tmp_path_factory.mktemp("checkpoints")),
        "CONVTUNE_CANCEL_CHECK_STEPS": "5",
        # Every worker of the session shares one study storage, whichever test started it.
        "CONVTUNE_STUDY_STORAGE": str(tmp_path_factory.mktemp("studies") / "studies.journal"),
        "CONVTUNE_LEASE_TTL_S": "10",
        # The reconciler leaves work on a queue no worker serves alone: tests park work there on purpose,
        # and a long session would otherwise see it ended 15 min after the queue's first sight.
        "CONVTUNE_UNSERVED_QUEUE_S": "0",
        "CUDA_VISIBLE_DEVICES": "",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
    }


def start_worker(name: str, env: dict[str, str], queue: str = "cpu") -> Service:
    """A real Celery worker process (prefork, concurrency 1), ready when this returns."""
    argv = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-P", "prefork", "-c", "1",
            "-Q", queue, "-n", f"{name}-{uuid.uuid4().hex[:6]}@%h", "--loglevel", "INFO", "--without-gossip", "--without-mingle"]
    worker = Service(name, argv, env)
    if not wait_for(lambda: " ready." in worker.log() or not worker.alive(), 90) or not worker.alive():
        worker.stop()
        pytest.fail(f"celery worker {name} did not start:\n{worker.log()[-3000:]}")
    return worker


@pytest.fixture(scope="session")
def worker(worker_env: dict[str, str]) -> Iterator[Service]:
    """One real Celery worker process consuming the ``cpu`` queue."""
    w = start_worker("worker", worker_env)
    yield w
    w.stop()
