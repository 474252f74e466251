"""Which addresses a strict deployment's webhooks may call: a table of address forms and their verdicts.

An IPv6 form that carries an IPv4 address is judged by the address it carries; the forms that lead
to no public address are refused whatever they carry. Literal hosts need no name server, so
``check_url`` is exercised here too (and the API's 422 in tests/integration/test_webhooks_api.py).
"""

from __future__ import annotations

import asyncio

import pytest

from ledger.control.webhook_urls import UnsafeURL, check_url, embedded_ipv4, refusal
from ledger.settings import Settings

REFUSED = {
    # The forms the outside probe found accepted in strict mode.
    "NAT64 of link-local (metadata)": "64:ff9b::a9fe:a9fe",
    "NAT64 of loopback": "64:ff9b::7f00:1",
    "local-use NAT64 of link-local": "64:ff9b:1::a9fe:a9fe",
    "6to4 of loopback": "2002:7f00:1::",
    "IPv4-compatible loopback": "::127.0.0.1",
    "IPv4-translated link-local": "::ffff:0:a9fe:a9fe",
    # IPv4-mapped, Teredo, 6to4, NAT64, IPv4-compatible of other private ranges.
    "IPv4-mapped loopback": "::ffff:127.0.0.1",
    "IPv4-mapped private": "::ffff:10.0.0.1",
    "IPv4-mapped metadata": "::ffff:169.254.169.254",
    "Teredo, client 127.0.0.1": "2001:0:4136:e378:8000:63bf:80ff:fffe",
    "Teredo, server 10.0.0.1": "2001:0:a00:1::1",
    "Teredo, public server and client": "2001:0:4136:e378:8000:63bf:f7f7:f7f7",  # 2001::/32 is never global
    "6to4 of private": "2002:c0a8:101::1",
    "6to4 of metadata": "2002:a9fe:a9fe::",
    "NAT64 of private": "64:ff9b::10.1.2.3",
    "NAT64 of shared (CGNAT)": "64:ff9b::100.64.0.1",
    "local-use NAT64 of a public address": "64:ff9b:1::8.8.8.8",
    "IPv4-compatible private": "::10.0.0.1",
    "IPv4-compatible public (deprecated)": "::8.8.8.8",
    "IPv4-translated public": "::ffff:0:8.8.8.8",
    # Plain IPv4.
    "v4 loopback": "127.0.0.1",
    "v4 loopback, other": "127.9.9.9",
    "v4 private 10/8": "10.1.2.3",
    "v4 private 172.16/12": "172.16.5.4",
    "v4 private 192.168/16": "192.168.0.1",
    "v4 link-local (metadata)": "169.254.169.254",
    "v4 shared (CGNAT)": "100.64.0.1",
    "v4 this network": "0.0.0.0",
    "v4 broadcast": "255.255.255.255",
    "v4 multicast": "224.0.0.1",
    "v4 multicast, global scope": "233.252.0.1",
    "v4 reserved": "240.0.0.1",
    "v4 documentation": "192.0.2.1",
    "v4 benchmarking": "198.18.0.1",
    # Plain IPv6.
    "v6 loopback": "::1",
    "v6 unspecified": "::",
    "v6 link-local": "fe80::1",
    "v6 link-local with a zone": "fe80::1%eth0",
    "v6 unique-local": "fd00::1",
    "v6 site-local (deprecated)": "fec0::1",
    "v6 multicast, link": "ff02::1",
    "v6 multicast, global": "ff0e::1",
    "v6 documentation": "2001:db8::1",
    "v6 discard": "100::1",
    "not an address": "example.com",
}

ALLOWED = {
    "v4 public": "93.184.215.14",
    "v4 public, other": "8.8.8.8",
    "v6 public": "2606:4700:4700::1111",
    "IPv4-mapped public": "::ffff:8.8.8.8",
    "NAT64 of a public address": "64:ff9b::808:808",
    "6to4 of a public address": "2002:808:808::1",
}


@pytest.mark.parametrize("address", REFUSED.values(), ids=REFUSED.keys())
def test_non_public_forms_are_refused_with_a_reason(address: str) -> None:
    assert refusal(address) is not None


@pytest.mark.parametrize("address", ALLOWED.values(), ids=ALLOWED.keys())
def test_public_addresses_and_forms_that_carry_one_are_allowed(address: str) -> None:
    assert refusal(address) is None


@pytest.mark.parametrize(("address", "carried"), [
    ("::ffff:127.0.0.1", ["127.0.0.1"]),
    ("64:ff9b::a9fe:a9fe", ["169.254.169.254"]),
    ("2002:7f00:1::", ["127.0.0.1"]),
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", ["65.54.227.120", "127.0.0.1"]),  # server, client (XOR-ed)
    ("2606:4700:4700::1111", []),
])
def test_the_ipv4_address_an_ipv6_form_leads_to(address: str, carried: list[str]) -> None:
    import ipaddress

    assert [str(a) for a in embedded_ipv4(ipaddress.IPv6Address(address))] == carried


def url(address: str) -> str:
    return f"http://[{address}]:8080/hooks" if ":" in address else f"http://{address}:8080/hooks"


@pytest.mark.parametrize("address", [a for a in REFUSED.values() if "%" not in a and a != "example.com"])
def test_a_strict_deployment_refuses_every_non_public_form_at_registration(address: str) -> None:
    with pytest.raises(UnsafeURL, match="non-public"):
        asyncio.run(check_url(url(address), allow_private=False))
    asyncio.run(check_url(url(address), allow_private=True))  # a deployment that opted in accepts it


def test_strict_is_the_default() -> None:
    assert Settings().webhook_allow_private is False
    assert Settings.from_env({}).webhook_allow_private is False
    assert Settings.from_env({"LEDGER_WEBHOOK_ALLOW_PRIVATE": "true"}).webhook_allow_private is True


def test_the_local_stack_opts_in_unless_told_otherwise() -> None:
    from ledger.cli.stack import process_env

    stack = Settings()
    assert Settings.from_env(process_env(stack, {})).webhook_allow_private is True
    told = process_env(stack, {"LEDGER_WEBHOOK_ALLOW_PRIVATE": "false"})
    assert Settings.from_env(told).webhook_allow_private is False
