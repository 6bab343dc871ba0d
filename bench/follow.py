"""What following a trial costs the tracking server: polling GET against the trial's event stream.

``convtune up`` (gunicorn, Redis, a Celery worker) runs against an ``mlflow server`` of this
benchmark's own, reached through a counting proxy: every MLflow request of the API and the worker
goes through it and is counted. Each trial is submitted, then:

  unfollowed   the benchmark waits on MLflow directly (not through the proxy): what the trial costs
               by itself (the submit, the worker's requests)
  polling      ``wait_trial(stream=False)``: GET /trials/{id} every 0.5 s, as the client did before
  events       ``wait_trial()``: GET /trials/{id}/events (server-sent events), one GET at the end

It also shows how soon each follower returns after the run ended in MLflow (its end time). A trial's
duration varies with the machine's load, so compare requests per trial, not seconds.

The proxy tells the API's requests from the worker's by the process that holds each connection
(Linux /proc); what following costs is the API's count in each mode minus the unfollowed trial's
(its submit). The worker's own count varies by a few requests from one trial to the next.
Target: events cost <= 0.25x polling's MLflow requests for a trial of ``--epochs`` epochs.

    python bench/follow.py [--quick] [--epochs 20] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Target, convtune_up, emit, free_port, median, mlflow_server, note, print_table, private_redis

if TYPE_CHECKING:
    from typing_extensions import Self

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "te", "trailer", "upgrade"}


def _process_of(port: int) -> str:
    """The command line of the local process whose TCP connection leaves from ``port`` (Linux /proc), or "?"."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return "?"


class CountingProxy:
    """An HTTP proxy in front of the MLflow server that counts the requests it forwards: all, and the API's."""

    def __init__(self, upstream: str):
        import httpx

        self.count, self.api_count, self.lock, self.port = 0, 0, threading.Lock(), free_port()
        self._from_api: dict[int, bool] = {}  # client port -> whether the API's process holds it (keep-alive: a few lookups)
        http = httpx.Client(base_url=upstream, timeout=60)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as MLflow's client expects

            def forward(self) -> None:
                port = self.client_address[1]
                if port not in proxy._from_api:
                    proxy._from_api[port] = "gunicorn" in _process_of(port)
                with proxy.lock:
                    proxy.count += 1
                    proxy.api_count += proxy._from_api[port]
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP and k.lower() != "host"}
                answer = http.request(self.command, self.path, content=body, headers=headers)
                self.send_response(answer.status_code)
                for key, value in answer.headers.items():
                    if key.lower() not in HOP_BY_HOP:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = forward

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def follow_one(client: Any, mlflow: Any, proxy: CountingProxy, spec: dict[str, Any], mode: str) -> tuple[int, int, float, float]:
    """Submit one trial and follow it as ``mode`` says.

    (MLflow requests, of which the API's, seconds, seconds from its end in MLflow to the follower's return).
    """
    before, api_before, t0 = proxy.count, proxy.api_count, time.monotonic()
    trial_id = client.submit_trial(spec)["id"]
    if mode == "unfollowed":
        while mlflow.get_run(trial_id).info.status not in ("FINISHED", "FAILED", "KILLED"):
            time.sleep(0.2)
        returned = time.time()
        time.sleep(0.5)  # the worker's last requests (usage, checkpoints) after the ending
    else:
        done = client.wait_trial(trial_id, stream=mode == "events")
        if done["status"] != "succeeded":
            raise RuntimeError(f"trial {trial_id} {done['status']}: {done.get('reason')}")
        returned = time.time()
        time.sleep(0.5)
    lag = returned - mlflow.get_run(trial_id).info.end_time / 1000
    return proxy.count - before, proxy.api_count - api_before, time.monotonic() - t0, lag


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    epochs, repeats = (4, 1) if args.quick else (args.epochs, args.repeats)
    spec = {"model": {"channels": [8, 16], "convs_per_stage": 1}, "optim": {"lr": 3e-3, "epochs": epochs, "batch_size": 64}, "data": {"name": "digits"}}

    from mlflow.tracking import MlflowClient

    from service.client import ConvtuneClient

    modes = ("unfollowed", "polling", "events")
    counts: dict[str, list[int]] = {m: [] for m in modes}
    api: dict[str, list[int]] = {m: [] for m in modes}
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    lags: dict[str, list[float]] = {m: [] for m in modes}
    with (
        private_redis() as redis_url, mlflow_server() as mlflow_url, CountingProxy(mlflow_url) as proxy,
        convtune_up(redis_url, 1, mlflow_port=proxy.port, wait_workers=True) as stack, ConvtuneClient(stack.api_url) as client,
    ):
        mlflow = MlflowClient(mlflow_url)  # straight to the server: the benchmark's own reads are not counted
        follow_one(client, mlflow, proxy, spec, "unfollowed")  # warm-up: the worker's once-per-process costs
        for repeat in range(repeats):
            for mode in modes if repeat % 2 == 0 else modes[::-1]:
                n, by_api, s, lag = follow_one(client, mlflow, proxy, spec, mode)
                counts[mode].append(n)
                api[mode].append(by_api)
                seconds[mode].append(s)
                lags[mode].append(lag)
                note(f"{mode}: {n} MLflow requests ({by_api} by the API) in {s:.1f}s; returned {lag:.2f}s after the run ended")
    base = median(api["unfollowed"])  # the submit
    cost = {m: median(api[m]) - base for m in ("polling", "events")}
    print_table(
        f"MLflow requests per trial ({epochs} epochs, median of {repeats})",
        ["mode", "requests", "by the API", "by the API to follow", "seconds", "end -> return (s)"],
        [[m, median(counts[m]), median(api[m]), "-" if m == "unfollowed" else cost[m], round(median(seconds[m]), 1), round(median(lags[m]), 2)] for m in modes],
    )
    ratio = cost["events"] / cost["polling"] if cost["polling"] > 0 else None
    figures = {"epochs": epochs, "requests": {m: median(counts[m]) for m in modes}, "api_requests": {m: median(api[m]) for m in modes}, "following": cost, "seconds": {m: median(seconds[m]) for m in modes}, "lag_s": {m: median(lags[m]) for m in modes}}
    emit("follow", figures, {"events_vs_polling_requests": Target(ratio, "<=", 0.25)})


if __name__ == "__main__":
    main()
