"""Which webhook URLs the delivery process may call: http(s) only, and, unless the settings allow
them, no loopback, private, link-local or otherwise non-public address (server-side request forgery).

An IPv6 address that carries an IPv4 address (IPv4-mapped, NAT64, 6to4, Teredo) reaches that IPv4
address, so it is judged by it; the forms that reach no public address at all (IPv4-compatible,
IPv4-translated, the local-use NAT64 prefix) are refused whatever they carry. See docs/webhooks.md.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from concurrent.futures import Executor
from urllib.parse import urlsplit

from ledger.control.store import WEBHOOK_URL_LENGTH_MAX

SCHEMES = ("http", "https")
RESOLVE_TIMEOUT_S = 5.0

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# IPv6 prefixes whose addresses carry an IPv4 address, and where it sits (RFC 4291, 6052, 3056, 4380).
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")          # IPv4-mapped: the last 32 bits
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")            # well-known NAT64 prefix: the last 32 bits
_6TO4 = ipaddress.IPv6Network("2002::/16")                # 6to4: bits 16..47
_TEREDO = ipaddress.IPv6Network("2001::/32")              # Teredo: server in bits 32..63, client XOR-ed in the last 32
# Forms that reach no public IPv4 address: refused whatever they carry.
_NOWHERE = {
    ipaddress.IPv6Network("::/96"): "an IPv4-compatible address (deprecated, RFC 4291)",
    ipaddress.IPv6Network("::ffff:0:0:0/96"): "an IPv4-translated address (RFC 2765)",
    ipaddress.IPv6Network("64:ff9b:1::/48"): "a local-use NAT64 address (RFC 8215)",
}


class UnsafeURL(ValueError):
    """The URL is malformed, or names an address the delivery process must not call; the message says which."""


class Unresolvable(UnsafeURL):
    """The URL's host does not resolve (now)."""


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


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address leads to (mapped, NAT64, 6to4, Teredo server and client); [] if none."""
    if ip in _MAPPED or ip in _NAT64:
        return [ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)]
    if ip in _6TO4:
        return [ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFF_FFFF)]
    if ip in _TEREDO:
        return [ipaddress.IPv4Address((int(ip) >> 64) & 0xFFFF_FFFF),
                ipaddress.IPv4Address(~int(ip) & 0xFFFF_FFFF)]
    return []


def _v4_verdict(ip: ipaddress.IPv4Address) -> str | None:
    if ip.is_multicast:
        return "a multicast address"
    if not ip.is_global or ip.is_loopback or ip.is_link_local or ip.is_private or ip.is_reserved \
            or ip.is_unspecified:
        return "a loopback, private, link-local, shared or reserved address"
    return None


def refusal(address: str) -> str | None:
    """Why the delivery process must not connect to ``address`` (an IP literal), or None if it is public."""
    if "%" in address:  # a zone index: only link-local and multicast addresses have one
        return "an address with a zone index"
    try:
        ip: IPAddress = ipaddress.ip_address(address)
    except ValueError:
        return "not an IP address"
    if isinstance(ip, ipaddress.IPv4Address):
        return _v4_verdict(ip)
    for network, why in _NOWHERE.items():
        if ip in network:
            # :: and ::1 are in ::/96 too; name them for what they are.
            return "the unspecified or loopback address" if int(ip) <= 1 else why
    carried = embedded_ipv4(ip)
    for v4 in carried:
        carried_why = _v4_verdict(v4)
        if carried_why is not None:
            return f"an IPv6 address that carries {carried_why}"
    if carried and ip not in _TEREDO:
        return None  # mapped, NAT64 and 6to4 reach the public IPv4 address they carry
    if ip in _TEREDO:
        return "a Teredo address (IETF protocol assignment)"
    if ip.is_multicast:
        return "a multicast address"
    if not ip.is_global or ip.is_loopback or ip.is_link_local or ip.is_site_local or ip.is_private \
            or ip.is_reserved or ip.is_unspecified:
        return "a loopback, private, link-local, unique-local or reserved address"
    return None


async def resolve(host: str, port: int | None, *, executor: Executor | None = None) -> list[str]:
    """The addresses ``host`` resolves to, in the resolver's order (at most RESOLVE_TIMEOUT_S); UnsafeURL if none.

    ``executor`` runs the blocking lookup: the delivery process gives it a pool of its own, so slow
    name servers of one tenant's hosts never queue the control-store work behind them.
    """
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.run_in_executor(
            executor, lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)), RESOLVE_TIMEOUT_S)
    except (OSError, TimeoutError, UnicodeError):
        raise Unresolvable(f"url: the host {host!r} does not resolve") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise Unresolvable(f"url: the host {host!r} does not resolve")
    return addresses


def check_addresses(host: str, addresses: Sequence[str]) -> None:
    """Raise UnsafeURL unless every address is public (a name with one private answer is refused whole).

    The message names the host but not the addresses: a tenant must not learn what internal names resolve to.
    """
    reasons = sorted({why for a in addresses if (why := refusal(a)) is not None})
    if reasons:
        raise UnsafeURL(f"url: the host {host!r} resolves to a non-public address ({'; '.join(reasons)}), "
                        "which this deployment refuses (LEDGER_WEBHOOK_ALLOW_PRIVATE=false)")


async def check_url(url: str, *, allow_private: bool) -> None:
    """Raise UnsafeURL unless the delivery process may call ``url`` now (at registration).

    With ``allow_private`` false every address the host resolves to must be public. Deliveries
    check again, on the addresses they connect to (``streams.webhook_transport``), since DNS answers change.
    """
    host = check_form(url)
    if allow_private:
        return
    check_addresses(host, await resolve(host, None))
