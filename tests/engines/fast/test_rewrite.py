"""The fast engine's byte rewrite applies ``proxy.headers.request_rewrite`` exactly as the
aiohttp engine's ``upstream_request_headers`` does: same lines kept, same lines added, same order.
Pure: heads are filled through the parser callbacks, nothing is sent."""

from __future__ import annotations

from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from affinity_proxy.engines.fast import wire
from affinity_proxy.engines.fast.head import RequestHead, text
from affinity_proxy.engines.fast.protocol import RequestFraming
from affinity_proxy.engines.fast.rewrite import upstream_head
from affinity_proxy.engines.fast.upstream import Origin
from affinity_proxy.proxy.headers import REQUEST_DROPPED, request_rewrite, upstream_request_headers
from affinity_proxy.proxy.realip import RealClient

_NAMES = [b"Host", b"X-A", b"x-a", b"Connection", b"X-Forwarded-For", b"X-Forwarded-Proto", b"X-Forwarded-Host",
          b"Forwarded", b"X-Real-IP", b"Fly-Client-IP", b"Fly-Forwarded-Proto", b"X-Request-Id", b"X_Under",
          b"fly-force-instance-id", b"fly-replay-src", b"TE", b"Keep-Alive", b"Proxy-Authorization", b"Cookie"]
_VALUES = [b"1.1.1.1", b"x-a", b"X-A, TE", b"x-forwarded-for", b"Zo\xc3\xab", b"\xff", b"a b", b"fly-client-ip",
           b"https"]


def _head(pairs: list[tuple[bytes, bytes]]) -> RequestHead:
    head = RequestHead()
    conn = SimpleNamespace(in_body=False, head=head)
    for name, value in pairs:
        RequestFraming.on_header(conn, name, value)  # type: ignore[arg-type]
    head.method = "GET"
    head.target = b"/p"
    if b"connection" in head.first and wire.connection_tokens(head.all(b"connection")):
        head.odd = True  # as on_headers_complete
    return head


def _lines(block: bytes) -> list[tuple[str, str]]:
    """The header lines of an upstream head, minus the request line and this transport's framing."""
    out = []
    for line in block.split(b"\r\n")[1:]:
        if not line:
            continue
        name, _, value = line.partition(b": ")
        if name.lower() not in (b"content-length", b"transfer-encoding"):
            out.append((text(name).lower(), text(value)))
    return out


@settings(max_examples=400, deadline=None)
@given(pairs=st.lists(st.tuples(st.sampled_from(_NAMES), st.sampled_from(_VALUES)), max_size=8),
       trusted=st.booleans(), peer=st.sampled_from([None, "10.0.0.9"]), scheme=st.sampled_from(["http", "https"]),
       extra=st.sampled_from([None, (b"fly-replay-src", b"instance=a;state=b")]))
def test_both_engines_apply_the_same_rewrite(pairs, trusted, peer, scheme, extra) -> None:  # type: ignore[no-untyped-def]
    head = _head(pairs)
    origin = Origin("http://127.0.0.1:9000")
    client = RealClient(peer, scheme, trusted)
    fast = _lines(upstream_head(head, origin, peer, lambda: b"rid-1", lambda: "fq.example", extra, client))
    host = head.first.get(b"host")
    headers = CIMultiDict((text(n), text(v)) for n, v in head.headers)
    slow = upstream_request_headers(
        headers, client_ip=peer, scheme=scheme, host=text(host) if host is not None else "fq.example",
        request_id="rid-1", trusted_peer=trusted, extra=((text(extra[0]), text(extra[1])),) if extra else (),
    )
    expected = [(n.lower(), v) for n, v in slow.items()]
    if host is None:  # the fast transport writes the instance's Host; aiohttp's client does the same
        fast.remove(("host", "127.0.0.1:9000"))
    assert sorted(fast) == sorted(expected)
    assert fast == expected


def test_the_lines_filtered_at_parse_time_are_the_usual_rewrite() -> None:
    """``head.lines`` (parse time) stand for the rewrite with nothing per request to drop."""
    usual = request_rewrite(client_ip="10.0.0.9", scheme="http", host="h", trusted_peer=True)
    assert usual.drop == REQUEST_DROPPED
    assert wire.REQUEST_REPLACED == {name.encode() for name in usual.drop} | wire.FRAMING
