"""``forwarding.realip`` (nginx's realip with ``real_ip_recursive on``, plus the scheme) and the
header filtering that goes with it (``upstream_request_headers``: underscores, client claims)."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from affinity_proxy.proxy.headers import is_chunked_only, is_coding_error, upstream_request_headers
from affinity_proxy.proxy.realip import (
    TrustedProxies,
    canonical_address,
    client_address,
    client_scheme,
    parse_address,
    real_client,
    trusted_proxies,
)

PROXIES = TrustedProxies(["10.0.0.0/8", "fd00::/8", "127.0.0.1/32"])


@pytest.mark.parametrize(("text", "expected"), [
    ("1.2.3.4", "1.2.3.4"),
    (" 1.2.3.4 ", "1.2.3.4"),
    ("1.2.3.4:5678", "1.2.3.4"),
    ("2001:db8::1", "2001:db8::1"),
    ("[2001:db8::1]", "2001:db8::1"),
    ("[2001:db8::1]:443", "2001:db8::1"),
    ("::ffff:10.1.2.3", "10.1.2.3"),  # what a dual-stack socket reports for an IPv4 peer
    ("", None),
    ("unknown", None),
    ("1.2.3.4:", None),
    ("1.2.3.4:x", None),
    ("[2001:db8::1", None),
    ("[2001:db8::1]x", None),
    ("[2001:db8::1]:", None),
    ("1.2.3.4.5", None),
    ("_hidden", None),
    ("999.1.1.1", None),
])
def test_parse_address(text: str, expected: str | None) -> None:
    parsed = parse_address(text)
    assert (str(parsed) if parsed is not None else None) == expected


def test_canonical_address_ignores_long_text() -> None:
    """The memo behind it only ever holds short strings (an address with a port fits in 64)."""
    assert canonical_address(" [2001:DB8:0:0:0:0:0:1]:65535 ") == "2001:db8::1"
    assert canonical_address("1" * 65) is None and canonical_address("1.2.3.4" + " " * 80) == "1.2.3.4"


def test_trusted_proxies_match_by_family_and_ignore_nonsense() -> None:
    assert PROXIES.trusts("10.200.0.1") and PROXIES.trusts("fd12::1") and PROXIES.trusts("127.0.0.1")
    assert PROXIES.trusts("::ffff:10.0.0.1")
    assert not PROXIES.trusts("127.0.0.2") and not PROXIES.trusts("11.0.0.1") and not PROXIES.trusts("fe80::1")
    assert not PROXIES.trusts(None) and not PROXIES.trusts("") and not PROXIES.trusts("unix-socket")
    assert not TrustedProxies([]) and not TrustedProxies([]).trusts("10.0.0.1")


def test_the_memo_is_bounded() -> None:
    proxies = TrustedProxies(["10.0.0.0/8"])
    for i in range(TrustedProxies.MEMO_LIMIT + 10):
        proxies.trusts(f"192.0.{i // 256 % 256}.{i % 256}")
    assert len(proxies._memo) <= TrustedProxies.MEMO_LIMIT


def test_one_object_per_config_value() -> None:
    assert trusted_proxies(("10.0.0.0/8",)) is trusted_proxies(("10.0.0.0/8",))


@pytest.mark.parametrize(("peer", "xff", "fly", "expected"), [
    # untrusted peer: its own address, whatever it says
    ("198.51.100.1", ["1.1.1.1"], "2.2.2.2", "198.51.100.1"),
    # trusted peer: the rightmost untrusted entry
    ("10.0.0.1", ["1.1.1.1, 10.0.0.2"], None, "1.1.1.1"),
    ("10.0.0.1", ["6.6.6.6, 1.1.1.1, 10.0.0.2"], None, "1.1.1.1"),  # 6.6.6.6 may be forged: not believed
    ("10.0.0.1", ["6.6.6.6", "1.1.1.1"], None, "1.1.1.1"),  # several lines read as one list
    ("10.0.0.1", ["10.0.0.3, 10.0.0.2"], None, "10.0.0.3"),  # every entry trusted: the leftmost
    ("10.0.0.1", ["1.1.1.1, garbage, 10.0.0.2"], None, "10.0.0.2"),  # stop at what is not an address
    ("10.0.0.1", ["garbage"], None, "10.0.0.1"),
    ("10.0.0.1", ["1.1.1.1,,  ,10.0.0.2"], None, "1.1.1.1"),
    ("10.0.0.1", ["[2001:db8::5]:1234, fd00::1"], None, "2001:db8::5"),
    ("10.0.0.1", [], None, "10.0.0.1"),
    # Fly-Client-IP wins from a trusted peer when it is an address
    ("10.0.0.1", ["1.1.1.1"], "2.2.2.2", "2.2.2.2"),
    ("10.0.0.1", ["1.1.1.1"], "nonsense", "1.1.1.1"),
    (None, ["1.1.1.1"], "2.2.2.2", None),
])
def test_client_address(peer: str | None, xff: list[str], fly: str | None, expected: str | None) -> None:
    assert client_address(PROXIES, peer, xff, fly) == expected


@pytest.mark.parametrize(("trusted", "fly", "xfp", "expected"), [
    (False, "https", ["https"], "http"),
    (True, None, ["https"], "https"),
    (True, None, [" HTTPS "], "https"),
    (True, None, ["http, https"], "https"),
    (True, None, ["https", "http"], "http"),
    (True, None, ["wss"], "http"),
    (True, None, ["https, "], "https"),
    (True, None, [], "http"),
    (True, "https", ["http"], "https"),
    (True, "ftp", ["https"], "https"),
])
def test_client_scheme(trusted: bool, fly: str | None, xfp: list[str], expected: str) -> None:
    assert client_scheme(trusted, "http", fly, xfp) == expected


def test_a_tls_listener_scheme_is_kept_from_an_untrusted_peer() -> None:
    found = real_client(PROXIES, "198.51.100.1", "https", forwarded_proto=["http"])
    assert (found.ip, found.scheme, found.trusted) == ("198.51.100.1", "https", False)
    found = real_client(PROXIES, "10.0.0.9", "http", forwarded_for=["1.1.1.1"], forwarded_proto=["https"])
    assert (found.ip, found.scheme, found.trusted) == ("1.1.1.1", "https", True)


def _headers(*pairs: tuple[str, str]) -> CIMultiDict[str]:
    return CIMultiDict(pairs)


CLAIMS = (("Forwarded", "for=1.2.3.4"), ("X-Real-IP", "1.2.3.4"), ("Fly-Client-IP", "1.2.3.4"),
          ("Fly-Forwarded-Proto", "https"))


def test_client_claims_are_forwarded_only_from_a_trusted_peer() -> None:
    headers = _headers(*CLAIMS, ("X-Other", "kept"))
    out = upstream_request_headers(headers, client_ip="9.9.9.9", scheme="http", host="h")
    assert not any(name in out for name, _ in CLAIMS) and out["X-Other"] == "kept"
    out = upstream_request_headers(headers, client_ip="10.0.0.1", scheme="https", host="h", trusted_peer=True)
    assert [out[name] for name, _ in CLAIMS] == [value for _, value in CLAIMS]
    assert out["X-Forwarded-Proto"] == "https"


def test_underscored_names_are_never_forwarded() -> None:
    headers = _headers(("X_Forwarded_For", "6.6.6.6"), ("Transfer_Encoding", "chunked"), ("x_user", "u"),
                       ("X-Fine", "1"))
    for trusted in (False, True):
        out = upstream_request_headers(headers, client_ip="1.1.1.1", scheme="http", host="h", trusted_peer=trusted)
        assert [n for n in out if "_" in n] == [] and out["X-Fine"] == "1"
        assert out["X-Forwarded-For"] == "1.1.1.1"


@pytest.mark.parametrize(("value", "only"), [
    ("chunked", True), ("Chunked", True), (" chunked ", True), (b"CHUNKED", True),
    ("gzip, chunked", False), ("identity", False), ("chunked, chunked", False), ("", False), (b"gzip", False),
])
def test_is_chunked_only(value: str | bytes, only: bool) -> None:
    assert is_chunked_only(value) is only


@pytest.mark.parametrize(("message", "coding"), [
    ("Request has invalid `Transfer-Encoding`", True),
    ("400, message:\n  Invalid `Transfer-Encoding` header value", True),
    ("Transfer-Encoding can't be present with Content-Length", False),
    ("Content-Length can't be present with Transfer-Encoding", False),
    ("Empty Transfer-Encoding", False),
])
def test_is_coding_error(message: str, coding: bool) -> None:
    assert is_coding_error(message) is coding
