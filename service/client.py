"""A small Python client of the convtune API, used by the CLI and importable by other services.

    with ConvtuneClient("http://127.0.0.1:8000", token=os.environ["CONVTUNE_TOKEN"]) as client:
        trial = client.submit_trial({"optim": {"lr": 3e-3, "epochs": 5}})
        done = client.wait_trial(trial["id"])

``wait_trial``, ``wait_study`` and ``wait_lr_find`` follow the run's server-sent events
(:meth:`ConvtuneClient.events`: a snapshot, then each change as it happens, one GET at the end)
instead of polling GET; where there is no stream (an API without it answers 404, one serving as many
streams as it may answers 503, or it cannot be reached) they poll as before. A dropped stream is
reconnected with the last event's id, so nothing is missed or seen twice.

Answers of 429 and 503 are retried (by tenacity), waiting what ``Retry-After`` says (capped), up to
``retries`` times; so is a connection that could not be made, with exponential backoff. Every submit
carries an ``Idempotency-Key`` generated once per call, so a retried POST never creates a second trial. Error answers raise
:class:`ApiProblem` (with the problem document), no answer at all :class:`Unreachable`:

    ClientError                   what this client raises (not a ConvtuneError: the client imports nothing of models)
     +-- ApiProblem               the API answered with a problem document (4xx/5xx)
     +-- Unreachable              the API did not answer at all
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
from tenacity import RetryCallState, Retrying, retry_if_exception_type, retry_if_result, stop_after_attempt, wait_exponential

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["FINAL_STATUSES", "STUDY_FINAL_STATES", "ApiProblem", "ClientError", "ConvtuneClient", "Event", "Unreachable", "merge_event", "parse_sse"]

# What the API reports once nothing more will happen: a trial's or lr-find run's ``status``, a study's
# ``state``. (MLflow's own run statuses, FINISHED/FAILED/KILLED, are another vocabulary.)
FINAL_STATUSES = ("succeeded", "pruned", "failed", "cancelled")
STUDY_FINAL_STATES = ("succeeded", "failed", "cancelled")
RETRIED_STATUSES = (429, 503)
# The path of each kind of work's event stream.
EVENT_PATHS = {"trial": "/trials/{}/events", "study": "/studies/{}/events", "lr-find": "/lr-finder/{}/events"}
STREAM_READ_TIMEOUT_S = 60.0  # a stream sends a keep-alive every 15 s (the API's default): silence this long is a dropped connection
SHORT_STREAM_S = 5.0  # a stream closed sooner than this without an ending counts as a failed connection (backoff, then give up)


class ClientError(Exception):
    """Base of what the client raises about the API's answers (or their absence)."""


class ApiProblem(ClientError):
    """The API answered with a problem document (4xx/5xx)."""

    def __init__(self, status: int, problem: dict[str, Any]):
        self.status = status
        self.problem = problem
        detail = problem.get("detail") or problem.get("title") or f"HTTP {status}"
        errors = problem.get("errors") or []
        lines = [f"{e.get('field') or '(body)'}: {e.get('message')}" for e in errors]
        super().__init__("\n  ".join([f"{status} {detail}", *lines]))


class Unreachable(ClientError):
    """The API did not answer at all."""


@dataclass(frozen=True)
class Event:
    """One server-sent event: its id (None on a snapshot, or an ending the API made from MLflow), its kind, its data."""

    id: str | None
    kind: str
    data: dict[str, Any] = field(default_factory=dict)


def parse_sse(lines: Iterable[str]) -> Iterator[Event | None]:
    """The events of a text/event-stream, given its lines; None for each comment (a keep-alive)."""
    event_id, kind, data = None, "", []
    for line in lines:
        if not line:
            if data or kind:
                text = "\n".join(data)
                try:
                    value = json.loads(text) if text else {}
                except ValueError:
                    value = {"text": text}
                yield Event(event_id, kind or "message", value if isinstance(value, dict) else {"value": value})
            event_id, kind, data = None, "", []
            continue
        if line.startswith(":"):
            yield None
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "id":
            event_id = value or None
        elif name == "event":
            kind = value
        elif name == "data":
            data.append(value)
        # "retry" and unknown fields: ignored, as the standard says


