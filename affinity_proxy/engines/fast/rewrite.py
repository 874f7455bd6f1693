"""Header blocks crossing the fast engine, both ways, as bytes.

``upstream_head`` applies ``proxy.headers.request_rewrite`` (the one definition of what is
dropped and added on the way to the instance, shared with the aiohttp engine) to a raw request
head, plus this transport's framing: ``Host`` when the client sent none, Content-Length as
declared, chunked for a chunked body, ``Content-Length: 0`` for a body-less method other than
GET/HEAD/OPTIONS/TRACE (as aiohttp's client sends). ``client_head`` is
``downstream_response_headers`` plus ``merge_extra_headers`` and aiohttp's response framing for
the client's HTTP version. Pure; no I/O.
"""

from __future__ import annotations

from collections.abc import Callable

from affinity_proxy.proxy.headers import RequestRewrite, request_rewrite
from affinity_proxy.proxy.realip import RealClient

from . import wire
from .head import RequestHead, text
from .response import ResponseHead
from .upstream import Origin

_NO_BODY_STATUS = (204, 304)
_STATUS_LINES: dict[tuple[bytes, int, bytes], bytes] = {}


def upstream_head(head: RequestHead, origin: Origin, peer: str | None, rid: Callable[[], bytes],
                  fqdn: Callable[[], str], extra: tuple[bytes, bytes] | None, client: RealClient) -> bytes:
    """The request head sent to ``origin``. ``extra``: one more header that replaces the client's
    (fly's private-forward ``fly-replay-src``); ``client``: the realip result (its scheme, whether
    the peer is trusted). In the usual case (no ``extra``, ``Connection`` naming no other header,
    no client claim from an untrusted peer) the rewrite drops only ``REQUEST_DROPPED``, which the
    head's ``lines`` were filtered against as they were parsed; everything but X-Request-Id then
    depends only on the (shared, immutable) head, the instance, the peer address and ``client``,
    so it is built once per head for the last of those seen and reused around a fresh request id."""
    if extra is not None or head.odd or (head.claims and not client.trusted):
        return _filtered_upstream_head(head, origin, peer, rid, fqdn, extra, client)
    memo = head.up_memo
    if (memo is None or memo[0] is not origin or memo[1] != peer or memo[2] != client.scheme
            or memo[3] is not client.trusted):
        parts = [head.method.encode(), b" ", origin.prefix, head.target, b" HTTP/1.1\r\n", b"".join(head.lines)]
        _added(parts, head, _rewrite(head, peer, fqdn, client, None, ()), origin)
        after: list[bytes] = []
        _framing(after, head)
        memo = head.up_memo = (origin, peer, client.scheme, client.trusted, b"".join(parts), b"".join(after))
    if head.has_rid:
        return memo[4] + memo[5]  # type: ignore[no-any-return]
    return b"".join((memo[4], wire.REQUEST_ID_LINE, rid(), b"\r\n", memo[5]))


def _rewrite(head: RequestHead, peer: str | None, fqdn: Callable[[], str], client: RealClient,
             extra: tuple[bytes, bytes] | None, connection: list[bytes]) -> RequestRewrite:
    """``request_rewrite`` for this head, its values decoded as aiohttp presents them."""
    first = head.first
    host = first.get(b"host")
    return request_rewrite(
        connection=[text(v) for v in connection],
        forwarded_for=[text(v) for v in head.all(wire.FORWARDED_FOR_B)] if wire.FORWARDED_FOR_B in first else (),
        client_ip=peer, scheme=client.scheme,
        host=text(host) if host is not None else fqdn(),  # aiohttp's request.host without a Host header
        trusted_peer=client.trusted, extra=((text(extra[0]), text(extra[1])),) if extra is not None else (),
    )


