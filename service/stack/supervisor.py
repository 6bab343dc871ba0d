"""``convtune up``: the local stack (Redis if needed, MLflow, workers, the API) under one supervisor.

Every process is started in its own session and stopped by pid, in reverse order, on SIGINT (Ctrl-C)
or SIGTERM, or when any of them dies (its log tail is printed then). On Linux each one is also tied to
the supervisor's life: if the supervisor is killed outright (SIGKILL, OOM), the kernel sends every
child SIGTERM, so no stale worker lives on to take the next stack's trials. Logs go to
``HOME/logs/NAME.log``. The stack's secret key (callbacks need one) is made once and kept in
``HOME/secret_key``; ``CONVTUNE_SECRET_KEY`` in the environment overrides it. A Redis started here keeps an append-only file in ``HOME/redis``, so queued
messages outlive a restart of the stack. ``convtune worker`` ties its Celery processes to its own
life with the same functions (:func:`spawn`, :func:`stop_processes`, :func:`stop_on_signals`).
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
import redis

from models.store import fleet

__all__ = [
    "STOP_SIGNALS", "Process", "Stack", "StackConfig", "api_command", "gpu_count", "redis_command", "spawn", "stop_on_signals", "stop_processes",
    "worker_commands",
]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# prctl(2) option: the signal a process gets when the thread that forked it exits (Linux only).
PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


@dataclass
class StackConfig:
    home: Path = Path(".convtune")
    redis_url: str = "redis://127.0.0.1:6379/0"
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    mlflow_port: int = 5000
    api_workers: int = 2
    cpu_workers: int = 1
    trials_per_worker: int = 1
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        return f"http://{self.api_host}:{self.api_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log_path: Path

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def gpu_count() -> int:
    """GPUs visible to this host, asked of nvidia-smi so this process never initialises CUDA."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def worker_commands(gpus: int, cpu_workers: int, loglevel: str = "INFO", trials_per_worker: int = 1) -> list[tuple[str, list[str], dict[str, str]]]:
    """One Celery worker per GPU (queue ``gpu``), or ``cpu_workers`` on a CPU host, each training ``trials_per_worker`` trials at once.

    Every training process (a worker's pool child) takes an equal share of the host's cores
    (workers.training.threads); on a GPU host, trials sharing a GPU share its memory too.
    """
    concurrency = str(trials_per_worker)
    base = [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "-P", "prefork", "-c", concurrency, "--loglevel", loglevel, "--without-gossip", "--without-mingle"]
    # Plus one light worker that delivers callbacks (threads, no torch), so a receiver never holds a GPU.
    callbacks = ("callbacks", [sys.executable, "-m", "celery", "-A", "workers.callbacks.app", "worker", "-P", "threads", "-c", "4", "--loglevel", loglevel,
                               "--without-gossip", "--without-mingle", "-Q", "callbacks", "-n", "callbacks@%h"], {"CUDA_VISIBLE_DEVICES": ""})
    processes = (gpus or cpu_workers) * trials_per_worker
    share = {"CONVTUNE_HOST_TRAINING_PROCESSES": os.environ.get("CONVTUNE_HOST_TRAINING_PROCESSES", str(processes))}
    if gpus:
        if trials_per_worker > 1 and "CONVTUNE_GPU_MEMORY_FRACTION" not in os.environ:
            share["CONVTUNE_GPU_MEMORY_FRACTION"] = f"{0.9 / trials_per_worker:.3f}"  # batch_size 'auto' leaves room for the GPU's other trials
        return [*((f"gpu{i}", [*base, "-Q", "gpu", "-n", f"gpu{i}@%h"], {"CUDA_VISIBLE_DEVICES": str(i), **share}) for i in range(gpus)), callbacks]
    return [*((f"cpu{i}", [*base, "-Q", "cpu", "-n", f"cpu{i}@%h"], {"CUDA_VISIBLE_DEVICES": "", **share}) for i in range(cpu_workers)), callbacks]


def api_command(bind: str, workers: int) -> list[str]:
    """gunicorn serving the API, with the settings of ``service.api.gunicorn_conf`` (multiprocess metrics)."""
    return [sys.executable, "-m", "gunicorn", "-c", "python:service.api.gunicorn_conf", "-w", str(workers), "-b", bind, "service.api:create_app()"]


def stop_on_signals() -> None:
    """Make SIGINT and SIGTERM raise KeyboardInterrupt, so that either one stops the stack cleanly.

    Call it from the main thread before starting the stack. Both are installed explicitly: started
    from a script's background job (``convtune up &``), this process inherits SIGINT ignored, and
    Python then installs no KeyboardInterrupt handler of its own. After the first signal both are
    ignored, so a second Ctrl-C cannot cut :meth:`Stack.down` short (it escalates to SIGKILL itself).
    """

    def stop(signum: int, _frame: object) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in STOP_SIGNALS:
        signal.signal(sig, stop)