def merge_event(current: dict[str, Any], event: Event) -> dict[str, Any]:
    """``current`` (a trial, study or range test as GET shows it) with ``event`` applied, for progress displays.

    An approximation between two reads (a study's best is not recomputed); the GET at the end is the record.
    """
    data, merged = event.data, dict(current)
    if event.kind in ("status", "ended"):
        merged.update({k: data[k] for k in ("status", "state", "outcome", "reason") if k in data})
    elif event.kind == "epoch":
        merged["status"] = "running"
        merged["epochs_done"] = data.get("epoch", merged.get("epochs_done"))
        merged["metrics"] = {**(merged.get("metrics") or {}), **(data.get("metrics") or {})}
    elif event.kind in ("trial_started", "trial_ended"):
        progress = dict(merged.get("progress") or {})
        running = int(progress.get("running") or 0)
        if event.kind == "trial_started":
            progress["running"] = running + 1
        else:
            progress["running"] = max(0, running - 1)
            progress["finished"] = int(progress.get("finished") or 0) + 1
        merged["progress"] = progress
    return merged


class WaitRetryAfter:
    """A tenacity wait: what a 429/503 answer's ``Retry-After`` says, else exponential backoff; at most ``max_s``.

    Backoff is 1, 2, 4 s ... after an answer without a usable ``Retry-After``, and 0.5, 1, 2 s ... after
    a failed connection.
    """

    def __init__(self, max_s: float):
        self.max_s = max_s
        self.busy_backoff = wait_exponential(multiplier=1.0, max=max_s)
        self.connect_backoff = wait_exponential(multiplier=0.5, max=max_s)

    def __call__(self, state: RetryCallState) -> float:
        assert state.outcome is not None, "tenacity asks for a wait only after an attempt"
        if state.outcome.failed:
            return self.connect_backoff(state)
        try:
            wait = float(state.outcome.result().headers.get("Retry-After", ""))
        except ValueError:
            return self.busy_backoff(state)
        return max(0.0, min(wait, self.max_s))


