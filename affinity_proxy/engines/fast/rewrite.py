"""Header blocks crossing the fast engine, both ways, as bytes.

``upstream_head`` applies ``proxy.headers.request_rewrite`` (the one definition of what is
dropped and added on the way to the instance, shared with the aiohttp engine) to a raw request
head, plus this transport's framing: ``Host`` when the client sent none, Content-Length as
declared, chunked for a chunked body, ``Content-Length: 0`` for a body-less method other than
GET/HEAD/OPTIONS/TRACE (as aiohttp's client sends). ``client_head`` is
``downstream_response_headers`` plus ``merge_extra_headers`` and aiohttp's response framing for
the client's HTTP version. Pure; no I/O.

The instance's response head is filtered for the client as it is parsed (``ResponseHead``, below):
``ResponseHead.add`` is llhttp's per-header callback; it keeps every pair (for the rare general
filter) and the lines that reach the client unchanged (``downstream_response_headers``: no
hop-by-hop header, no ``X-Fly-Instance`` of the instance's, nothing unsafe), noting the framing.
``ResponseCache`` remembers complete heads by their exact bytes: an instance answering the same
head again (within a second, since ``Date`` is part of it) with a body of the announced length
in the same read is relayed without running llhttp, the same bytes meaning the same parse.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from affinity_proxy.proxy.headers import RequestRewrite, request_added, request_dropped, request_rewrite
from affinity_proxy.proxy.realip import RealClient

from . import wire
from .head import RequestHead, text

_NO_BODY_STATUS = (204, 304)
_STATUS_LINES: dict[tuple[bytes, int, bytes], bytes] = {}
#: ``_added_lines`` by (X-Forwarded-For lines, peer, scheme, Host): a bounded cache, emptied when full.
_ADDED_LINES: dict[tuple[object, ...], bytes] = {}
#: ``upstream_head``'s memos kept per head (one per instance), emptied when full.
_UP_MEMOS = 64
#: ``known_client_head``'s memos kept per response head (one per instance's lines), emptied when full.
_CLIENT_MEMOS = 64
#: A rewrite's dropped names as the bytes heads are keyed by (the few distinct sets seen), bounded.
_DROP_BYTES: dict[frozenset[str], frozenset[bytes]] = {}


class Target(Protocol):
    """What the request head needs of an ``upstream.Origin`` (which imports this module)."""

    prefix: bytes
    host_header: bytes


def upstream_head(head: RequestHead, origin: Target, peer: str | None, rid: Callable[[], bytes],
                  fqdn: Callable[[], str], extra: tuple[bytes, bytes] | None, client: RealClient) -> bytes:
    """The request head sent to ``origin``. ``extra``: one more header that replaces the client's
    (fly's private-forward ``fly-replay-src``); ``client``: the realip result (its scheme, whether
    the peer is trusted). In the usual case (no ``extra``, ``Connection`` naming no other header,
    no client claim from an untrusted peer) the rewrite drops only ``REQUEST_DROPPED``, which the
    head's ``lines`` were filtered against as they were parsed; everything but X-Request-Id then
    depends only on the (shared, immutable) head, the instance, the peer address and ``client``,
    so it is built once per head and instance for the last of those seen (new sessions spread one
    head over every instance) and reused around a fresh request id."""
    if extra is not None or head.odd or (head.claims and not client.trusted):
        return _filtered_upstream_head(head, origin, peer, rid, fqdn, extra, client)
    memos = head.up_memo
    memo = memos.get(origin) if memos is not None else None
    if memo is None or memo[1] != peer or memo[2] != client.scheme or memo[3] is not client.trusted:
        parts = [head.method.encode(), b" ", origin.prefix, head.target, b" HTTP/1.1\r\n", b"".join(head.lines)]
        if b"host" not in head.first:
            parts += (b"Host: ", origin.host_header, b"\r\n")
        parts.append(_added_lines(head, peer, client.scheme, fqdn))
        after: list[bytes] = []
        _framing(after, head)
        if memos is None or len(memos) >= _UP_MEMOS:
            memos = head.up_memo = {}
        memo = memos[origin] = (origin, peer, client.scheme, client.trusted, b"".join(parts), b"".join(after))
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


def _filtered_upstream_head(head: RequestHead, origin: Target, peer: str | None, rid: Callable[[], bytes],
                            fqdn: Callable[[], str], extra: tuple[bytes, bytes] | None, client: RealClient) -> bytes:
    """The general case: every line is checked against the request's own rewrite (names listed
    in ``Connection``, ``extra``'s name and, from an untrusted peer, ``CLIENT_CLAIMS`` dropped too)."""
    parts = [head.method.encode(), b" ", origin.prefix, head.target, b" HTTP/1.1\r\n"]
    if extra is None and not head.odd:  # only client claims to drop: the usual added lines
        names = request_dropped(trusted_peer=client.trusted)
        added: bytes | None = None
    else:
        plan = _rewrite(head, peer, fqdn, client, extra, head.all(b"connection"))
        names = plan.drop
        added = b"".join(f"{name}: {value}\r\n".encode("utf-8", "surrogateescape") for name, value in plan.add)
    drop = _DROP_BYTES.get(names)
    if drop is None:
        if len(_DROP_BYTES) >= 256:
            _DROP_BYTES.clear()
        drop = _DROP_BYTES[names] = frozenset(name.encode("utf-8", "surrogateescape") for name in names) | wire.FRAMING
    has_request_id = False
    for name, value in head.headers:
        lname = name.lower()
        if lname in drop or b"_" in name or (not value.isascii() and not wire.utf8_ok(value)):
            continue
        if lname == wire.REQUEST_ID_B:
            has_request_id = True
        parts += (name, b": ", value, b"\r\n")
    if b"host" not in head.first:
        parts += (b"Host: ", origin.host_header, b"\r\n")
    parts.append(added if added is not None else _added_lines(head, peer, client.scheme, fqdn))
    if not has_request_id:
        parts += (wire.REQUEST_ID_LINE, rid(), b"\r\n")
    _framing(parts, head)
    return b"".join(parts)


