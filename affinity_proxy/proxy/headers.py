"""Header filtering for the forward path: what crosses the proxy and what is added.

Pure functions over header multidicts, called once per forwarded request or response. They do no
I/O, keep every end-to-end header (repeated names such as ``Set-Cookie`` stay separate), drop
hop-by-hop headers (RFC 9110 7.6.1) and everything named in ``Connection``, and never emit a name
or value that could split a header block (CR, LF, NUL) or that is not encodable on the wire.
Imports only the standard library and multidict: no aiohttp, nothing of ours.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from typing import TypeAlias

from multidict import CIMultiDict

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
#: Request headers that make claims about the client, dropped unless the peer is a trusted proxy:
#: apps and frameworks believe them, so a client could otherwise choose its own address or scheme.
CLIENT_CLAIMS: frozenset[str] = frozenset(
    {"forwarded", "x-real-ip", FLY_CLIENT_IP_HEADER.lower(), FLY_FORWARDED_PROTO_HEADER.lower()})
#: The response header naming the instance that answered (set by the proxy on every forwarded answer).
INSTANCE_HEADER = "X-Fly-Instance"
#: Where a request id is taken from, in order (Fly's first, so logs correlate with Fly's).
REQUEST_ID_HEADERS: tuple[str, ...] = (FLY_REQUEST_ID_HEADER, "X-Request-Id")


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
_FORBIDDEN_IN_VALUE = re.compile(r"[\r\n\x00]")


def is_safe_name(name: str) -> bool:
    """True when ``name`` is an RFC 9110 token (so it cannot carry CR, LF, NUL, ``:`` or spaces)."""
    return bool(_TOKEN.fullmatch(name))


def is_safe_value(value: str) -> bool:
    """True when ``value`` has no CR/LF/NUL and encodes as UTF-8.

    The second check matters because aiohttp decodes raw header bytes with ``surrogateescape``:
    such a value would make the outgoing writer raise mid-request instead of being dropped here.
    """
    if _FORBIDDEN_IN_VALUE.search(value):
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


def connection_tokens(headers: Mapping[str, str]) -> frozenset[str]:
    """Lower-cased header names listed in every ``Connection`` header (these are hop-by-hop too)."""
    getall = getattr(headers, "getall", None)
    values = getall("Connection", []) if getall is not None else [headers.get("Connection", "")]
    return frozenset(token.strip().lower() for value in values for token in value.split(",") if token.strip())


def _end_to_end(headers: Mapping[str, str], extra_drop: Iterable[str] = (), *,
                underscores: bool = True) -> CIMultiDict[str]:
    """Copy ``headers`` minus hop-by-hop, Connection-named, ``extra_drop`` and unsafe pairs
    (``underscores=False``: also names containing ``_``)."""
    dropped = HOP_BY_HOP | connection_tokens(headers) | {name.lower() for name in extra_drop}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() in dropped or not is_safe_header(name, value) or (not underscores and "_" in name):
            continue
        out.add(name, value)
    return out


def upstream_request_headers(
    headers: Mapping[str, str],
    *,
    client_ip: str | None,
    scheme: str,
    host: str | None,
    request_id: str | None = None,
    drop: Collection[str] = (),
    trusted_peer: bool = False,
) -> CIMultiDict[str]:
    """Headers to send to the instance for a client request carrying ``headers``.

    Keeps every end-to-end header (repeats preserved, order kept) including the client's ``Host``:
    like Traefik's default ``passHostHeader: true``, the instance sees the name the user typed,
    which virtual hosting, absolute redirects and WebSocket origin checks depend on. Drops
    hop-by-hop headers, names listed in ``Connection`` and the names in ``drop`` (routing headers
    such as ``fly-force-instance-id`` that are meant for the proxy only).

    Header names containing ``_`` are dropped (nginx's ``underscores_in_headers off``: an app
    that maps ``X_Forwarded_For`` onto ``X-Forwarded-For``, as CGI-style environments do, would
    otherwise believe it), and so are ``CLIENT_CLAIMS`` (``Forwarded``, ``X-Real-IP``,
    ``Fly-Client-IP``, ``Fly-Forwarded-Proto``) unless ``trusted_peer``.

    ``X-Forwarded-For`` keeps the entries already present (all lines joined into one) and gets
    ``client_ip`` (the TCP peer) appended, as nginx's ``$proxy_add_x_forwarded_for``; with no
    ``client_ip`` it is passed on unchanged. Entries left of the peers the app trusts may be forged.
    ``X-Forwarded-Proto`` is set to ``scheme`` (the client's real scheme: ``realip.client_scheme``)
    and ``X-Forwarded-Host`` to ``host`` (replacing any client-sent value, omitted when ``host`` is
    None). ``X-Request-Id`` is set to ``request_id`` only when the client sent none. Added values
    that are unsafe are skipped, never emitted. Pure; O(number of headers); returns a new
    multidict the caller may mutate.
    """
    out = _end_to_end(headers, drop if trusted_peer else (*drop, *CLIENT_CLAIMS), underscores=False)
    if client_ip and is_safe_value(client_ip):
        prior = ", ".join(v.strip() for v in out.popall("X-Forwarded-For", []) if v.strip())
        out["X-Forwarded-For"] = f"{prior}, {client_ip}" if prior else client_ip
    out.popall("X-Forwarded-Proto", None)
    if is_safe_value(scheme):
        out["X-Forwarded-Proto"] = scheme
    if host and is_safe_value(host):
        out["X-Forwarded-Host"] = host
    else:
        out.popall("X-Forwarded-Host", None)
    if request_id and "X-Request-Id" not in out and is_safe_value(request_id):
        out["X-Request-Id"] = request_id
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
