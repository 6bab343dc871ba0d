"""A small Python client of the convtune API, used by the CLI and importable by other services.

    with ConvtuneClient("http://127.0.0.1:8000", token=os.environ["CONVTUNE_TOKEN"]) as client:
        trial = client.submit_trial({"optim": {"lr": 3e-3, "epochs": 5}})
        done = client.wait_trial(trial["id"])

Answers of 429 and 503 are retried (by tenacity), waiting what ``Retry-After`` says (capped), up to
``retries`` times; so is a connection that could not be made, with exponential backoff. Every submit
carries an ``Idempotency-Key`` generated once per call, so a retried POST never creates a second trial. Error answers raise
:class:`ApiProblem` (with the problem document), no answer at all :class:`Unreachable`:

    ClientError                   what this client raises (not a ConvtuneError: the client imports nothing of models)
     +-- ApiProblem               the API answered with a problem document (4xx/5xx)
     +-- Unreachable              the API did not answer at all
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx
from tenacity import RetryCallState, Retrying, retry_if_exception_type, retry_if_result, stop_after_attempt, wait_exponential

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["FINAL_STATUSES", "STUDY_FINAL_STATES", "ApiProblem", "ClientError", "ConvtuneClient", "Unreachable"]

# What the API reports once nothing more will happen: a trial's or lr-find run's ``status``, a study's
# ``state``. (MLflow's own run statuses, FINISHED/FAILED/KILLED, are another vocabulary.)
FINAL_STATUSES = ("succeeded", "pruned", "failed", "cancelled")
STUDY_FINAL_STATES = ("succeeded", "failed", "cancelled")
RETRIED_STATUSES = (429, 503)


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
            try:
                problem = response.json()
            except ValueError:
                problem = {"detail": response.text[:500]}
            raise ApiProblem(response.status_code, problem)
        return response.json()

    def _create(self, path: str, body: dict[str, Any], idempotency_key: str | None) -> dict[str, Any]:
        return self._call("POST", path, json=body, headers={"Idempotency-Key": idempotency_key or uuid.uuid4().hex})

    # trials
    def submit_trial(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        return self._create("/trials", spec, idempotency_key)

    def get_trial(self, trial_id: str) -> dict[str, Any]:
        return self._call("GET", f"/trials/{trial_id}")

    def list_trials(self, status: str | None = None, limit: int = 50, page_token: str | None = None) -> dict[str, Any]:
        params = {k: v for k, v in {"status": status, "limit": limit, "page_token": page_token}.items() if v is not None}
        return self._call("GET", "/trials", params=params)

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
        """Every trial of a study (Optuna's view: number, trial_id, state, outcome, value, params)."""
        items: list[dict[str, Any]] = []
        while True:
            page = self._call("GET", f"/studies/{study_id}/trials", params={"offset": len(items), "limit": limit})
            items.extend(page["items"])
            if not page["items"] or len(items) >= page["total"]:
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

    def wait_trial(
        self, trial_id: str, timeout_s: float | None = None, poll_s: float = 0.5,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until the trial ends; raises TimeoutError past ``timeout_s``."""
        return self._wait(lambda: self.get_trial(trial_id), FINAL_STATUSES, f"trial {trial_id}", timeout_s, poll_s, on_update)

    def wait_study(
        self, study_id: str, timeout_s: float | None = None, poll_s: float = 1.0,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until the study ends (its ``state``); raises TimeoutError past ``timeout_s``."""
        return self._wait(lambda: self.get_study(study_id), STUDY_FINAL_STATES, f"study {study_id}", timeout_s, poll_s, on_update, key="state")

    def wait_lr_find(
        self, finder_id: str, timeout_s: float | None = None, poll_s: float = 0.5,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until the range test ends; raises TimeoutError past ``timeout_s``."""
        return self._wait(lambda: self.get_lr_find(finder_id), FINAL_STATUSES, f"lr-find {finder_id}", timeout_s, poll_s, on_update)

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
