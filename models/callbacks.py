"""Callbacks: the event POSTed to a spec's ``callback_url`` when a trial ends, and its signature.

The body is compact JSON. The ``X-Convtune-Signature`` header is ``t=<unix seconds>,v1=<hex>``
where ``hex = HMAC-SHA256(secret, f"{t}.{body}")``; a receiver recomputes it over the raw body
(:func:`verify_signature`), compares in constant time and rejects stale timestamps, which stops
replays. ``X-Convtune-Delivery`` is the same for every retry of one event, so a receiver can drop
duplicates. This module is torch-free: the API, the workers and receivers written in Python use it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from datetime import datetime, timezone
from typing import Any

__all__ = ["SIGNATURE_HEADER", "sign", "study_ended_event", "trial_ended_event", "verify_signature"]

SIGNATURE_HEADER = "X-Convtune-Signature"
EVENT_HEADER = "X-Convtune-Event"
DELIVERY_HEADER = "X-Convtune-Delivery"


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The signature header's value for ``body``."""
    t = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


def verify_signature(secret: str, header: str, body: bytes, tolerance_s: int = 300) -> bool:
    """True when ``header`` signs ``body`` with ``secret`` and is at most ``tolerance_s`` old."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        if len(parts["t"]) > 20:  # no timestamp is that long (and int() of thousands of digits is slow)
            return False
        t = int(parts["t"])
        given = parts.get("v1", "").encode("ascii")
    except (KeyError, ValueError, UnicodeEncodeError):
        return False
    if abs(time.time() - t) > tolerance_s:
        return False
    expected = sign(secret, body, t).split("v1=", 1)[1].encode("ascii")
    return hmac.compare_digest(expected, given)


def trial_ended_event(
    trial_id: str, *, name: str | None, status: str, outcome: str, reason: str, metrics: dict[str, float], study_id: str | None = None,
) -> dict[str, Any]:
    """The ``trial.ended`` event: which trial, how it ended and its latest metrics."""
    return {
        "event": "trial.ended",
        "delivery_id": uuid.uuid4().hex,
        "sent_for": datetime.now(timezone.utc).isoformat(),
        "trial": {
            "id": trial_id, "name": name, "status": status, "outcome": outcome, "reason": reason,
            "metrics": metrics, "study_id": study_id,
        },
    }


def study_ended_event(
    study_id: str, *, name: str | None, state: str, outcome: str, reason: str, best: dict[str, Any] | None, counts: dict[str, int],
) -> dict[str, Any]:
    """The ``study.ended`` event: which study, how it ended, its best trial and trials per outcome."""
    return {
        "event": "study.ended",
        "delivery_id": uuid.uuid4().hex,
        "sent_for": datetime.now(timezone.utc).isoformat(),
        "study": {"id": study_id, "name": name, "state": state, "outcome": outcome, "reason": reason, "best": best, "counts": counts},
    }


def encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":"), sort_keys=True).encode()
