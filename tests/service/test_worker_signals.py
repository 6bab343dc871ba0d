"""``convtune worker`` stops its Celery processes on SIGINT and SIGTERM, also when it inherited SIGINT
ignored (``convtune worker &`` in a script), and they die with it when it is SIGKILLed.

Real processes: ``convtune worker`` runs as its own process against a private redis-server and an
MLflow URI nothing answers (idle workers never call it), and starts what it starts in production on
a CPU host: one prefork Celery worker (a main process and its pool process) and the callback worker.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import ROOT, free_port, wait_for
from tests.service.test_stack_signals import IGNORING_SIGINT, alive, descendants

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the parent-death signal is Linux's")]  # starts real worker/stack processes

CLI = [sys.executable, "-c", "from service.cli.main import main; main()"]


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server of this module's own, so its idle workers can take nobody else's messages."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("needs redis-server (apt-get install redis-server)")
    port = free_port()
    log = open(tmp_path_factory.mktemp("redis") / "redis.log", "wb")  # noqa: SIM115 - closed below
    popen = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], stdout=log, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"

    def answers() -> bool:
        try:
            return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
        except redis.RedisError:
            return False

    assert wait_for(answers, 10), "redis-server did not start"
    yield url
    popen.terminate()
    popen.wait(timeout=10)
    log.close()


class Worker:
    """A ``convtune worker`` process, its output, and every process it started (once its workers are ready)."""

    def __init__(self, tmp_path: Path, redis_url: str, ignore_sigint: bool):
        self.log_path = tmp_path / "worker.log"
        env = {
            **os.environ, "CONVTUNE_REDIS_URL": redis_url, "CONVTUNE_MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}",
            "CONVTUNE_CHECKPOINT_DIR": str(tmp_path / "checkpoints"), "CONVTUNE_STUDY_STORAGE": str(tmp_path / "studies.journal"),
            "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1",
        }
        argv = [*CLI, "worker", "--loglevel", "INFO", "--stop-timeout", "20"]
        if ignore_sigint:
            argv = [sys.executable, "-c", IGNORING_SIGINT, *argv]
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        self.started: set[int] = set()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_until_ready(self) -> set[int]:
        """Its processes, once both Celery workers said ready: the prefork main, its pool process, the callback worker."""
        ready = lambda: self.output().count(" ready.") >= 2 or self.popen.poll() is not None
        assert wait_for(ready, 90), self.output()[-3000:]
        assert self.popen.poll() is None, self.output()[-3000:]
        assert wait_for(lambda: len(descendants(self.popen.pid)) >= 3, 10), f"{descendants(self.popen.pid)}\n{self.output()[-3000:]}"
        self.started = descendants(self.popen.pid)
        return self.started

    def kill_everything(self) -> None:
        """Stop by pid whatever a failed test left running: this process, then each process group it started."""
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        for pid in alive(self.started):
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


@pytest.fixture
def worker_factory(tmp_path: Path, private_redis: str) -> Iterator:
    made: list[Worker] = []

    def make(ignore_sigint: bool = False) -> Worker:
        made.append(Worker(tmp_path, private_redis, ignore_sigint))
        return made[-1]

    yield make
    for worker in made:
        worker.kill_everything()


@pytest.mark.parametrize(("sig", "ignore_sigint"), [(signal.SIGINT, True), (signal.SIGTERM, False)], ids=["SIGINT-inherited-ignored", "SIGTERM"])
def test_a_stop_signal_stops_every_worker_cleanly(worker_factory, sig, ignore_sigint):
    worker = worker_factory(ignore_sigint=ignore_sigint)
    started = worker.wait_until_ready()

    worker.popen.send_signal(sig)

    assert worker.popen.wait(timeout=30) == 0, worker.output()[-3000:]  # 0: every child exited 0, none had to be killed
    output = worker.output()
    assert f"convtune worker: {sig.name}; stopping cpu0, callbacks" in output, output[-3000:]
    assert output.count("Warm shutdown") >= 2, output[-3000:]  # each Celery worker stopped itself, warm
    assert wait_for(lambda: not alive(started), 5), f"left running: {alive(started)}"


def test_the_workers_die_with_a_sigkilled_convtune_worker(worker_factory):
    worker = worker_factory()
    started = worker.wait_until_ready()

    worker.popen.kill()  # no handler runs: only the kernel's parent-death signal reaches the children
    worker.popen.wait()

    assert wait_for(lambda: not alive(started), 20), f"left running: {alive(started)}\n{worker.output()[-3000:]}"
    assert "Warm shutdown" in worker.output()  # SIGTERM from the kernel: each stopped itself
