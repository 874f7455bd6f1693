"""Forwarding headers end to end (issue 12): what an instance sees of the client's address and
scheme, depending on ``trusted_proxies``. The test client connects from 127.0.0.1, so it is an
untrusted client by default and a trusted proxy when 127.0.0.1 is listed."""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import pytest

from tests.functional.helpers import base
from tests.support.backends import make_config

#: What a client may claim about itself; only a trusted proxy's claims reach the instance.
CLAIMS = [
    ("X-Forwarded-For", "203.0.113.9"),
    ("X-Forwarded-Proto", "https"),
    ("Forwarded", "for=192.0.2.1;proto=https"),
    ("X-Real-IP", "192.0.2.1"),
    ("Fly-Client-IP", "192.0.2.1"),
    ("Fly-Forwarded-Proto", "https"),
]
#: Underscore variants an app (CGI-style environments, some frameworks) may read as the dashed name.
UNDERSCORED = [("X_Forwarded_For", "6.6.6.6"), ("Transfer_Encoding", "chunked"), ("X_Real_IP", "6.6.6.6")]
#: Request shapes the fast engine forwards differently: its pre-built header lines, or the full
#: filter (a Connection header naming another header).
SHAPES = {"plain": [], "connection-named": [("Connection", "X-Hop"), ("X-Hop", "1")]}


async def seen_upstream(http: aiohttp.ClientSession, server: Any,
                        headers: list[tuple[str, str]]) -> dict[str, list[str]]:
    """The headers the instance received (lower-case names, every value)."""
    async with http.get(base(server) + "/_control/headers", headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        doc = await resp.json()
    seen: dict[str, list[str]] = {}
    for name, value in doc["headers"]:
        seen.setdefault(name.lower(), []).append(value)
    return seen


@pytest.mark.parametrize("shape", list(SHAPES))
async def test_an_untrusted_client_cannot_claim_an_address_or_a_scheme(engine: str, backends, start_proxy, http,
                                                                      shape: str) -> None:
    server = await start_proxy(make_config(backends, engine=engine))  # trusted_proxies: [] (proxy mode default)
    for attempt in range(2):  # the second is the same head again (the fast engine's cached head)
        seen = await seen_upstream(http, server, CLAIMS + UNDERSCORED + SHAPES[shape])
        assert seen["x-forwarded-proto"] == ["http"], (attempt, seen)
        # nginx's $proxy_add_x_forwarded_for: the client's list is kept, the real peer appended
        assert seen["x-forwarded-for"] == ["203.0.113.9, 127.0.0.1"], (attempt, seen)
        for name in ("forwarded", "x-real-ip", "fly-client-ip", "fly-forwarded-proto"):
            assert name not in seen, (attempt, name, seen[name])
        assert not [n for n in seen if "_" in n], (attempt, seen)
        assert "x-hop" not in seen


@pytest.mark.parametrize("shape", list(SHAPES))
async def test_a_trusted_proxy_sets_the_scheme_and_passes_its_headers(engine: str, backends, start_proxy, http,
                                                                     shape: str) -> None:
    server = await start_proxy(make_config(backends, engine=engine, trusted_proxies=("127.0.0.1/32",)))
    for attempt in range(2):
        seen = await seen_upstream(http, server, CLAIMS + UNDERSCORED + SHAPES[shape])
        assert seen["x-forwarded-proto"] == ["https"], (attempt, seen)
        assert seen["x-forwarded-for"] == ["203.0.113.9, 127.0.0.1"], (attempt, seen)
        assert seen["forwarded"] == ["for=192.0.2.1;proto=https"]
        assert seen["x-real-ip"] == ["192.0.2.1"] and seen["fly-client-ip"] == ["192.0.2.1"]
        assert not [n for n in seen if "_" in n], "underscored names are dropped from every peer"


@pytest.mark.parametrize(("sent", "expected"), [
    ([("X-Forwarded-Proto", "https")], "https"),
    ([("X-Forwarded-Proto", "HTTPS")], "https"),
    ([("X-Forwarded-Proto", "http")], "http"),
    ([("X-Forwarded-Proto", "gopher")], "http"),
    ([("X-Forwarded-Proto", "http, https")], "https"),  # the entry nearest the trusted peer
    ([("X-Forwarded-Proto", "https"), ("Fly-Forwarded-Proto", "http")], "http"),
    ([("X-Forwarded-Proto", "http"), ("Fly-Forwarded-Proto", "https")], "https"),
    ([], "http"),
])
async def test_the_scheme_from_a_trusted_proxy(engine: str, backends, start_proxy, http, sent: list[tuple[str, str]],
                                               expected: str) -> None:
    server = await start_proxy(make_config(backends, engine=engine, trusted_proxies=("127.0.0.0/8", "::1")))
    seen = await seen_upstream(http, server, sent)
    assert seen["x-forwarded-proto"] == [expected], seen


@pytest.mark.parametrize(("trusted", "sent", "remote"), [
    ((), [("X-Forwarded-For", "198.51.100.7")], "127.0.0.1"),
    (("10.0.0.0/8",), [("X-Forwarded-For", "198.51.100.7"), ("Fly-Client-IP", "192.0.2.44")], "127.0.0.1"),
    (("127.0.0.1/32", "10.0.0.0/8"), [("X-Forwarded-For", "198.51.100.7, 10.1.2.3")], "198.51.100.7"),
    (("127.0.0.1/32",), [("X-Forwarded-For", "198.51.100.7, 10.1.2.3")], "10.1.2.3"),
    (("127.0.0.1/32",), [("X-Forwarded-For", "198.51.100.7"), ("Fly-Client-IP", "192.0.2.44")], "192.0.2.44"),
    (("127.0.0.1/32",), [("X-Forwarded-For", "2001:db8::7")], "2001:db8::7"),
    (("127.0.0.1/32",), [("X-Forwarded-For", "not-an-address")], "127.0.0.1"),
])
async def test_the_access_log_records_the_real_client(engine: str, backends, start_proxy, http, caplog,
                                                      trusted: tuple[str, ...], sent: list[tuple[str, str]],
                                                      remote: str) -> None:
    server = await start_proxy(make_config(backends, engine=engine, trusted_proxies=trusted))
    caplog.set_level(logging.INFO, logger="affinity_proxy.access")
    async with http.get(base(server) + "/logged", headers=sent) as resp:
        assert resp.status == 200
    (record,) = [r for r in caplog.records if r.name == "affinity_proxy.access"]
    assert record.fields["remote"] == remote  # type: ignore[attr-defined]
