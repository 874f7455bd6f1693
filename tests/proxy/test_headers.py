"""Unit tables for forwarding.headers: pure functions, no sockets."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from affinity_proxy.proxy.headers import (
    HOP_BY_HOP,
    REQUEST_ID_HEADERS,
    connection_tokens,
    downstream_response_headers,
    is_safe_header,
    is_sane_request_id,
    merge_extra_headers,
    request_rewrite,
    upstream_request_headers,
)


def _h(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def _up(headers: CIMultiDictProxy[str], **kwargs: object) -> CIMultiDict[str]:
    args: dict[str, object] = {"client_ip": "10.0.0.9", "scheme": "https", "host": "app.example"}
    args.update(kwargs)
    return upstream_request_headers(headers, **args)  # type: ignore[arg-type]


def test_hop_by_hop_set_is_the_rfc_list() -> None:
    assert {
        "connection",
        "http2-settings",  # RFC 7540 3.2.1, dropped against h2c smuggling
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    } == HOP_BY_HOP


@pytest.mark.parametrize("name", sorted(HOP_BY_HOP))
def test_every_hop_by_hop_header_is_dropped_both_ways(name: str) -> None:
    headers = _h((name.title(), "x"), ("X-Keep", "1"))
    assert name not in _up(headers)
    assert name not in downstream_response_headers(headers)
    assert _up(headers)["X-Keep"] == "1"
    assert downstream_response_headers(headers)["X-Keep"] == "1"


def test_headers_named_in_connection_are_dropped() -> None:
    headers = _h(
        ("Connection", "keep-alive, X-Secret"),
        ("Connection", " x-other ,"),
        ("X-Secret", "s"),
        ("X-Other", "o"),
        ("X-Keep", "k"),
    )
    assert connection_tokens(headers) == {"keep-alive", "x-secret", "x-other"}
    for out in (_up(headers), downstream_response_headers(headers)):
        assert "X-Secret" not in out and "X-Other" not in out and "Connection" not in out
        assert out["X-Keep"] == "k"


def test_end_to_end_headers_keep_repeats_and_order() -> None:
    headers = _h(("Host", "app.example"), ("Accept", "a"), ("X-Multi", "1"), ("X-Multi", "2"), ("Cookie", "c=1"))
    out = _up(headers)
    assert out.getall("X-Multi") == ["1", "2"]
    assert out["Host"] == "app.example"  # passHostHeader: the instance sees the client's Host
    assert out["Cookie"] == "c=1"
    assert [k for k, _ in out.items()][:5] == ["Host", "Accept", "X-Multi", "X-Multi", "Cookie"]


def test_drop_names_are_removed_case_insensitively() -> None:
    headers = _h(("Fly-Force-Instance-Id", "b2"), ("X-Keep", "1"))
    out = _up(headers, drop=("fly-force-instance-id",))
    assert "fly-force-instance-id" not in out and out["X-Keep"] == "1"


@pytest.mark.parametrize(
    ("incoming", "client_ip", "expected"),
    [
        ([], "10.0.0.9", "10.0.0.9"),
        ([("X-Forwarded-For", "1.1.1.1")], "10.0.0.9", "1.1.1.1, 10.0.0.9"),
        (
            [("X-Forwarded-For", "1.1.1.1, 2.2.2.2"), ("X-Forwarded-For", "3.3.3.3")],
            "10.0.0.9",
            "1.1.1.1, 2.2.2.2, 3.3.3.3, 10.0.0.9",
        ),
        ([("X-Forwarded-For", "1.1.1.1")], None, "1.1.1.1"),
        ([], None, None),
    ],
)
def test_x_forwarded_for_appends(incoming: list[tuple[str, str]], client_ip: str | None, expected: str | None) -> None:
    out = _up(_h(*incoming), client_ip=client_ip)
    assert out.get("X-Forwarded-For") == expected
    assert len(out.getall("X-Forwarded-For", [])) == (0 if expected is None else 1)


def test_forwarded_proto_and_host_are_set_and_replace_client_values() -> None:
    headers = _h(("X-Forwarded-Proto", "gopher"), ("X-Forwarded-Host", "evil.example"), ("Host", "app.example"))
    out = _up(headers, scheme="https", host="app.example")
    assert out.getall("X-Forwarded-Proto") == ["https"]
    assert out.getall("X-Forwarded-Host") == ["app.example"]
    out = _up(headers, scheme="http", host=None)
    assert "X-Forwarded-Host" not in out and out["X-Forwarded-Proto"] == "http"


def test_request_id_set_only_when_absent() -> None:
    assert _up(_h(), request_id="r1")["X-Request-Id"] == "r1"
    assert _up(_h(("X-Request-Id", "client")), request_id="r1").getall("X-Request-Id") == ["client"]
    assert "X-Request-Id" not in _up(_h())


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X-Evil", "a\r\nInjected: 1"),
        ("X-Evil", "a\nb"),
        ("X-Evil", "a\rb"),
        ("X-Evil", "a\x00b"),
        ("X-Evil\r\nInjected", "1"),
        ("X Evil", "1"),
        ("X-Evil:", "1"),
        ("", "1"),
        ("X-Evil", "bad-\udcff-surrogate"),
    ],
)
def test_unsafe_pairs_are_never_emitted(name: str, value: str) -> None:
    assert not is_safe_header(name, value)
    headers = _h((name, value), ("X-Keep", "1"))
    for out in (_up(headers), downstream_response_headers(headers)):
        assert all(is_safe_header(k, v) for k, v in out.items())
        assert "\r" not in repr(list(out.items())).replace("\\r", "") and "Injected" not in out
        assert out["X-Keep"] == "1"


def test_unsafe_added_values_are_skipped() -> None:
    out = _up(_h(("X-Forwarded-For", "1.1.1.1")), client_ip="1.2.3.4\r\nX: y", host="h\n", request_id="r\x00")
    assert out["X-Forwarded-For"] == "1.1.1.1"
    assert "X-Forwarded-Host" not in out and "X-Request-Id" not in out
    assert all(is_safe_header(k, v) for k, v in out.items())


def test_utf8_values_are_kept() -> None:
    assert _up(_h(("X-Name", "Zoë")))["X-Name"] == "Zoë"


def test_response_set_cookie_lines_stay_separate() -> None:
    out = downstream_response_headers(_h(("Set-Cookie", "a=1; Path=/"), ("Set-Cookie", "b=2, c"), ("X-A", "1")))
    assert out.getall("Set-Cookie") == ["a=1; Path=/", "b=2, c"]


def test_response_content_length_kept_unless_chunked() -> None:
    assert downstream_response_headers(_h(("Content-Length", "10")))["Content-Length"] == "10"
    chunked = downstream_response_headers(_h(("Content-Length", "10"), ("Transfer-Encoding", "chunked")))
    assert "Content-Length" not in chunked and "Transfer-Encoding" not in chunked


def test_merge_extra_adds_set_cookie_and_replaces_other_names() -> None:
    target = CIMultiDict([("Set-Cookie", "app=1"), ("X-Fly-Instance", "spoofed"), ("X-A", "1")])
    rejected = merge_extra_headers(
        target, [("X-Fly-Instance", "b1"), ("Set-Cookie", "fly=1"), ("Vary", "a"), ("Vary", "b")]
    )
    assert rejected == []
    assert target.getall("Set-Cookie") == ["app=1", "fly=1"]
    assert target.getall("X-Fly-Instance") == ["b1"]
    assert target.getall("Vary") == ["a", "b"]
    assert target["X-A"] == "1"


def test_merge_extra_accepts_a_mapping_and_rejects_unsafe() -> None:
    target: CIMultiDict[str] = CIMultiDict()
    rejected = merge_extra_headers(target, {"X-Ok": "1", "X-Bad": "a\r\nInjected: 1"})
    assert rejected == ["'X-Bad'"]
    assert dict(target) == {"X-Ok": "1"}


@pytest.mark.parametrize(("value", "sane"), [
    ("abc-123", True), ("x" * 128, True), ("x" * 129, False), ("has space", False), ("tab\there", False),
    ("caf\u00e9", False), ("nul\x00", False), ("", True),
])
def test_is_sane_request_id(value: str, sane: bool) -> None:
    assert is_sane_request_id(value) is sane
    assert REQUEST_ID_HEADERS == ("Fly-Request-Id", "X-Request-Id")


def test_the_rewrite_plan_names_what_is_dropped_and_added() -> None:
    plan = request_rewrite(connection=["close, X-Secret"], forwarded_for=[" 1.1.1.1 ", "", "\udcff"],
                           client_ip="10.0.0.9", scheme="https", host="app.example", trusted_peer=False,
                           extra=(("fly-replay-src", "instance=a"),))
    assert {"connection", "te", "x-secret", "x-forwarded-for", "fly-force-instance-id", "x-real-ip",
            "forwarded", "fly-client-ip", "fly-replay-src"} <= plan.drop
    assert plan.add == (("X-Forwarded-For", "1.1.1.1, 10.0.0.9"), ("X-Forwarded-Proto", "https"),
                        ("X-Forwarded-Host", "app.example"), ("fly-replay-src", "instance=a"))
    trusted = request_rewrite(client_ip=None, scheme="http", host=None, trusted_peer=True)
    assert "x-real-ip" not in trusted.drop and trusted.add == (("X-Forwarded-Proto", "http"),)


def test_forwarded_for_named_in_connection_is_not_carried_over() -> None:
    plan = request_rewrite(connection=["X-Forwarded-For"], forwarded_for=["6.6.6.6"], client_ip="10.0.0.9",
                           scheme="http", host=None, trusted_peer=True)
    assert plan.add[0] == ("X-Forwarded-For", "10.0.0.9")


def test_extra_headers_replace_the_clients() -> None:
    out = _up(_h(("Fly-Replay-Src", "forged"), ("X-Keep", "1")), extra=(("fly-replay-src", "instance=a"),))
    assert out.getall("fly-replay-src") == ["instance=a"] and out["X-Keep"] == "1"
