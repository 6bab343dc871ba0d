"""Callbacks: the event POSTed to a spec's ``callback_url`` when a trial ends, and its signature.

Deliveries follow Standard Webhooks (https://www.standardwebhooks.com): ``webhook-id`` is the event's
``delivery_id`` (the same on every retry of one event, so a receiver drops duplicates),
``webhook-timestamp`` is unix seconds and ``webhook-signature`` is ``v1,<base64 HMAC-SHA256(key,
f"{id}.{timestamp}.{body}")>``, several space-separated while a key rotates. Each team has its own
key, derived from the service's secret key (:func:`webhook_key`; nothing new to store), shown to
the team as ``whsec_<base64 key>``: one team's receiver cannot be sent an event signed for another.
The body is compact JSON and names the ``team`` and the ``destination`` (the URL it was POSTed to),
so a delivery replayed to another receiver says so. A receiver verifies with any Standard Webhooks
library, or with :func:`verify_signature` here, over the raw body, and rejects stale timestamps.
This module is torch-free: the API, the workers and receivers written in Python use it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, field_validator

__all__ = [
    "DEFAULT_PORTS", "DEFAULT_TEAM", "ID_HEADER", "SIGNATURE_HEADER", "TIMESTAMP_HEADER", "CallbackDestinations", "delivery_body",
    "destination_problem", "embedded_ipv4", "shown_url", "signed_headers", "study_ended_event", "trial_ended_event", "verify_signature",
    "webhook_key", "webhook_secret",
]

ID_HEADER = "webhook-id"
TIMESTAMP_HEADER = "webhook-timestamp"
SIGNATURE_HEADER = "webhook-signature"
EVENT_HEADER = "X-Convtune-Event"
# The team whose key signs callbacks when there are no teams (authentication off).
DEFAULT_TEAM = "default"
SECRET_PREFIX = "whsec_"


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
    # ::ffff:127.0.0.1 is 127.0.0.1; 64:ff9b::7f00:1 (NAT64), 2002:7f00:1:: (6to4)... lead there too: judge each.
    judged = embedded_ipv4(ip) if ip.version == 6 and ip.ipv4_mapped else [ip, *embedded_ipv4(ip)]
    for target in judged:
        if any(target in ipaddress.ip_network(net, strict=False) for net in allowed_networks):
            continue
        if not target.is_global or target.is_multicast or target in _NAT64_LOCAL:
            shown = str(target) if target == ip else f"{ip} (it leads to {target})"
            return f"{shown} is not a public address (private, loopback, link-local, multicast or reserved); CONVTUNE_CALLBACK_ALLOWED_NETWORKS can allow it"
        if ports is not None and port not in ports:
            return f"port {port} is not one callbacks may use ({', '.join(map(str, ports))}); CONVTUNE_CALLBACK_PORTS can allow it"
    return None


# IPv6 prefixes whose addresses carry an IPv4 address (in their last 32 bits) that a gateway forwards to:
# NAT64's well-known prefix (RFC 6052) and its local-use /48 (RFC 8215), which is never public (Python
# 3.12.4+ says so too; older ones call it global).
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
# IPv4-compatible addresses (::a.b.c.d, deprecated by RFC 4291 but still routed by some stacks).
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def embedded_ipv4(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address leads to (mapped, NAT64, 6to4, IPv4-compatible, Teredo's client); none for others.

    A private IPv4 address hidden in one of these is as internal as the plain one, so the filter judges it too.
    """
    if ip.version == 4:
        return []
    assert isinstance(ip, ipaddress.IPv6Address)
    last32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.ipv4_mapped:
        return [ip.ipv4_mapped]
    if ip.sixtofour:
        return [ip.sixtofour]
    if ip.teredo:
        return [ip.teredo[1]]  # (server, client): the client is where the packets go
    if ip in _NAT64 or ip in _NAT64_LOCAL or (ip in _IPV4_COMPATIBLE and int(ip) > 1):  # :: and ::1 are themselves
        return [last32]
    return []


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


def webhook_key(secret_key: str, team: str | None, version: int = 1) -> bytes:
    """The key that signs ``team``'s callbacks (the ``default`` team's without teams): HMAC-SHA256 of the
    service's secret key over ``convtune-webhook:{team}:{version}``; a new ``version`` rotates it."""
    return hmac.new(secret_key.encode(), f"convtune-webhook:{team or DEFAULT_TEAM}:{version}".encode(), hashlib.sha256).digest()


def webhook_secret(key: bytes) -> str:
    """``key`` as Standard Webhooks libraries take it: ``whsec_<base64>``."""
    return SECRET_PREFIX + base64.b64encode(key).decode()


def delivery_body(event: Mapping[str, Any], team: str | None, destination: str) -> bytes:
    """The body POSTed to ``destination``: the event, with the team it is for and where it goes, signed with it."""
    return encode({**event, "team": team or DEFAULT_TEAM, "destination": destination})


def signed_headers(keys: Sequence[bytes], webhook_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    """The Standard Webhooks headers of one delivery of ``body``, signed with each of ``keys`` (current first)."""
    t = int(time.time()) if timestamp is None else timestamp
    return {ID_HEADER: webhook_id, TIMESTAMP_HEADER: str(t), SIGNATURE_HEADER: " ".join(_signature(k, webhook_id, t, body) for k in keys)}


def verify_signature(
    secret: str | bytes, headers: Mapping[str, str], body: bytes, *, destination: str | None = None, tolerance_s: int = 300,
) -> bool:
    """True when ``headers`` sign ``body`` with ``secret`` (``whsec_...`` or the raw key) at most ``tolerance_s`` ago
    (or ahead), and, when ``destination`` is given, the body says it was sent there (not replayed from elsewhere)."""
    found = {k.lower(): v for k, v in headers.items()}
    webhook_id, stamp, given = found.get(ID_HEADER), found.get(TIMESTAMP_HEADER, ""), found.get(SIGNATURE_HEADER, "")
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True) if isinstance(secret, str) else secret
        if not webhook_id or not key or len(stamp) > 20 or not stamp.isdigit():  # int() of thousands of digits is slow
            return False
        t = int(stamp)
    except (ValueError, binascii.Error):
        return False
    if abs(time.time() - t) > tolerance_s:
        return False
    expected = _signature(key, webhook_id, t, body).encode()
    if not any(hmac.compare_digest(expected, candidate.encode("utf-8", "replace")) for candidate in given.split(" ")):
        return False
    if destination is None:
        return True
    try:
        return json.loads(body).get("destination") == destination
    except (ValueError, AttributeError):
        return False


def _signature(key: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


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
