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
import ipaddress
import json
import time
import uuid
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, field_validator

__all__ = ["DEFAULT_PORTS", "CallbackDestinations", "shown_url", "SIGNATURE_HEADER", "destination_problem", "sign", "study_ended_event", "trial_ended_event", "verify_signature"]

SIGNATURE_HEADER = "X-Convtune-Signature"
EVENT_HEADER = "X-Convtune-Event"
DELIVERY_HEADER = "X-Convtune-Delivery"


# Ports a callback may go to on a public address (an operator-allowed network may use any port).
DEFAULT_PORTS = (80, 443)


def destination_problem(address: str, port: int, allowed_networks: list[str], ports: list[int] | None) -> str | None:
    """Why a callback may not be POSTed to ``address``:``port`` (None when it may).

    Callbacks leave from inside the network: without this, a token holder could aim them at a
    metadata service, Redis or an admin port. Private, loopback, link-local, multicast, reserved
    and unspecified addresses are refused unless they fall in an operator-allowed network; public
    addresses only on ``ports`` (None: any). The workers check the address they actually connect
    to, after DNS, so a name that resolves to a private address (rebinding) is refused too.
    """
    ip = ipaddress.ip_address(address)
    if getattr(ip, "ipv4_mapped", None):
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    if any(ip in ipaddress.ip_network(net, strict=False) for net in allowed_networks):
        return None
    if not ip.is_global or ip.is_multicast:
        return f"{ip} is not a public address (private, loopback, link-local, multicast or reserved); CONVTUNE_CALLBACK_ALLOWED_NETWORKS can allow it"
    if ports is not None and port not in ports:
        return f"port {port} is not one callbacks may use ({', '.join(map(str, ports))}); CONVTUNE_CALLBACK_PORTS can allow it"
    return None


class CallbackDestinations(BaseModel):
    """Where callbacks may go: settings the API (at submit) and the callback worker (at connect) share."""

    callback_allowed_networks: list[str] = Field(
        default_factory=list,
        description="Networks (CIDR, JSON list) callbacks may reach although not public, e.g. [\"10.20.0.0/16\"]; any port there.",
    )
    callback_ports: list[int] | None = Field(default=list(DEFAULT_PORTS), description="Ports callbacks may use on public addresses; null: any.")

    @field_validator("callback_allowed_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for net in value:
            ipaddress.ip_network(net, strict=False)  # ValueError names the bad one
        return value

    def destination_problem(self, address: str, port: int) -> str | None:
        return destination_problem(address, port, self.callback_allowed_networks, self.callback_ports)


def shown_url(url: str) -> str:
    """``url`` as logs may show it: scheme, host and port only (its path and query may hold a secret)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}/..."


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
