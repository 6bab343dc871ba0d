"""What the benchmarks share: a private Redis, a convtune stack, an MLflow server, tables and the JSON line.

Every benchmark prints a table and, as its last line on stdout, one JSON object::

    {"bench": NAME, "figures": {...}, "targets": {NAME: {"target": "...", "value": V, "met": bool}}}

Progress goes to stderr. Everything started here is stopped by pid (its process group), also when
the benchmark fails or is sent SIGTERM: a context manager owns each process.
"""

from __future__ import annotations

import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # so a benchmark stopped with SIGTERM (kill, pkill) runs its cleanups too


signal.signal(signal.SIGTERM, _exit_on_sigterm)  # Python's default ends the process without them: a stack stayed up

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.conftest import free_port  # noqa: E402 - the suite's own, after ROOT is importable
from tests.conftest import wait_for as wait_until

__all__ = [
    "ROOT", "Stack", "Target", "convtune_up", "cpu_delta", "emit", "free_port", "median", "mlflow_server", "note", "print_table", "private_redis",
    "process_cpu", "wait_until",
]

_T0 = time.monotonic()


def note(message: str) -> None:
    """A progress line on stderr, stamped with the seconds since the benchmark started."""
    print(f"[{time.monotonic() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


def median(values: Sequence[float]) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


# --- processes -------------------------------------------------------------------------------------


@contextmanager
def private_redis() -> Iterator[str]:
    """A Redis of this benchmark's own (no persistence) on a free port; its URL. Killed by pid at the end."""
    import redis

    port = free_port()
    pidfile = Path(f"/tmp/redis-{port}.pid")
    subprocess.run(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "yes", "--pidfile", str(pidfile)],
        check=True, stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        if not wait_until(lambda: _pings(redis, url), 10, 0.05):
            raise RuntimeError(f"redis-server did not answer on port {port}")
        yield url
    finally:
        if wait_until(pidfile.exists, 2, 0.05):
            _kill(int(pidfile.read_text().strip()), signal.SIGTERM, group=False)


def _pings(redis: Any, url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


def _kill(pid: int, sig: int, group: bool = True) -> None:
    try:
        os.killpg(pid, sig) if group else os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _http_ok(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class Stack:
    """A running ``convtune up``: where its API and MLflow answer, its home (logs, artifacts)."""

    api_url: str
    mlflow_url: str
    redis_url: str
    home: Path
    popen: subprocess.Popen

    def log(self, name: str) -> Path:
        return self.home / "logs" / f"{name}.log"

    def worker_logs(self) -> list[Path]:
        return sorted(p for p in (self.home / "logs").glob("worker-*.log") if "callbacks" not in p.name)


@contextmanager
def convtune_up(
    redis_url: str, cpu_workers: int = 2, extra_env: dict[str, str] | None = None, home: Path | None = None,
    mlflow_port: int | None = None, wait_workers: bool = False,
) -> Iterator[Stack]:
    """``convtune up --cpu-workers N`` as a user starts it (the CLI's own code path, in a process of its own).

    Redis is the benchmark's (``CONVTUNE_REDIS_URL``); the stack starts its own MLflow server
    (sqlite, one server worker), its workers and the API. ``extra_env`` is exported before the
    command, as a user would (e.g. ``OMP_NUM_THREADS``). ``mlflow_port``: where an MLflow server of the
    caller's already answers (``convtune up`` then uses it). ``wait_workers``: return only once every
    training worker has logged ``ready.`` too. Stopped with SIGTERM (the stack stops its children
    itself), then SIGKILL to its group.
    """
    home = home or Path(tempfile.mkdtemp(prefix="convtune-bench-"))
    api_port, mlflow_port = free_port(), mlflow_port or free_port()
    argv = [sys.executable, "-c", "from service.cli import main; main()", "up", "--home", str(home), "--api-port", str(api_port),
            "--mlflow-port", str(mlflow_port), "--cpu-workers", str(cpu_workers)]
    env = {**os.environ, "CONVTUNE_REDIS_URL": redis_url, "MLFLOW_DISABLE_TELEMETRY": "true", **(extra_env or {})}
    home.mkdir(parents=True, exist_ok=True)
    out = open(home / "up.log", "ab")  # noqa: SIM115 - closed below
    popen = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    stack = Stack(f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{mlflow_port}", redis_url, home, popen)
    t0 = time.monotonic()
    try:
        ready = wait_until(lambda: popen.poll() is not None or _http_ok(f"{stack.api_url}/readyz"), 240, 0.5)
        if not ready or popen.poll() is not None:
            raise RuntimeError(f"convtune up did not become ready; {home / 'up.log'}:\n{_tail(home / 'up.log')}")

        def workers_ready() -> bool:
            logs = stack.worker_logs()
            return bool(logs) and all(" ready." in p.read_text(errors="replace") for p in logs)

        if wait_workers and not wait_until(workers_ready, 120, 0.5):
            note(f"warning: not every worker logged 'ready.' within 120 s ({home / 'logs'})")
        note(f"convtune up --cpu-workers {cpu_workers}: ready in {time.monotonic() - t0:.1f}s (home {home})")
        yield stack
    finally:
        if popen.poll() is None:
            popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(timeout=60)
            except subprocess.TimeoutExpired:
                _kill(popen.pid, signal.SIGKILL)
                popen.wait()
        out.close()


@contextmanager
def mlflow_server(home: Path | None = None) -> Iterator[str]:
    """An ``mlflow server`` as ``convtune up`` starts one (sqlite, local artifacts, one server worker); its URL."""
    from service.stack.supervisor import Stack as Supervisor
    from service.stack.supervisor import StackConfig

    home = home or Path(tempfile.mkdtemp(prefix="convtune-bench-mlflow-"))
    supervisor = Supervisor(StackConfig(home=home, mlflow_port=free_port()), say=note)
    try:
        supervisor.start_mlflow()
        yield supervisor.config.mlflow_url
    finally:
        supervisor.down()


def process_cpu(root: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of ``root`` and its descendants, by role: the MLflow server
    (``mlflow server`` and its uvicorn), the workers (Celery), the API (gunicorn), other. Linux /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2 :].split()  # after the command name, which may hold spaces
        stats[int(entry)] = fields
        children.setdefault(int(fields[1]), []).append(int(entry))
    by_role: dict[str, float] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        if pid not in stats:
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        role = next((r for r, marks in _ROLES if any(m in cmdline for m in marks)), "other")
        by_role[role] = by_role.get(role, 0.0) + (int(stats[pid][11]) + int(stats[pid][12])) / ticks
    return by_role


_ROLES = (("mlflow server", ("mlflow server", "-m mlflow", "uvicorn")), ("workers", ("celery",)), ("api", ("gunicorn",)))


def cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {role: after.get(role, 0.0) - before.get(role, 0.0) for role in after}


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# --- output ----------------------------------------------------------------------------------------


@dataclass
class Target:
    """A figure's goal: ``value`` must be ``op`` (">=" or "<=") ``bound``; None when it could not be measured."""

    value: float | None
    op: str
    bound: float

    @property
    def met(self) -> bool:
        if self.value is None or math.isnan(self.value):
            return False
        return self.value >= self.bound if self.op == ">=" else self.value <= self.bound

    def as_json(self) -> dict[str, Any]:
        value = None if self.value is None or math.isnan(self.value) else round(self.value, 4)
        return {"target": f"{self.op} {self.bound:g}", "value": value, "met": self.met}


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A Markdown table on stdout (numbers right-aligned), under its title."""
    shown = [[_cell(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in shown)) if shown else len(h) for i, h in enumerate(headers)]
    numeric = [all(_is_number(row[i]) for row in rows) and bool(rows) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)) + " |"

    print(f"\n{title}\n")
    print(line(headers))
    print("|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)) + "|")
    for row in shown:
        print(line(row))
    print(flush=True)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def emit(bench: str, figures: dict[str, Any], targets: dict[str, Target]) -> None:
    """Print the benchmark's figures and targets as one JSON object: the last line of its output."""
    for name, t in targets.items():
        print(f"  target {name}: {t.as_json()['value']} {t.op} {t.bound:g}: {'met' if t.met else 'NOT met'}")
    print(json.dumps({"bench": bench, "figures": _rounded(figures), "targets": {k: t.as_json() for k, t in targets.items()}}), flush=True)


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value
