"""Which webhook URLs the delivery process may call: http(s) only, and, unless the settings allow
them, no loopback, private, link-local or otherwise non-public address (server-side request forgery)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

from ledger.control.store import WEBHOOK_URL_LENGTH_MAX

SCHEMES = ("http", "https")
RESOLVE_TIMEOUT_S = 5.0


class UnsafeURL(ValueError):
    """The URL is malformed, or names an address the delivery process must not call; the message says which."""


def check_form(url: str) -> str:
    """The URL's host, if its form is acceptable; raises UnsafeURL otherwise."""
    if len(url) > WEBHOOK_URL_LENGTH_MAX:
        raise UnsafeURL(f"url: longer than {WEBHOOK_URL_LENGTH_MAX} characters")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise UnsafeURL("url: contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port out of range)
    except ValueError as exc:
        raise UnsafeURL(f"url: {exc}") from None
    if parts.scheme not in SCHEMES:
        raise UnsafeURL(f"url: the scheme must be http or https, got {parts.scheme or 'none'!r}")
    if not parts.hostname:
        raise UnsafeURL("url: no host")
    if parts.username is not None or parts.password is not None:
        raise UnsafeURL("url: credentials in the URL are not accepted; authenticate deliveries by their signature")
    return parts.hostname


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone index
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


async def check_url(url: str, *, allow_private: bool) -> None:
    """Raise UnsafeURL unless the delivery process may call ``url`` now.

    With ``allow_private`` false every address the host resolves to must be public. The
    delivery process checks again before each attempt, since DNS answers change; a name
    that changes between that check and the connection is the residual risk (see README).
    """
    host = check_form(url)
    if allow_private:
        return
    try:
        infos = await asyncio.wait_for(
            asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT_S)
    except (OSError, TimeoutError):
        raise UnsafeURL(f"url: the host {host!r} does not resolve") from None
    private = sorted({str(info[4][0]) for info in infos if not _public(str(info[4][0]))})
    if private or not infos:
        raise UnsafeURL(f"url: the host {host!r} resolves to a non-public address ({', '.join(private)}), "
                        "which this deployment refuses (LEDGER_WEBHOOK_ALLOW_PRIVATE=false)")
