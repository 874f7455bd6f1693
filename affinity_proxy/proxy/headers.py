"""The header rules of the forward path, written once for both engines, and the names they use.

``request_rewrite`` is the upstream request-header rewrite as a plan (``RequestRewrite``: which
names are dropped, which lines the proxy adds): hop-by-hop headers (RFC 9110 7.6.1) and everything
named in ``Connection``, names with ``_``, untrusted client claims (``Forwarded``, ``X-Real-IP``,
``Fly-*``), ``X-Forwarded-*`` recomputed, the replay marker. Each engine applies the plan to its own
representation: ``upstream_request_headers`` here on multidicts (the aiohttp engine, the Fly edge
stand-in), ``engines/fast/rewrite.py`` on the raw bytes of a head. Also the response side
(``downstream_response_headers``, ``merge_extra_headers``) and the header names and constants both
engines share. Pure: no I/O, never emits a name or value that could split a header block (CR, LF,
NUL) or that is not encodable on the wire. Imports the standard library, multidict and
``routing.replay`` (the routing header names): no aiohttp, no engine.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import NamedTuple, TypeAlias

from multidict import CIMultiDict

from affinity_proxy.routing.replay import FORCE_INSTANCE_HEADER

#: Headers that describe one connection, never the message; a proxy must not forward them.
#: ``HTTP2-Settings`` is connection-specific by definition (RFC 7540 3.2.1): it only means something
#: beside ``Upgrade: h2c``, which is never passed on either (h2c smuggling needs both).
HOP_BY_HOP: frozenset[str] = frozenset(
    {
        "connection",
        "http2-settings",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

#: Fly's edge sets these on every request (docs/fly-protocol.md): the client's address, its scheme,
#: and the request id that Fly's own logs carry (both engines forward it as X-Request-Id).
FLY_CLIENT_IP_HEADER = "Fly-Client-IP"
FLY_FORWARDED_PROTO_HEADER = "Fly-Forwarded-Proto"
FLY_REQUEST_ID_HEADER = "Fly-Request-Id"
#: The de-facto proxy headers (and RFC 7239's ``Forwarded``): the proxy writes the ``X-Forwarded-*``
#: ones; ``realip`` reads them (and Fly's) from trusted peers only.
FORWARDED_HEADER = "Forwarded"
REAL_IP_HEADER = "X-Real-IP"
FORWARDED_FOR_HEADER = "X-Forwarded-For"
FORWARDED_PROTO_HEADER = "X-Forwarded-Proto"
FORWARDED_HOST_HEADER = "X-Forwarded-Host"
#: The request id passed to the instance (the client's own when it sent one, else the proxy's).
REQUEST_ID_HEADER = "X-Request-Id"
#: Request headers that make claims about the client, dropped unless the peer is a trusted proxy:
#: apps and frameworks believe them, so a client could otherwise choose its own address or scheme.
CLIENT_CLAIMS: frozenset[str] = frozenset(
    h.lower() for h in (FORWARDED_HEADER, REAL_IP_HEADER, FLY_CLIENT_IP_HEADER, FLY_FORWARDED_PROTO_HEADER))
#: Request headers the proxy writes itself (``request_rewrite``): a client's lines are never copied.
PROXY_WRITTEN: frozenset[str] = frozenset(
    h.lower() for h in (FORWARDED_FOR_HEADER, FORWARDED_PROTO_HEADER, FORWARDED_HOST_HEADER))
#: Routing headers meant for the proxy only (``fly-force-instance-id``): never passed to the instance.
PROXY_ONLY: frozenset[str] = frozenset({FORCE_INSTANCE_HEADER})
#: What the proxy never copies upstream from any request (the fast engine filters each header line
#: against this as it is parsed; ``request_rewrite`` adds the per-request names to it).
REQUEST_DROPPED: frozenset[str] = HOP_BY_HOP | PROXY_WRITTEN | PROXY_ONLY
#: The response header naming the instance that answered (set by the proxy on every forwarded answer).
INSTANCE_HEADER = "X-Fly-Instance"
#: Where a request id is taken from, in order (Fly's first, so logs correlate with Fly's).
REQUEST_ID_HEADERS: tuple[str, ...] = (FLY_REQUEST_ID_HEADER, REQUEST_ID_HEADER)


def is_sane_request_id(value: str) -> bool:
    """A request id worth keeping (and passing upstream): at most 128 printable ASCII characters,
    no space. Anything else is replaced by one of ours."""
    return len(value) <= 128 and value.isascii() and value.isprintable() and " " not in value
#: RFC 9110 9.2.2: methods a client may repeat, so a request that failed after it was sent may be retried
#: (when it has no body). Both engines' retry rule reads this one set.
IDEMPOTENT_METHODS: frozenset[str] = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

#: What both engines answer to a request body framed by a coding other than ``chunked`` alone
#: (``gzip, chunked``, ``identity``...): nginx's 501; the body cannot be framed, so the connection ends.
UNSUPPORTED_CODING = (501, "only Transfer-Encoding: chunked is supported", "transfer_encoding_not_implemented")


def is_chunked_only(value: str | bytes) -> bool:
    """True when a ``Transfer-Encoding`` value is exactly ``chunked`` (case-insensitive)."""
    if isinstance(value, bytes):
        return value.strip().lower() == b"chunked"
    return value.strip().lower() == "chunked"


def is_coding_error(message: str) -> bool:
    """True for llhttp's refusals of a Transfer-Encoding value ("Request has invalid
    `Transfer-Encoding`", "Invalid `Transfer-Encoding` header value"): 501, not 400. Framing
    conflicts (Content-Length with Transfer-Encoding) and empty values stay 400."""
    return "invalid `transfer-encoding`" in message.lower()


#: What callers may pass as extra headers: a mapping, or pairs when a name repeats (Set-Cookie).
ExtraHeaders: TypeAlias = Mapping[str, str] | Iterable[tuple[str, str]]

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def is_safe_name(name: str) -> bool:
    """True when ``name`` is an RFC 9110 token (so it cannot carry CR, LF, NUL, ``:`` or spaces)."""
    return bool(_TOKEN.fullmatch(name))


def is_safe_value(value: str) -> bool:
    """True when ``value`` has no CR/LF/NUL and encodes as UTF-8.

    The second check matters because aiohttp decodes raw header bytes with ``surrogateescape``:
    such a value would make the outgoing writer raise mid-request instead of being dropped here.
    """
    if "\r" in value or "\n" in value or "\x00" in value:  # (three scans beat one regex search)
        return False
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def is_safe_header(name: str, value: str) -> bool:
    """True when the pair can be emitted verbatim without splitting or breaking the header block."""
    return is_safe_name(name) and is_safe_value(value)


def _all(headers: Mapping[str, str], name: str) -> list[str]:
    getall = getattr(headers, "getall", None)
    if getall is not None:
        return list(getall(name, []))
    value = headers.get(name)
    return [] if value is None else [value]


def connection_tokens(headers: Mapping[str, str]) -> frozenset[str]:
    """Lower-cased header names listed in every ``Connection`` header (these are hop-by-hop too)."""
    return tokens_of(_all(headers, "Connection"))


def tokens_of(values: Iterable[str]) -> frozenset[str]:
    """Lower-cased names listed in these ``Connection`` values."""
    return frozenset(token.strip().lower() for value in values for token in value.split(",") if token.strip())


def _end_to_end(headers: Mapping[str, str], extra_drop: Iterable[str] = ()) -> CIMultiDict[str]:
    """Copy ``headers`` minus hop-by-hop, Connection-named, ``extra_drop`` and unsafe pairs."""
    dropped = HOP_BY_HOP | connection_tokens(headers) | {name.lower() for name in extra_drop}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() in dropped or not is_safe_header(name, value):
            continue
        out.add(name, value)
    return out


class RequestRewrite(NamedTuple):
    """What happens to a client request's headers on the way to the instance.

    Applied the same way by both engines: a header line is copied, in order, unless its lower-cased
    name is in ``drop``, its name contains ``_`` (nginx's ``underscores_in_headers off``: an app
    that maps ``X_Forwarded_For`` onto ``X-Forwarded-For``, as CGI-style environments do, would
    otherwise believe it) or the pair is unsafe (``is_safe_header``; the fast engine's llhttp
    already refused the rest, so it checks the UTF-8 of values only); then ``add`` follows; then
    ``X-Request-Id: <the request's id>`` when no ``X-Request-Id`` line was copied. Body framing
    (Content-Length, Transfer-Encoding, Expect) and a missing ``Host`` are each transport's own.
    """

    drop: frozenset[str]
    add: tuple[tuple[str, str], ...]


def request_rewrite(
    *,
    connection: Iterable[str] = (),
    forwarded_for: Iterable[str] = (),
    client_ip: str | None,
    scheme: str,
    host: str | None,
    trusted_peer: bool,
    drop: Collection[str] = PROXY_ONLY,
    extra: Sequence[tuple[str, str]] = (),
) -> RequestRewrite:
    """The rewrite of one request's headers (``RequestRewrite``), from the few values it depends on.

    ``connection`` and ``forwarded_for``: the request's ``Connection`` and ``X-Forwarded-For``
    values, every line in order. Dropped: ``REQUEST_DROPPED``'s hop-by-hop and proxy-written names,
    the names in ``drop`` (by default ``PROXY_ONLY``, routing headers meant for the proxy), the names
    listed in ``Connection``, ``extra``'s names and, unless ``trusted_peer``, ``CLIENT_CLAIMS``.

    Added: ``X-Forwarded-For`` with the entries already present (all lines joined into one) and
    ``client_ip`` (the TCP peer) appended, as nginx's ``$proxy_add_x_forwarded_for``; entries left
    of the peers the app trusts may be forged. ``X-Forwarded-Proto`` is ``scheme`` (the client's
    real scheme: ``realip.client_scheme``), ``X-Forwarded-Host`` is ``host`` (the client's Host),
    omitted when None, then ``extra`` (one name replaced, e.g. the replay marker
    ``fly-replay-src``). Unsafe added values are skipped, never emitted. Pure; O(values given).
    """
    tokens = tokens_of(connection) if connection else frozenset()
    dropped = request_dropped(tokens, trusted_peer=trusted_peer, drop=drop, extra=extra)
    if _FOR in tokens:
        forwarded_for = ()
    return RequestRewrite(dropped, request_added(forwarded_for, client_ip, scheme, host, extra))


def request_dropped(tokens: frozenset[str] = frozenset(), *, trusted_peer: bool, drop: Collection[str] = PROXY_ONLY,
                    extra: Sequence[tuple[str, str]] = ()) -> frozenset[str]:
    """``RequestRewrite.drop`` alone (``request_rewrite``'s rules; ``tokens``: the lower-cased names
    listed in ``Connection``). Without tokens, ``drop`` or ``extra`` the answer is one of two
    constant sets. Pure."""
    if drop is PROXY_ONLY:
        dropped = REQUEST_DROPPED if trusted_peer else _DROPPED_UNTRUSTED
    else:
        dropped = HOP_BY_HOP | PROXY_WRITTEN | {n.lower() for n in drop} | (
            frozenset() if trusted_peer else CLIENT_CLAIMS)
    if tokens:
        dropped = dropped | tokens
    if extra:
        dropped = dropped | {name.lower() for name, _ in extra}
    return dropped


def request_added(forwarded_for: Iterable[str], client_ip: str | None, scheme: str, host: str | None,
                  extra: Sequence[tuple[str, str]] = ()) -> tuple[tuple[str, str], ...]:
    """``RequestRewrite.add`` alone (``request_rewrite``'s rules), for a caller that already knows
    that nothing is dropped but ``REQUEST_DROPPED`` (the fast engine's memoized head). Pure."""
    prior = [v.strip() for v in forwarded_for if v.strip() and is_safe_value(v)] if forwarded_for else []
    if client_ip and is_safe_value(client_ip):
        prior.append(client_ip)
    add: list[tuple[str, str]] = []
    if prior:
        add.append((FORWARDED_FOR_HEADER, ", ".join(prior)))
    if is_safe_value(scheme):
        add.append((FORWARDED_PROTO_HEADER, scheme))
    if host and is_safe_value(host):
        add.append((FORWARDED_HOST_HEADER, host))
    if extra:
        add.extend(pair for pair in extra if is_safe_header(*pair))
    return tuple(add)


_FOR = FORWARDED_FOR_HEADER.lower()
_DROPPED_UNTRUSTED = REQUEST_DROPPED | CLIENT_CLAIMS


def upstream_request_headers(
    headers: Mapping[str, str],
    *,
    client_ip: str | None,
    scheme: str,
    host: str | None,
    request_id: str | None = None,
    drop: Collection[str] = PROXY_ONLY,
    trusted_peer: bool = False,
    extra: Sequence[tuple[str, str]] = (),
) -> CIMultiDict[str]:
    """``request_rewrite`` applied to a multidict: the headers to send to the instance.

    Keeps every end-to-end header (repeats preserved, order kept) including the client's ``Host``:
    like Traefik's default ``passHostHeader: true``, the instance sees the name the user typed,
    which virtual hosting, absolute redirects and WebSocket origin checks depend on.
    ``X-Request-Id`` is set to ``request_id`` only when the client sent none. Pure; O(number of
    headers); returns a new multidict the caller may mutate.
    """
    plan = request_rewrite(
        connection=_all(headers, "Connection"), forwarded_for=_all(headers, FORWARDED_FOR_HEADER),
        client_ip=client_ip, scheme=scheme, host=host, trusted_peer=trusted_peer, drop=drop, extra=extra,
    )
    dropped = plan.drop
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() in dropped or "_" in name or not is_safe_header(name, value):
            continue
        out.add(name, value)
    out.extend(plan.add)
    if request_id and REQUEST_ID_HEADER not in out and is_safe_value(request_id):
        out[REQUEST_ID_HEADER] = request_id
    return out


def downstream_response_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    """Headers of an instance's response that may be copied onto the client's response.

    Drops hop-by-hop headers (the client leg has its own framing and keep-alive, which aiohttp's
    ``StreamResponse`` decides) and names listed in ``Connection``. ``Content-Length`` is kept so
    clients still see sizes, except when the instance framed the body with ``Transfer-Encoding``:
    then the length does not describe the bytes we relay (RFC 9112 6.3) and aiohttp must chunk.
    Repeated names, notably ``Set-Cookie``, stay separate lines. Pure; returns a new multidict.
    """
    out = _end_to_end(headers)
    if "Transfer-Encoding" in headers:
        out.popall("Content-Length", None)
    return out


def _pairs(extra: ExtraHeaders) -> Iterable[tuple[str, str]]:
    if isinstance(extra, Mapping):
        return extra.items()
    return extra


def merge_extra_headers(target: CIMultiDict[str], extra: ExtraHeaders) -> list[str]:
    """Add the proxy's own response headers (``X-Fly-Instance``, the affinity cookie) to ``target``.

    ``Set-Cookie`` is always added next to the instance's own cookies. Any other name replaces the
    instance's value for that name, because the proxy is authoritative for the headers it adds (a
    name repeated inside ``extra`` keeps all its values). Returns the names that were skipped for
    being unsafe, so the caller can log them; nothing unsafe is ever added. Mutates ``target``.
    """
    rejected: list[str] = []
    replaced: set[str] = set()
    for name, value in _pairs(extra):
        if not is_safe_header(name, value):
            rejected.append(repr(name))
            continue
        key = name.lower()
        if key != "set-cookie" and key not in replaced:
            target.popall(name, None)
            replaced.add(key)
        target.add(name, value)
    return rejected
