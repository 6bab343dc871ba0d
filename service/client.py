"""A small Python client of the convtune API, used by the CLI and importable by other services.

    client = ConvtuneClient("http://127.0.0.1:8000")
    trial = client.submit_trial({"optim": {"lr": 3e-3, "epochs": 5}})
    done = client.wait_trial(trial["id"])
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

__all__ = ["ApiProblem", "ConvtuneClient", "Unreachable", "TERMINAL_STATUSES"]

TERMINAL_STATUSES = ("succeeded", "pruned", "failed", "cancelled")


class ApiProblem(Exception):
    """The API answered with a problem document (4xx/5xx)."""

    def __init__(self, status: int, problem: dict[str, Any]):
        self.status = status
        self.problem = problem
        detail = problem.get("detail") or problem.get("title") or f"HTTP {status}"
        errors = problem.get("errors") or []
        lines = [f"{e.get('field') or '(body)'}: {e.get('message')}" for e in errors]
        super().__init__("\n  ".join([f"{status} {detail}", *lines]))


class Unreachable(Exception):
    """The API did not answer at all."""


class ConvtuneClient:
    """Calls the convtune API; every error answer raises :class:`ApiProblem`."""

    def __init__(self, base_url: str, token: str | None = None, timeout_s: float = 30.0):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ConvtuneClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise Unreachable(f"convtune API at {self.http.base_url} is unreachable: {exc}") from exc
        if response.status_code >= 400:
            try:
                problem = response.json()
            except ValueError:
                problem = {"detail": response.text[:500]}
            raise ApiProblem(response.status_code, problem)
        return response.json()

    def submit_trial(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/trials", json=spec)

    def get_trial(self, trial_id: str) -> dict[str, Any]:
        return self._call("GET", f"/trials/{trial_id}")

    def list_trials(self, status: str | None = None, limit: int = 50, page_token: str | None = None) -> dict[str, Any]:
        params = {k: v for k, v in {"status": status, "limit": limit, "page_token": page_token}.items() if v is not None}
        return self._call("GET", "/trials", params=params)

    def cancel_trial(self, trial_id: str) -> dict[str, Any]:
        return self._call("POST", f"/trials/{trial_id}/cancel")

    def ready(self) -> dict[str, Any]:
        return self._call("GET", "/readyz")

    def wait_trial(
        self, trial_id: str, timeout_s: float | None = None, poll_s: float = 0.5,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll until the trial ends; raises TimeoutError past ``timeout_s``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            trial = self.get_trial(trial_id)
            if on_update is not None:
                on_update(trial)
            if trial["status"] in TERMINAL_STATUSES:
                return trial
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"trial {trial_id} still {trial['status']} after {timeout_s}s")
            time.sleep(poll_s)
