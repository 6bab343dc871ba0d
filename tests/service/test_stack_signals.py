"""The stack supervisor stops its processes on SIGINT and SIGTERM, also when it inherited SIGINT ignored
(``convtune up &`` in a script), and its processes die with it when it is SIGKILLed.

Real processes, a tiny stack: the supervisor runs as its own process, starts a real redis-server (as
``convtune up`` does on a bare host) and a Python process with a child of its own that it stops on
SIGTERM (as ``mlflow server``, gunicorn and Celery do), then serves until stopped. The redis-server it
starts keeps an append-only file in its home: what was queued before a stop is there after a restart.
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

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the parent-death signal is Linux's")]  # starts real worker/stack processes

# What a shell does to a background job without job control: SIGINT ignored, kept across exec.
IGNORING_SIGINT = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); os.execv(sys.argv[1], sys.argv[1:])"

FAMILY = """
import signal, subprocess, sys, time
children = []
def stop(signum, frame):
    for child in children:
        child.terminate()
        child.wait()
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)  # before the child exists: once it does, SIGTERM stops both
children.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]))
time.sleep(600)
"""

SUPERVISOR = """
import signal, sys
from pathlib import Path
from service.stack.supervisor import Stack, StackConfig, stop_on_signals

print("inherited SIGINT ignored:", signal.getsignal(signal.SIGINT) == signal.SIG_IGN, flush=True)
stop_on_signals()
stack = Stack(StackConfig(home=Path(sys.argv[1]), redis_url=sys.argv[2]), say=lambda m: print(m, flush=True))
try:
    stack.ensure_redis()
    stack.start("family", [sys.executable, "-c", sys.argv[3]])
    print("serving", flush=True)
    stack.watch(poll_s=0.2)
except KeyboardInterrupt as exc:
    print("stopping the stack on", exc, flush=True)
finally:
    stack.down()
    print("stack stopped", flush=True)
"""


def _children_of() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    return children


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (read from /proc)."""
    children, found, todo = _children_of(), set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` still running (a zombie nobody reaped has stopped: it holds no port, takes no work)."""
    running = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            running.add(pid)
    return running


class Supervisor:
    """The tiny stack's supervisor process, its output, and every process it started (once serving)."""

    def __init__(self, tmp_path: Path, ignore_sigint: bool, redis_url: str | None = None, n: int = 0):
        self.log_path = tmp_path / f"supervisor-{n}.log"
        self.redis_url = redis_url or f"redis://127.0.0.1:{free_port()}/0"
        argv = [sys.executable, "-c", SUPERVISOR, str(tmp_path / "home"), self.redis_url, FAMILY]
        if ignore_sigint:
            argv = [sys.executable, "-c", IGNORING_SIGINT, *argv]
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        self.started: set[int] = set()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_until_serving(self) -> set[int]:
        """The stack's processes: redis-server, the family process and its child."""
        assert wait_for(lambda: "serving" in self.output() or self.popen.poll() is not None, 20), self.output()
        assert self.popen.poll() is None, self.output()
        assert wait_for(lambda: len(descendants(self.popen.pid)) >= 3, 10), f"{descendants(self.popen.pid)}\n{self.output()}"
        self.started = descendants(self.popen.pid)
        return self.started

    def kill_everything(self) -> None:
        """Stop by pid whatever a failed test left running: the supervisor, then each process group it started."""
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
def supervisor_factory(tmp_path: Path) -> Iterator:
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server (apt-get install redis-server)")
    made: list[Supervisor] = []

    def make(ignore_sigint: bool = False, redis_url: str | None = None) -> Supervisor:
        made.append(Supervisor(tmp_path, ignore_sigint, redis_url, n=len(made)))
        return made[-1]

    yield make
    for supervisor in made:
        supervisor.kill_everything()


@pytest.mark.parametrize(
    ("sig", "ignore_sigint"),
    [(signal.SIGINT, True), (signal.SIGINT, False), (signal.SIGTERM, True)],
    ids=["SIGINT-inherited-ignored", "SIGINT", "SIGTERM"],
)
def test_a_stop_signal_stops_the_stack_and_every_process_in_it(supervisor_factory, sig, ignore_sigint):
    supervisor = supervisor_factory(ignore_sigint=ignore_sigint)
    started = supervisor.wait_until_serving()
    assert f"inherited SIGINT ignored: {ignore_sigint}" in supervisor.output()

    supervisor.popen.send_signal(sig)

    assert supervisor.popen.wait(timeout=20) == 0, supervisor.output()
    output = supervisor.output()
    assert f"stopping the stack on {sig.name}" in output and "stack stopped" in output, output
    assert wait_for(lambda: not alive(started), 5), f"left running: {alive(started)}"


def test_the_stacks_processes_die_with_a_sigkilled_supervisor(supervisor_factory):
    supervisor = supervisor_factory()
    started = supervisor.wait_until_serving()

    supervisor.popen.kill()  # no handler runs: only the kernel's parent-death signal reaches the children
    supervisor.popen.wait()

    assert wait_for(lambda: not alive(started), 10), f"left running: {alive(started)}\n{supervisor.output()}"
    assert "stack stopped" not in supervisor.output()


def test_the_redis_it_starts_keeps_queued_messages_across_a_restart(supervisor_factory, tmp_path):
    first = supervisor_factory()
    first.wait_until_serving()
    r = redis.Redis.from_url(first.redis_url, socket_timeout=5)
    r.set("convtune:test:key", "kept")
    r.lpush("cpu", '{"a": "queued message"}')  # a Celery queue is a Redis list named after it
    first.popen.send_signal(signal.SIGTERM)
    assert first.popen.wait(timeout=20) == 0, first.output()
    assert "stack stopped" in first.output()
    assert wait_for(lambda: not alive(first.started), 5), f"left running: {alive(first.started)}"
    assert list((tmp_path / "home" / "redis").rglob("*.aof")), "no append-only file in HOME/redis"

    second = supervisor_factory(redis_url=first.redis_url)  # the same home and port: `convtune up` again
    second.wait_until_serving()
    assert "started redis-server" in second.output(), second.output()  # its own redis-server, not a leftover
    r = redis.Redis.from_url(second.redis_url, socket_timeout=5)
    assert r.get("convtune:test:key") == b"kept"
    assert r.lrange("cpu", 0, -1) == [b'{"a": "queued message"}']
