"""gunicorn settings for the API: ``gunicorn -c python:service.api.gunicorn_conf "service.api:create_app()"``.

Prometheus' multiprocess mode needs ``PROMETHEUS_MULTIPROC_DIR`` set before any worker imports
prometheus_client, an empty directory at start, and each dead worker's files marked dead; this
module does all three, so ``/metrics`` sums every worker process. Access lines are logged by the
app itself as JSON (``convtune.access``), so gunicorn's own access log is off.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

_dir = os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="convtune-prometheus-"))

accesslog = None
# Threads: an accept spends most of its time waiting on MLflow and Redis; with sync workers, 32 clients
# queued behind two processes (docs/performance.md, "Accepting work"). CONVTUNE_GUNICORN_THREADS=1 gives back one request per process.
worker_class = "gthread"
threads = int(os.environ.get("CONVTUNE_GUNICORN_THREADS", "4"))
# An event stream (service.api.events, GET .../events) holds one of these threads for as long as it is open
# (up to CONVTUNE_EVENTS_MAX_S): by default a process serves streams on half its threads, and answers 503 beyond
# (clients then poll), so the other half always serves everything else. Raise both together for many followers.
os.environ.setdefault("CONVTUNE_EVENTS_MAX_STREAMS", str(max(1, threads // 2)))
# Let a long MLflow call finish rather than kill the worker at gunicorn's default 30 s.
timeout = int(os.environ.get("CONVTUNE_GUNICORN_TIMEOUT", "60"))
# An idle keep-alive connection is closed by the client first: at gunicorn's default of 2 s the server
# closed connections that clients (httpx keeps them 5 s, load balancers 60 s) were sending a POST on at
# that moment, which they see as "Server disconnected without sending a response" and must not retry.
keepalive = int(os.environ.get("CONVTUNE_GUNICORN_KEEPALIVE", "75"))


def on_starting(server) -> None:  # noqa: ANN001 - gunicorn's hook signature
    """Start from an empty metrics directory: files of a previous run would be summed in."""
    path = Path(_dir)
    if path.exists():
        for child in path.iterdir():
            if child.is_file():
                child.unlink()
            else:
                shutil.rmtree(child, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)


def child_exit(server, worker) -> None:  # noqa: ANN001
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