def _filtered_upstream_head(head: RequestHead, origin: Origin, peer: str | None, rid: Callable[[], bytes],
                            fqdn: Callable[[], str], extra: tuple[bytes, bytes] | None, client: RealClient) -> bytes:
    """The general case: every line is checked against the request's own rewrite (names listed
    in ``Connection``, ``extra``'s name and, from an untrusted peer, ``CLIENT_CLAIMS`` dropped too)."""
    parts = [head.method.encode(), b" ", origin.prefix, head.target, b" HTTP/1.1\r\n"]
    conn_values = head.all(b"connection") if b"connection" in head.first else []
    plan = _rewrite(head, peer, fqdn, client, extra, conn_values)
    drop = {name.encode("utf-8", "surrogateescape") for name in plan.drop} | wire.FRAMING
    has_request_id = False
    for name, value in head.headers:
        lname = name.lower()
        if lname in drop or b"_" in name or (not value.isascii() and not wire.utf8_ok(value)):
            continue
        if lname == wire.REQUEST_ID_B:
            has_request_id = True
        parts += (name, b": ", value, b"\r\n")
    _added(parts, head, plan, origin)
    if not has_request_id:
        parts += (wire.REQUEST_ID_LINE, rid(), b"\r\n")
    _framing(parts, head)
    return b"".join(parts)


def _added(parts: list[bytes], head: RequestHead, plan: RequestRewrite, origin: Origin) -> None:
    """Host when the client sent none (the transport's), then the rewrite's added lines."""
    if b"host" not in head.first:
        parts += (b"Host: ", origin.host_header, b"\r\n")
    for name, value in plan.add:
        parts += (name.encode(), b": ", value.encode("utf-8", "surrogateescape"), b"\r\n")


def _framing(parts: list[bytes], head: RequestHead) -> None:
    """The body framing and the end of the head."""
    if head.chunked:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    elif head.content_length is not None:
        parts.append(b"Content-Length: %d\r\n" % head.content_length)
    elif head.method not in wire.NO_BODY_METHODS:
        parts.append(b"Content-Length: 0\r\n")
    parts.append(b"\r\n")


# --------------------------------------------------------------------------- responses


def needs_framing(head: RequestHead, rh: ResponseHead) -> bool:
    """The relayed body needs framing of the proxy's own: chunked for an HTTP/1.1 client, the end
    of the connection for HTTP/1.0. False for HEAD, 204 and 304 (no body) and when the instance's
    Content-Length still describes the bytes relayed."""
    return not (head.method == "HEAD" or rh.status in _NO_BODY_STATUS or (rh.cl_index >= 0 and not rh.chunked))


def known_client_head(head: RequestHead, rh: ResponseHead, extra: tuple[bytes, ...], keep_alive: bool) -> bytes:
    """``client_head`` for a cached response head (Content-Length framed, never re-chunked),
    memoized on the head for the last (extra, version, keep-alive) it was sent with."""
    memo = rh.client_memo
    version = head.version
    if memo is not None and memo[0] == extra and memo[1] == version and memo[2] is keep_alive:
        return memo[3]  # type: ignore[no-any-return]
    data = client_head(head, rh, extra, False, keep_alive)
    rh.client_memo = (extra, version, keep_alive, data)
    return data


def client_head(head: RequestHead, rh: ResponseHead, extra: tuple[bytes, ...], chunked: bool,
                keep_alive: bool) -> bytes:
    """The response head for the client: the instance's end-to-end lines, the proxy's own
    (``extra``: ``X-Fly-Instance``, the affinity cookie), Date and Server when missing, the framing."""
    version = head.version
    status = rh.status
    key = (version, status, rh.reason)
    line = _STATUS_LINES.get(key)
    if line is None:
        if len(_STATUS_LINES) > 256:
            _STATUS_LINES.clear()
        line = _STATUS_LINES[key] = wire.status_line(version, status, rh.reason)
    parts = [line, _filtered_response(rh) if rh.odd else rh.block()]
    parts += extra
    if not rh.has_date:
        parts += (b"Date: ", wire.http_date(), b"\r\n")
    if not rh.has_server:
        parts.append(wire.SERVER_LINE)
    if chunked:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    parts.append(wire.connection_header(keep_alive, version))
    parts.append(b"\r\n")
    return b"".join(parts)


def _filtered_response(rh: ResponseHead) -> bytes:
    """``downstream_response_headers`` in full: also drop the names listed in Connection."""
    tokens = wire.connection_tokens([v for n, v in rh.headers if n.lower() == b"connection"])
    drop = wire.RESPONSE_REPLACED | tokens
    parts: list[bytes] = []
    for name, value in rh.headers:
        lname = name.lower()
        if lname in drop or (rh.chunked and lname == b"content-length"):
            continue
        if value.isascii() or wire.utf8_ok(value):
            parts += (name, b": ", value, b"\r\n")
    return b"".join(parts)
