"""The httpx internals models.compat.httpx_transport relies on: the transport's replaceable httpcore pool."""

from __future__ import annotations

from typing import Any

import httpcore
import httpx
import pytest

from models.compat import CompatError, httpx_transport


class _Refusing(httpcore.SyncBackend):
    """A network backend that records where it was asked to connect and connects nowhere."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, int]] = []

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None, socket_options: Any = None) -> Any:
        self.asked.append((host, port))
        raise httpcore.ConnectError(f"refused {host}:{port}")


@pytest.mark.parametrize(("url", "port"), [("http://callbacks.invalid/hook", 80), ("https://callbacks.invalid:8443/hook", 8443)])
def test_every_request_of_the_transport_connects_through_the_given_backend(url: str, port: int):
    backend = _Refusing()
    with httpx.Client(transport=httpx_transport.transport_through(backend), trust_env=False) as client, pytest.raises(httpx.ConnectError):
        client.post(url, content=b"{}")
    assert backend.asked == [("callbacks.invalid", port)]


def test_a_transport_without_its_pool_is_named_in_a_clear_error(monkeypatch: pytest.MonkeyPatch):
    class PoolLess(httpx.HTTPTransport):
        def __init__(self) -> None:
            super().__init__()
            del self._pool

    monkeypatch.setattr(httpx, "HTTPTransport", PoolLess)
    with pytest.raises(CompatError, match=r"httpx .* models\.compat\.httpx_transport assumes: HTTPTransport sends its requests through"):
        httpx_transport.transport_through(_Refusing())
