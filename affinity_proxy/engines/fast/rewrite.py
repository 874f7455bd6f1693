"""Header blocks crossing the fast engine, both ways, as bytes.

``upstream_head`` is ``forwarding.headers.upstream_request_headers`` plus ``forward_http``'s
framing rules for a raw request head: the client's end-to-end lines as received (hop-by-hop
headers, names listed in ``Connection``, names with ``_``, ``fly-force-instance-id`` and, from an
untrusted peer, ``CLIENT_CLAIMS`` dropped), ``Host`` when the client sent none,
``X-Forwarded-For`` (the peer appended), ``-Proto`` (the client's real scheme), ``-Host``, ``X-Request-Id`` unless
the client sent one, and the body framing (Content-Length as declared, chunked for a chunked body,
``Content-Length: 0`` for a body-less method other than GET/HEAD/OPTIONS/TRACE, as aiohttp's
client sends). ``client_head`` is ``downstream_response_headers`` plus ``merge_extra_headers``
and aiohttp's response framing for the client's HTTP version. Pure; no I/O.
"""

from __future__ import annotations

from collections.abc import Callable

from affinity_proxy.proxy.realip import RealClient

from . import wire
from .head import RequestHead
from .response import ResponseHead
from .upstream import Origin

_NO_BODY_STATUS = (204, 304)
_STATUS_LINES: dict[tuple[bytes, int, bytes], bytes] = {}


def upstream_head(head: RequestHead, origin: Origin, peer: str | None, rid: Callable[[], bytes],
                  fqdn: Callable[[], str], extra: tuple[bytes, bytes] | None, client: RealClient) -> bytes:
    """The request head sent to ``origin``. ``extra``: one more header that replaces the client's
    (fly's private-forward ``fly-replay-src``); ``client``: the realip result (its scheme, whether
    the peer is trusted). Everything but X-Request-Id depends only on the (shared, immutable) head,
    the instance, the peer address and ``client``, so it is built once per head for the last of
    those seen and reused around a fresh request id."""
    if extra is not None or head.odd or (head.claims and not client.trusted):
        return _filtered_upstream_head(head, origin, peer, rid, fqdn, extra, client)
    memo = head.up_memo
    if (memo is None or memo[0] is not origin or memo[1] != peer or memo[2] != client.scheme
            or memo[3] is not client.trusted):
        parts = [head.method.encode(), b" ", origin.prefix, head.target, b" HTTP/1.1\r\n", b"".join(head.lines)]
        forwarded = head.all(b"x-forwarded-for") if b"x-forwarded-for" in head.first else []
        _proxy_lines(parts, head, forwarded, origin.host_header, peer, fqdn, client.scheme)
        after: list[bytes] = []
        _framing(after, head, None)
        memo = head.up_memo = (origin, peer, client.scheme, client.trusted, b"".join(parts), b"".join(after))
    if head.has_rid:
        return memo[4] + memo[5]  # type: ignore[no-any-return]
    return b"".join((memo[4], b"X-Request-Id: ", rid(), b"\r\n", memo[5]))


def _filtered_upstream_head(head: RequestHead, origin: Origin, peer: str | None, rid: Callable[[], bytes],
                            fqdn: Callable[[], str], extra: tuple[bytes, bytes] | None, client: RealClient) -> bytes:
    """The general case: headers named in ``Connection``, ``extra``'s name and, from an untrusted
    peer, ``CLIENT_CLAIMS`` are dropped too."""
    parts = [head.method.encode(), b" ", origin.prefix, head.target, b" HTTP/1.1\r\n"]
    drop = wire.REQUEST_REPLACED
    conn_values = head.all(b"connection") if b"connection" in head.first else []
    tokens = wire.connection_tokens(conn_values) if conn_values else frozenset()
    if tokens:
        drop = drop | tokens
    if extra is not None:
        drop = drop | {extra[0]}
    if not client.trusted:
        drop = drop | wire.CLIENT_CLAIMS
    forwarded: list[bytes] = []
    has_request_id = False
    for name, value in head.headers:
        lname = name.lower()
        if lname in drop:
            if lname == b"x-forwarded-for" and b"x-forwarded-for" not in tokens:
                forwarded.append(value)
            continue
        if (not value.isascii() and not wire.utf8_ok(value)) or b"_" in name:
            continue
        if lname == b"x-request-id":
            has_request_id = True
        parts += (name, b": ", value, b"\r\n")
    _proxy_lines(parts, head, forwarded, origin.host_header, peer, fqdn, client.scheme)
    if not has_request_id:
        parts += (b"X-Request-Id: ", rid(), b"\r\n")
    _framing(parts, head, extra)
    return b"".join(parts)


_PROTO_LINES = {"http": b"X-Forwarded-Proto: http\r\n", "https": b"X-Forwarded-Proto: https\r\n"}


def _proxy_lines(parts: list[bytes], head: RequestHead, forwarded: list[bytes], default_host: bytes,
                 peer: str | None, fqdn: Callable[[], str], scheme: str) -> None:
    """Host when missing, X-Forwarded-For/Proto/Host."""
    if b"host" not in head.first:
        parts += (b"Host: ", default_host, b"\r\n")
    prior = b", ".join(v.strip() for v in forwarded if v.strip() and wire.utf8_ok(v)) if forwarded else b""
    if peer:
        ip = peer.encode()
        prior = prior + b", " + ip if prior else ip
    if prior:
        parts += (b"X-Forwarded-For: ", prior, b"\r\n")
    parts.append(_PROTO_LINES.get(scheme) or b"X-Forwarded-Proto: %s\r\n" % scheme.encode())
    host = head.first.get(b"host")
    if host is None:  # aiohttp's request.host without a Host header
        host = fqdn().encode()
    if host and wire.utf8_ok(host):
        parts += (b"X-Forwarded-Host: ", host, b"\r\n")


def _framing(parts: list[bytes], head: RequestHead, extra: tuple[bytes, bytes] | None) -> None:
    """``extra``, the body framing and the end of the head."""
    if extra is not None:
        parts += (extra[0], b": ", extra[1], b"\r\n")
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