def _added_lines(head: RequestHead, peer: str | None, scheme: str, fqdn: Callable[[], str]) -> bytes:
    """``request_added``'s lines as bytes, for a head the usual rewrite applies to. They depend only
    on the client's X-Forwarded-For lines, the peer, the scheme and the Host, which repeat across
    heads (distinct users behind one client or proxy), so they are kept by those values."""
    first = head.first
    host = first.get(b"host")
    forwarded = tuple(head.all(wire.FORWARDED_FOR_B)) if wire.FORWARDED_FOR_B in first else ()
    key = (forwarded, peer, scheme, host)
    lines = _ADDED_LINES.get(key)
    if lines is None:
        add = request_added([text(v) for v in forwarded], peer, scheme, text(host) if host is not None else fqdn())
        lines = b"".join(f"{name}: {value}\r\n".encode("utf-8", "surrogateescape") for name, value in add)
        if len(_ADDED_LINES) >= 1024:
            _ADDED_LINES.clear()
        _ADDED_LINES[key] = lines
    return lines


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
    memoized on the head per ``extra`` (instances answering the same head bytes share one
    ``ResponseHead``, and new sessions get each instance's lines) for the last (version,
    keep-alive) it was sent with."""
    memos = rh.client_memo
    version = head.version
    if memos is not None:
        memo = memos.get(extra)
        if memo is not None and memo[0] == version and memo[1] is keep_alive:
            return memo[2]
    data = client_head(head, rh, extra, False, keep_alive)
    if memos is None or len(memos) >= _CLIENT_MEMOS:
        memos = rh.client_memo = {}
    memos[extra] = (version, keep_alive, data)
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



# --------------------------------------------------------------------------- response heads from the instance

#: Response header names that need more than copying (dropped, replaced or framing).
_SPECIAL: frozenset[bytes] = wire.RESPONSE_REPLACED | {b"content-length", b"date", b"server"}
_NO_BODY = (204, 304)


class ResponseHead:
    """One response head from an instance; shared and unchanged once complete."""

    __slots__ = ("_block", "chunked", "cl_index", "client_memo", "has_date", "has_server", "headers", "keep_alive",
                 "length", "lines", "odd", "reason", "status")

    def __init__(self) -> None:
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.lines: list[bytes] = []
        self.cl_index = -1
        self.length: int | None = None
        self.chunked = False
        self.has_date = False
        self.has_server = False
        self.odd = False  # Connection names other headers: the exchange filters ``headers`` itself
        self.keep_alive = True
        self._block: bytes | None = None
        #: ``rewrite.known_client_head``'s memos: extra lines -> (version, keep-alive, bytes)
        self.client_memo: dict[tuple[bytes, ...], tuple[bytes, bool, bytes]] | None = None

    def add(self, name: bytes, value: bytes) -> None:
        if value and value[-1] in (32, 9):
            value = value.rstrip(b" \t")
        self.headers.append((name, value))
        lname = name.lower()
        if lname in _SPECIAL:
            if lname == b"content-length":
                self.cl_index = len(self.lines)
                self.length = int(value) if value.isdigit() else None
            elif lname == b"date":
                self.has_date = True
            elif lname == b"server":
                self.has_server = value.isascii() or wire.utf8_ok(value)  # else dropped below
            elif lname == b"transfer-encoding":
                self.chunked = True
                return
            elif lname == b"connection":
                if value.lower() not in (b"keep-alive", b"close"):
                    self.odd = True
                return
            else:
                return
        if value.isascii() or wire.utf8_ok(value):
            self.lines.append(name + b": " + value + b"\r\n")

    def block(self) -> bytes:
        """The lines the client gets, joined once (without Content-Length when chunked)."""
        block = self._block
        if block is None:
            lines = self.lines
            if self.chunked and self.cl_index >= 0:
                lines = lines[: self.cl_index] + lines[self.cl_index + 1:]
            block = self._block = b"".join(lines)
        return block

    def until_close(self) -> bool:
        """No framing: the body ends when the instance closes (RFC 9112 6.3)."""
        return self.status not in _NO_BODY and not self.chunked and self.cl_index < 0


class ResponseCache:
    """Complete response heads by their bytes (see the module docstring). Bounded; emptied when full."""

    MAX_ENTRIES = 1024
    MAX_BYTES = 4096

    __slots__ = ("_heads",)

    def __init__(self) -> None:
        self._heads: dict[bytes, ResponseHead] = {}

    def match(self, data: bytes, head_only: bool) -> tuple[ResponseHead, bytes] | None:
        """``(head, body)`` when ``data`` is exactly one known head plus its whole body, else None."""
        end = data.find(b"\r\n\r\n", 0, self.MAX_BYTES)
        if end < 0:
            return None
        end += 4
        head = self._heads.get(data[:end])
        if head is None:
            return None
        size = 0 if head_only or head.status in _NO_BODY else head.length
        if size is None or len(data) - end != size:
            return None
        return head, data[end:]

    def remember(self, data: bytes, head: ResponseHead, head_only: bool) -> None:
        """Keep ``head`` if ``data`` (one whole read) was exactly it plus its body."""
        if head.odd or head.chunked or head.length is None or head.status < 200:
            return
        end = data.find(b"\r\n\r\n", 0, self.MAX_BYTES)
        if end < 0:
            return
        end += 4
        size = 0 if head_only or head.status in _NO_BODY else head.length
        if len(data) - end != size:
            return
        if len(self._heads) >= self.MAX_ENTRIES:
            self._heads.clear()
        self._heads[data[:end]] = head