class ConvtuneClient:
    """Calls the convtune API; every error answer raises :class:`ApiProblem`."""

    def __init__(
        self, base_url: str, token: str | None = None, timeout_s: float = 30.0, retries: int = 5, max_retry_wait_s: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s, transport=transport)
        self.retries = retries
        self.max_retry_wait_s = max_retry_wait_s
        self.sleep: Callable[[float], None] = time.sleep  # how a retry waits (a test records the waits instead)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    def _call_text(self, method: str, path: str, **kwargs: Any) -> str:
        return self._request(method, path, **kwargs).text

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        retrying = Retrying(
            # A connection never made is safe to retry; a POST whose answer was lost is too,
            # since every creating POST carries its Idempotency-Key.
            retry=retry_if_exception_type(httpx.TransportError) | retry_if_result(lambda r: r.status_code in RETRIED_STATUSES),
            stop=stop_after_attempt(self.retries + 1),
            wait=WaitRetryAfter(self.max_retry_wait_s),
            sleep=lambda seconds: self.sleep(seconds),
            # Out of retries: the last answer (a 429/503, raised below as a problem) or the last connection error.
            retry_error_callback=lambda state: state.outcome.result(),
        )
        try:
            response = retrying(self.http.request, method, path, **kwargs)
        except httpx.TransportError as exc:
            raise Unreachable(f"convtune API at {self.http.base_url} is unreachable: {exc}") from exc
        if response.status_code >= 400:
            raise _problem(response)
        return response

    def _create(self, path: str, body: dict[str, Any], idempotency_key: str | None) -> dict[str, Any]:
        return self._call("POST", path, json=body, headers={"Idempotency-Key": idempotency_key or uuid.uuid4().hex})

    # trials
    def submit_trial(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        return self._create("/trials", spec, idempotency_key)

    def get_trial(self, trial_id: str) -> dict[str, Any]:
        return self._call("GET", f"/trials/{trial_id}")

    def list_trials(
        self, status: str | None = None, limit: int = 50, page_token: str | None = None, *, study: str | None = None, team: str | None = None,
        owner: str | None = None, tag: str | None = None, since: str | float | None = None, until: str | float | None = None,
    ) -> dict[str, Any]:
        """One page of trials, newest first, filtered (``tag``: ``KEY=VALUE``; ``since``/``until``: ISO 8601 or Unix seconds)."""
        filters = {"status": status, "study": study, "team": team, "owner": owner, "tag": tag, "since": since, "until": until}
        params = {k: v for k, v in {**filters, "limit": limit, "page_token": page_token}.items() if v is not None}
        return self._call("GET", "/trials", params=params)

    def logs(self, run_id: str, kind: str = "trial") -> str:
        """A trial's (``kind`` ``lr-find``: a range test's) own log lines as the worker recorded them, every attempt's."""
        path = {"trial": f"/trials/{run_id}/logs", "lr-find": f"/lr-finder/{run_id}/logs"}[kind]
        return self._call_text("GET", path)

    def list_studies(
        self, status: str | None = None, limit: int = 20, page_token: str | None = None, *, team: str | None = None, owner: str | None = None,
        tag: str | None = None, since: str | float | None = None, until: str | float | None = None,
    ) -> dict[str, Any]:
        """One page of studies, newest first, filtered as :meth:`list_trials`."""
        filters = {"status": status, "team": team, "owner": owner, "tag": tag, "since": since, "until": until}
        params = {k: v for k, v in {**filters, "limit": limit, "page_token": page_token}.items() if v is not None}
        return self._call("GET", "/studies", params=params)

    def cancel_trial(self, trial_id: str) -> dict[str, Any]:
        return self._call("POST", f"/trials/{trial_id}/cancel")

    # studies
    def create_study(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        return self._create("/studies", spec, idempotency_key)

    def get_study(self, study_id: str) -> dict[str, Any]:
        return self._call("GET", f"/studies/{study_id}")

    def cancel_study(self, study_id: str) -> dict[str, Any]:
        return self._call("POST", f"/studies/{study_id}/cancel")

    def extend_study(self, study_id: str, n_trials: int, warm_start: list[dict[str, Any]] | None = None, idempotency_key: str | None = None) -> dict[str, Any]:
        return self._create(f"/studies/{study_id}/extend", {"n_trials": n_trials, "warm_start": warm_start or []}, idempotency_key)

    def study_trials(self, study_id: str, limit: int = 1000) -> list[dict[str, Any]]:
        """Every trial of a study (number, trial_id, status, Optuna's state, outcome, value, params), page after page."""
        items: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            page = self._call("GET", f"/studies/{study_id}/trials", params={"limit": limit, **({"page_token": token} if token else {})})
            items.extend(page["items"])
            token = page.get("next_page_token")
            if not page["items"] or not token:
                return items

    # learning-rate range test
    def start_lr_find(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        return self._create("/lr-finder", spec, idempotency_key)

    def get_lr_find(self, finder_id: str, curve: bool = False) -> dict[str, Any]:
        return self._call("GET", f"/lr-finder/{finder_id}", params={"curve": str(curve).lower()})

    def cancel_lr_find(self, finder_id: str) -> dict[str, Any]:
        return self._call("POST", f"/lr-finder/{finder_id}/cancel")

    # compute accounting
    def usage(self, since: str | float | None = None, until: str | float | None = None) -> dict[str, Any]:
        """The compute used in [since, until) (ISO 8601 or Unix seconds; default the last 24 h), by team and device kind."""
        params = {k: str(v) for k, v in {"since": since, "until": until}.items() if v is not None}
        return self._call("GET", "/usage", params=params)

    def ready(self) -> dict[str, Any]:
        return self._call("GET", "/readyz")

    # following work as it happens
    def events(self, kind: str, run_id: str, last_event_id: str | None = None) -> Iterator[Event]:
        """The events of a ``kind`` ("trial", "study", "lr-find") as the API streams them, until its ``ended`` event.

        The first event of each connection is a ``snapshot`` (the run as GET shows it). A dropped
        connection, or one the API closed at its longest stream time, is made again with the last
        id seen (``Last-Event-ID``): nothing is missed or repeated. Raises ApiProblem on an error
        answer (an API without event streams answers 404), Unreachable when it cannot connect again.
        """
        return (event for event in self._stream(kind, run_id, last_event_id) if event is not None)

    def _stream(self, kind: str, run_id: str, last_event_id: str | None = None) -> Iterator[Event | None]:
        """:meth:`events`, with None for each keep-alive (a waiter checks its deadline then)."""
        path, last, failures = EVENT_PATHS[kind].format(run_id), last_event_id, 0
        timeout = httpx.Timeout(self.http.timeout.connect, read=max(STREAM_READ_TIMEOUT_S, self.http.timeout.read or 0), write=self.http.timeout.write, pool=self.http.timeout.pool)
        while True:
            opened, progressed = time.monotonic(), False
            headers = {"Accept": "text/event-stream", **({"Last-Event-ID": last} if last else {})}
            try:
                with self.http.stream("GET", path, headers=headers, timeout=timeout) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise _problem(response)
                    for event in parse_sse(response.iter_lines()):
                        yield event
                        if event is not None and event.id:
                            last, progressed = event.id, True
                        if event is not None and event.kind == "ended":
                            return
            except httpx.TransportError as exc:
                failures = 0 if progressed else failures + 1
                if failures > self.retries:
                    raise Unreachable(f"the event stream of {kind} {run_id} at {self.http.base_url} could not be read: {exc}") from exc
            else:  # closed without an ending: the API's longest stream time, or a stream it could not go on with
                failures = 0 if progressed or time.monotonic() - opened > SHORT_STREAM_S else failures + 1
                if failures > self.retries:
                    raise Unreachable(f"the event stream of {kind} {run_id} keeps closing without an ending")
            if failures:
                self.sleep(min(0.5 * 2 ** (failures - 1), self.max_retry_wait_s))

    def wait_trial(
        self, trial_id: str, timeout_s: float | None = None, poll_s: float = 0.5,
        on_update: Callable[[dict[str, Any]], None] | None = None, stream: bool = True,
    ) -> dict[str, Any]:
        """Follow the trial until it ends (its events, else polling); raises TimeoutError past ``timeout_s``."""
        return self._follow("trial", trial_id, lambda: self.get_trial(trial_id), FINAL_STATUSES, timeout_s, poll_s, on_update, stream=stream)

    def wait_study(
        self, study_id: str, timeout_s: float | None = None, poll_s: float = 1.0,
        on_update: Callable[[dict[str, Any]], None] | None = None, stream: bool = True,
    ) -> dict[str, Any]:
        """Follow the study until it ends (its ``state``; its events, else polling); raises TimeoutError past ``timeout_s``."""
        return self._follow("study", study_id, lambda: self.get_study(study_id), STUDY_FINAL_STATES, timeout_s, poll_s, on_update, key="state", stream=stream)

    def wait_lr_find(
        self, finder_id: str, timeout_s: float | None = None, poll_s: float = 0.5,
        on_update: Callable[[dict[str, Any]], None] | None = None, stream: bool = True,
    ) -> dict[str, Any]:
        """Follow the range test until it ends (its events, else polling); raises TimeoutError past ``timeout_s``."""
        return self._follow("lr-find", finder_id, lambda: self.get_lr_find(finder_id), FINAL_STATUSES, timeout_s, poll_s, on_update, stream=stream)

    def _follow(
        self, kind: str, run_id: str, fetch: Callable[[], dict[str, Any]], final: tuple[str, ...], timeout_s: float | None, poll_s: float,
        on_update: Callable[[dict[str, Any]], None] | None, key: str = "status", stream: bool = True,
    ) -> dict[str, Any]:
        """Follow the events of ``run_id`` to its ending, then GET it once; poll instead where there is no stream (or ``stream`` is False).

        The deadline is checked at each event and keep-alive (every 15 s on a quiet stream).
        """
        what = f"{kind} {run_id}"
        if not stream:
            return self._wait(fetch, final, what, timeout_s, poll_s, on_update, key=key)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        current: dict[str, Any] | None = None
        events = self._stream(kind, run_id)
        try:
            for event in events:
                if event is not None:
                    current = event.data if event.kind == "snapshot" else merge_event(current, event) if current is not None else None
                    if current is not None and on_update is not None:
                        on_update(current)
                    if event.kind == "ended":
                        break
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"{what} still {(current or {}).get(key, 'unknown')} after {timeout_s}s")
        except (ApiProblem, Unreachable):  # no stream here: poll, as an API without streams needs
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            return self._wait(fetch, final, what, left, poll_s, on_update, key=key)
        finally:
            events.close()  # its connection, when it stopped before the stream's end
        ended = fetch()
        if on_update is not None:
            on_update(ended)
        return ended

    def _wait(
        self, fetch: Callable[[], dict[str, Any]], final: tuple[str, ...], what: str, timeout_s: float | None, poll_s: float,
        on_update: Callable[[dict[str, Any]], None] | None, key: str = "status",
    ) -> dict[str, Any]:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            current = fetch()
            if on_update is not None:
                on_update(current)
            if current[key] in final:
                return current
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{what} still {current[key]} after {timeout_s}s")
            time.sleep(poll_s)


def _problem(response: httpx.Response) -> ApiProblem:
    """The ApiProblem of an error answer (its problem document, or the start of its text)."""
    try:
        problem = response.json()
    except ValueError:
        problem = {"detail": response.text[:500]}
    return ApiProblem(response.status_code, problem if isinstance(problem, dict) else {"detail": str(problem)[:500]})
