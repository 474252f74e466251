"""The HTTP client that makes webhook attempts: it resolves each host itself, checks every address it
got, and connects only to those (resolve, then pin), so a name that answers one thing to a check and
another to the connection (DNS rebinding) cannot reach a private address. And the short error classes
the delivery log keeps instead of bodies and socket messages.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterable
from concurrent.futures import Executor

import httpcore
import httpx

from ledger.control.webhook_urls import Unresolvable, UnsafeURL, check_addresses, resolve

# Connecting and each read or write are bounded; the whole attempt is bounded again by the dispatcher.
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 10.0
USER_AGENT = "usage-ledger-webhooks/1"


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, with the host resolved and (unless private addresses are allowed) checked here.

    The TLS handshake and the Host header still use the URL's host name: httpcore passes it to
    ``start_tls`` and the request, only the TCP connection goes to the checked address.
    """

    def __init__(self, *, allow_private: bool, executor: Executor | None = None) -> None:
        self.allow_private = allow_private
        self.executor = executor
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                          socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None
                          ) -> httpcore.AsyncNetworkStream:
        addresses = await resolve(host, port, executor=self.executor)
        if not self.allow_private:
            check_addresses(host, addresses)
        failure: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                                     socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None  # resolve() never answers an empty list
        raise failure

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None
                                  ) -> httpcore.AsyncNetworkStream:
        raise UnsafeURL("url: unix sockets are not webhook endpoints")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class GuardedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport with its connection pool on a GuardedBackend (httpx takes no backend of its own)."""

    def __init__(self, *, allow_private: bool, connections_max: int, executor: Executor | None = None) -> None:
        super().__init__(trust_env=False)  # never through a proxy from the environment: it would connect for us
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(), max_connections=connections_max,
            max_keepalive_connections=connections_max, keepalive_expiry=5.0,
            network_backend=GuardedBackend(allow_private=allow_private, executor=executor))


def delivery_client(*, allow_private: bool, connections_max: int, executor: Executor | None = None
                    ) -> httpx.AsyncClient:
    """The client of the delivery process. No redirects: a 3xx is a failure (the spec's advice), and a
    redirect could lead anywhere."""
    return httpx.AsyncClient(
        transport=GuardedTransport(allow_private=allow_private, connections_max=connections_max, executor=executor),
        timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S), follow_redirects=False, trust_env=False,
        headers={"user-agent": USER_AGENT})


# What the delivery log says of a failed attempt (besides `http_<status>`): never a body, a socket message or an
# address, so a tenant learns nothing about the services the delivery process can see.
ERROR_CLASSES = ("timeout", "connect_refused", "connect_error", "tls_error", "dns_error", "unsafe_address",
                 "invalid_url", "protocol_error", "network_error", "internal_error")


def _chain(exc: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def error_class(exc: BaseException) -> str:
    """The short class of what broke an attempt, one of ERROR_CLASSES."""
    chain = list(_chain(exc))
    for e in chain:
        if isinstance(e, UnsafeURL):
            return "dns_error" if isinstance(e, Unresolvable) else "unsafe_address"
    for e in chain:
        if isinstance(e, TimeoutError | httpx.TimeoutException | httpcore.TimeoutException):
            return "timeout"
        if isinstance(e, ssl.SSLError | ssl.CertificateError):
            return "tls_error"
        if isinstance(e, socket.gaierror):
            return "dns_error"
        if isinstance(e, ConnectionRefusedError):
            return "connect_refused"
    if isinstance(exc, httpx.InvalidURL | httpx.UnsupportedProtocol):
        return "invalid_url"
    if isinstance(exc, httpx.ConnectError):
        return "connect_error"
    if isinstance(exc, httpx.RemoteProtocolError | httpx.LocalProtocolError):
        return "protocol_error"
    if isinstance(exc, httpx.TransportError | OSError):
        return "network_error"
    return "internal_error"
