"""Callbacks reach public addresses only (unless an operator allows a network), checked where they connect."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import httpcore
import pytest

from models.callbacks import destination_problem, shown_url
from workers.callbacks.delivery import RefusedDestination, RetryableDelivery, post_event, resolve
from workers.settings import WorkerSettings

EVENT = {"event": "trial.ended", "delivery_id": "d-1", "trial": {"id": "t"}}
KEY = "test-secret-key"  # callbacks are signed: without a key nothing is sent


@pytest.mark.parametrize(("address", "port"), [
    ("127.0.0.1", 80), ("10.1.2.3", 443), ("172.16.0.1", 443), ("192.168.1.1", 80), ("169.254.169.254", 80),
    ("0.0.0.0", 80), ("224.0.0.1", 80), ("::1", 443), ("fe80::1", 443), ("::ffff:127.0.0.1", 80), ("100.64.0.1", 80),
])
def test_non_public_addresses_are_refused_by_default(address: str, port: int):
    assert "not a public address" in destination_problem(address, port, [], [80, 443])


def test_public_addresses_only_on_allowed_ports_and_allowed_networks_on_any():
    assert destination_problem("93.184.216.34", 443, [], [80, 443]) is None
    assert "port 6379" in destination_problem("93.184.216.34", 6379, [], [80, 443])
    assert destination_problem("93.184.216.34", 6379, [], None) is None
    assert destination_problem("10.1.2.3", 8080, ["10.0.0.0/8"], [80, 443]) is None


def test_a_name_that_resolves_to_a_private_address_is_refused_where_it_connects(monkeypatch):
    # DNS rebinding: the name looked public when submitted; what counts is the address connected to.
    real = socket.getaddrinfo
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **k: real("127.0.0.1", *a, **k) if host == "hooks.example.com" else real(host, *a, **k))
    with pytest.raises(RefusedDestination, match="hooks.example.com resolves to 127.0.0.1"):
        post_event("http://hooks.example.com/hook?token=x", EVENT, WorkerSettings(callback_allowed_networks=[], secret_key=KEY))


def test_an_allowed_network_is_reached():
    received: list[bytes] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            received.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None: ...

    server = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.handle_request, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/hook"
        with pytest.raises(RefusedDestination):
            post_event(url, EVENT, WorkerSettings(callback_allowed_networks=[], secret_key=KEY))
        assert post_event(url, EVENT, WorkerSettings(callback_allowed_networks=["127.0.0.0/8"], secret_key=KEY), "team-a") == 204
        assert received and b"trial.ended" in received[0]
        assert json.loads(received[0])["team"] == "team-a" and json.loads(received[0])["destination"] == url
    finally:
        server.server_close()


def test_without_a_secret_key_nothing_is_sent():
    with pytest.raises(RefusedDestination, match="no secret key"):
        post_event("http://127.0.0.1:9/hook", EVENT, WorkerSettings(callback_allowed_networks=["127.0.0.0/8"], secret_key=None, callback_secret=None))


def test_a_dns_lookup_that_hangs_is_given_up_in_time_and_retried_later(monkeypatch):
    # A black-hole domain: getaddrinfo blocks (for as long as the OS resolver tries). The delivery waits
    # callback_resolve_timeout_s, then is retried later like a connection error; its thread is free again.
    release = threading.Event()
    real = socket.getaddrinfo

    def hanging(host, *args, **kwargs):
        if host == "black-hole.example":
            release.wait(30)
            raise socket.gaierror("gave up")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    settings = WorkerSettings(callback_allowed_networks=[], secret_key=KEY, callback_resolve_timeout_s=0.3)
    try:
        started = time.monotonic()
        with pytest.raises(RetryableDelivery, match="did not resolve within 0.3s"):
            post_event("https://black-hole.example/hook", EVENT, settings)
        assert time.monotonic() - started < 5
        with pytest.raises(httpcore.ConnectTimeout):
            resolve("black-hole.example", 443, 0.1)
    finally:
        release.set()
    assert resolve("127.0.0.1", 80, 5) == ["127.0.0.1"]  # other names still resolve


def test_logs_show_only_where_a_callback_goes():
    assert shown_url("https://user:pw@hooks.example.com:8443/x/y?token=s3cret") == "https://hooks.example.com:8443/..."