def redis_command(server: str, port: int, data_dir: Path) -> list[str]:
    """redis-server on 127.0.0.1 with an append-only file in ``data_dir``: queued messages survive a restart.

    fsync once a second (Redis' default for AOF): a crash of the host loses at most the last second
    of writes; a stop (SIGTERM) loses nothing, Redis flushes the file before it exits. RDB snapshots
    stay off: the AOF alone is what Redis loads at start.
    """
    return [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(data_dir)]


def _die_with_supervisor() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send the child SIGTERM when this process dies; None off Linux.

    SIGTERM rather than SIGKILL: each child stops its own children on SIGTERM (gunicorn its workers,
    Celery its pool, ``mlflow server`` its uvicorn), which a SIGKILLed child could not do.
    """
    if _LIBC is None:
        return None
    libc, supervisor = _LIBC, os.getpid()
    # prctl(int option, unsigned long arg2, ...): built here, so the child only makes the call.
    args = (ctypes.c_int(PR_SET_PDEATHSIG), ctypes.c_ulong(signal.SIGTERM), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))

    def in_child() -> None:
        # Runs in the child between fork and exec; the setting survives exec.
        libc.prctl(*args)
        if os.getppid() != supervisor:  # the supervisor died before the line above took effect
            os._exit(1)

    return in_child


class Stack:
    """Starts, watches and stops the local stack's processes."""

    def __init__(self, config: StackConfig, say: Callable[[str], None] = print):
        self.config = config
        self.say = say
        self.processes: list[Process] = []
        # The artifact store of the MLflow server this stack started: its workers write there themselves.
        self.artifacts_destination: str | None = None
        (config.home / "logs").mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Process:
        """Start one process in its own session (so :meth:`down` can stop its whole group by pid), tied to this one's life."""
        log_path = self.config.home / "logs" / f"{name}.log"
        with open(log_path, "ab") as log:
            popen = spawn(argv, env, stdout=log, stderr=subprocess.STDOUT)
        process = Process(name, popen, log_path)
        self.processes.append(process)
        return process

    def env(self) -> dict[str, str]:
        c = self.config
        return {
            "CONVTUNE_REDIS_URL": c.redis_url,
            "CONVTUNE_MLFLOW_TRACKING_URI": c.mlflow_url,
            "CONVTUNE_CHECKPOINT_DIR": str((c.home / "checkpoints").resolve()),
            # The API and every worker must open the same study storage (a journal file on one host).
            "CONVTUNE_STUDY_STORAGE": os.environ.get("CONVTUNE_STUDY_STORAGE", str((c.home / "studies.journal").resolve())),
            "CONVTUNE_DEFAULT_QUEUE": "gpu" if gpu_count() else "cpu",
            # The local stack serves one person on 127.0.0.1: no tokens (the API warns at start-up).
            "CONVTUNE_AUTH_DISABLED": os.environ.get("CONVTUNE_AUTH_DISABLED", "true"),
            # Callbacks need it (it seals their URLs in MLflow and signs them): the API and workers share this stack's own.
            "CONVTUNE_SECRET_KEY": os.environ.get("CONVTUNE_SECRET_KEY") or self.secret_key(),
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "PYTHONUNBUFFERED": "1",
            # One host: the workers put artifacts straight into the server's store, not one request per file.
            **({"CONVTUNE_ARTIFACTS_DESTINATION": self.artifacts_destination} if self.artifacts_destination else {}),
            **c.extra_env,
        }

    def secret_key(self) -> str:
        """This stack's secret key: made at random the first time, then kept in ``HOME/secret_key`` (readable by its owner only)."""
        path = self.config.home / "secret_key"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_urlsafe(32))
        return path.read_text().strip()

    def up(self) -> None:
        """Start everything and wait until the API is ready and a worker serves the stack's queue; raises RuntimeError naming what failed."""
        self.ensure_redis()
        self.start_mlflow()
        env = self.env()
        for name, argv, extra in worker_commands(gpu_count(), self.config.cpu_workers, trials_per_worker=self.config.trials_per_worker):
            self.start(f"worker-{name}", argv, {**env, **extra})
        api = api_command(f"{self.config.api_host}:{self.config.api_port}", self.config.api_workers)
        self.start("api", api, env)
        self.wait_http("api", f"{self.config.api_url}/readyz", timeout_s=90)
        self.wait_served({"gpu" if gpu_count() else "cpu"}, timeout_s=180)
        self.say(f"API ready at {self.config.api_url}; workers: {', '.join(p.name for p in self.processes if p.name.startswith('worker'))}")

    def ensure_redis(self) -> None:
        url = urlparse(self.config.redis_url)
        if _redis_answers(self.config.redis_url):
            self.say(f"Redis answers at {url.hostname}:{url.port or 6379}")
            return
        server = shutil.which("redis-server")
        if url.hostname not in ("127.0.0.1", "localhost") or server is None:
            raise RuntimeError(
                f"no Redis answers at {self.config.redis_url}. Start one (Debian: apt-get install redis-server; "
                "or docker run -p 6379:6379 redis:7) or point CONVTUNE_REDIS_URL at yours."
            )
        port = url.port or 6379
        data_dir = (self.config.home / "redis").resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        self.start("redis", redis_command(server, port, data_dir))
        if not _wait(lambda: _redis_answers(self.config.redis_url), 15):
            raise RuntimeError(f"redis-server did not start on port {port}:\n{self.processes[-1].tail()}")
        self.say(f"started redis-server on port {port} (append-only file in {data_dir})")

    def start_mlflow(self) -> None:
        c = self.config
        if _http_ok(f"{c.mlflow_url}/health"):
            self.say(f"MLflow already answers at {c.mlflow_url}; using it")
            return
        home = c.home.resolve()
        argv = [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(c.mlflow_port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}", "--artifacts-destination", str(home / "artifacts"),
        ]
        self.start("mlflow", argv, {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"})
        self.wait_http("mlflow", f"{c.mlflow_url}/health", timeout_s=120)
        self.artifacts_destination = str(home / "artifacts")
        self.say(f"MLflow tracking server and UI at {c.mlflow_url}")

    def wait_http(self, name: str, url: str, timeout_s: float) -> None:
        if not _wait(lambda: _http_ok(url) or self.dead() is not None, timeout_s) or self.dead() is not None:
            dead = self.dead()
            culprit = dead or next(p for p in self.processes if p.name == name)
            raise RuntimeError(f"{name} did not become ready at {url}; last lines of {culprit.log_path}:\n{culprit.tail()}")

    def wait_served(self, queues: set[str], timeout_s: float) -> None:
        """Wait until a worker's heartbeat names each of ``queues`` (:mod:`models.store.fleet`): the API takes work for them then.

        Before it, a submit is accepted only while this Redis has no record of any worker (a new
        stack): a Redis kept from an earlier stack may remember other queues, or none recently.
        """
        client = redis.Redis.from_url(self.config.redis_url, socket_connect_timeout=2, socket_timeout=2)

        def served() -> bool:
            try:
                return fleet.served_queues(client, queues) == queues
            except redis.RedisError:
                return False

        if not _wait(lambda: served() or self.dead() is not None, timeout_s) or self.dead() is not None:
            dead = self.dead()
            culprit = dead or next(p for p in self.processes if p.name.startswith("worker"))
            raise RuntimeError(f"no worker serves {', '.join(sorted(queues))} after {timeout_s:.0f}s; last lines of {culprit.log_path}:\n{culprit.tail()}")

    def dead(self) -> Process | None:
        """The first process that has exited, if any."""
        return next((p for p in self.processes if p.popen.poll() is not None), None)

    def watch(self, poll_s: float = 1.0) -> Process:
        """Block until one of the processes exits; that process. A stop signal interrupts the wait."""
        while (dead := self.dead()) is None:
            time.sleep(poll_s)
        return dead

    def down(self, timeout_s: float = 15) -> None:
        """Stop every process by pid, newest first: SIGTERM to its group, SIGKILL after ``timeout_s``."""
        stop_processes([p.popen for p in self.processes], timeout_s)
        self.processes.clear()


def spawn(argv: list[str], env: dict[str, str] | None = None, **popen_kwargs: object) -> subprocess.Popen:
    """Start ``argv`` in its own session (:func:`stop_processes` stops its whole group), tied to this process's life.

    ``env`` is added to this process's environment. On Linux the child gets SIGTERM from the kernel
    when this process dies, even by SIGKILL. Call it from the main thread only.
    """
    # The parent-death signal fires when the *thread* that forked the child exits, not the process.
    # `convtune up` and `convtune worker` run no other thread while they start processes, which also
    # keeps preexec_fn safe.
    assert threading.current_thread() is threading.main_thread(), "start child processes from the main thread"
    return subprocess.Popen(
        argv, env={**os.environ, **(env or {})}, start_new_session=True,
        preexec_fn=_die_with_supervisor(),  # noqa: PLW1509 - main thread, no other threads (above)
        **popen_kwargs,  # type: ignore[arg-type]
    )


def stop_processes(popens: list[subprocess.Popen], timeout_s: float, term_group: bool = True) -> list[int]:
    """Stop processes started by :func:`spawn`, newest first: SIGTERM, then SIGKILL to each one's group after ``timeout_s``.

    SIGTERM goes to each one's whole group, or with ``term_group=False`` to the process alone: a
    Celery worker's main process then stops its pool itself once the running task ends (its warm
    shutdown), where a SIGTERM to the pool would end the task mid-step. Returns the exit codes, in
    the order given (negative: ended by that signal).
    """
    for popen in reversed(popens):
        if popen.poll() is None:
            if term_group:
                _signal_group(popen.pid, signal.SIGTERM)
            else:
                popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for popen in reversed(popens):
        try:
            popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(popen.pid, signal.SIGKILL)
            popen.wait()
    return [popen.returncode for popen in popens]


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _wait(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()
