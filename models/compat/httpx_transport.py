"""httpx: a transport whose connections go through a network backend of convtune's.

httpx's ``HTTPTransport`` takes no network backend; the httpcore ``ConnectionPool`` it keeps in
``HTTPTransport._pool`` does. The callback worker's guard (every address checked after DNS, before
connecting) is such a backend, so this module builds the transport and replaces its pool with one
on that backend (httpx's own TLS context). It assumes that the transport sends every request
through ``_pool`` and that httpcore's pool takes ``network_backend``.

Checked on httpx 0.29.0 with httpcore 1.0.9 (``tests/compat/test_httpx_transport.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from models.compat._base import CompatError

if TYPE_CHECKING:
    import httpcore
    import httpx

__all__ = ["transport_through"]

_LIBRARY = "httpx"


def transport_through(backend: httpcore.NetworkBackend) -> httpx.HTTPTransport:
    """An httpx transport (no proxy, httpx's TLS settings) that opens every connection with ``backend``."""
    import httpcore
    import httpx

    transport = httpx.HTTPTransport()
    if not isinstance(getattr(transport, "_pool", None), httpcore.ConnectionPool):
        raise CompatError(_LIBRARY, "HTTPTransport sends its requests through an httpcore.ConnectionPool in _pool", __name__,
                          f"its _pool is {type(getattr(transport, '_pool', None)).__name__}")
    transport._pool = httpcore.ConnectionPool(ssl_context=httpx.create_ssl_context(), network_backend=backend)
    return transport
