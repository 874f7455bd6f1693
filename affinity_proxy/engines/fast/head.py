"""Parsed request heads: the value the fast engine routes and forwards, and the cache of them.

``RequestHead`` is what llhttp's callbacks fill in (``protocol``) and everything after reads;
``HeadCache`` hands the same object to every repeat of identical head bytes; ``for_aiohttp``
says which requests go to the aiohttp application instead (see ``protocol``). Pure; no I/O.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote

from affinity_proxy.proxy.context import ProxyContext
from affinity_proxy.proxy.headers import REQUEST_ID_HEADERS, is_sane_request_id

_REQUEST_IDS = tuple(name.lower().encode() for name in REQUEST_ID_HEADERS)  # Fly's first

_AFFINITY_PREFIX = b"/_affinity/"
#: Methods the aiohttp preflight refuses (405): CONNECT (no tunnels) and TRACE (never forwarded: it
#: would echo the client's cookies back, and nginx refuses it too).
_AIOHTTP_METHODS = frozenset({"CONNECT", "TRACE"})
#: aiohttp's ``max_headers``: more fields is its 431.
MAX_FIELDS = 128


def text(value: bytes) -> str:
    """A header value as aiohttp presents it (UTF-8, undecodable bytes as surrogates)."""
    return value.decode("utf-8", "surrogateescape")


class RequestHead:
    """One parsed request head; shared, never changed once parsed (``protocol.HeadCache`` hands the
    same object to every repeat of identical head bytes). ``first`` maps lower-case names to the
    first value (as ``CIMultiDict.get`` does); ``headers`` keeps every pair in order with the names
    as sent; ``lines`` are the header lines that go upstream unchanged (never names with ``_``;
    ``odd``: a ``Connection`` header names other headers, so the upstream head needs the full
    filter; ``claims``: the head has a ``headers.CLIENT_CLAIMS`` header, which an untrusted peer's
    request must not forward)."""

    __slots__ = ("_rid", "chunked", "claims", "client_memo", "content_length", "first", "has_rid", "headers",
                 "hot_key", "hot_sources", "keep_alive", "lane", "lines", "malformed", "method", "odd", "target",
                 "te_unsupported", "up_memo", "version")

    def __init__(self) -> None:
        self.method = ""
        self.target = b""
        self.version = b"1.1"
        self.keep_alive = True
        self.headers: list[tuple[bytes, bytes]] = []
        self.first: dict[bytes, bytes] = {}
        self.lines: list[bytes] = []
        self.up_memo: dict[Any, tuple[Any, ...]] | None = None  # ``rewrite.upstream_head``'s memos by origin
        self._rid: bytes | bool | None = False  # ``client_request_id`` memo (False: not computed)
        self.has_rid = False  # a forwardable X-Request-Id is among ``lines``
        self.odd = False
        self.claims = False
        self.client_memo: tuple[Any, ...] | None = None  # ``protocol.real_client``'s per-head memo
        self.te_unsupported = False  # a Transfer-Encoding other than exactly ``chunked``: 501
        self.content_length: int | None = None
        self.chunked = False
        self.malformed = False  # rejected by aiohttp's parser rules on top of llhttp's
        self.hot_key: object = None  # ``route.HotRoutes.key`` memo, valid for ``hot_sources``
        self.hot_sources: object = None
        self.lane: Any = None  # ``lane.ReplayLane``: this head's replay answer, while it holds

    def get(self, name: str, default: str | None = None) -> str | None:
        """Case-insensitive first value, decoded (the ``Mapping.get`` ``extract_user_key`` uses)."""
        value = self.first.get(name.lower().encode("latin-1", "replace"))
        return text(value) if value is not None else default

    def client_request_id(self) -> bytes | None:
        """Fly's request id when present, else the client's X-Request-Id, when sane (at most 128
        printable ASCII characters, no space: ``proxy.headers.is_sane_request_id``). Memoized."""
        rid = self._rid
        if rid is False:
            rid = None
            for name in _REQUEST_IDS:
                raw = self.first.get(name)
                if raw:
                    value = text(raw)
                    if is_sane_request_id(value):
                        rid = raw
                        break
            self._rid = rid
        return rid  # type: ignore[return-value]

    def all(self, lname: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == lname]

    @property
    def has_body(self) -> bool:
        """aiohttp's ``body_exists``: a chunked body or a positive Content-Length."""
        return self.chunked or bool(self.content_length)

    @property
    def path(self) -> str:
        """The decoded path without the query (``request.path``), for logs and reserved paths."""
        raw = self.target.split(b"?", 1)[0].decode("utf-8", "surrogateescape")
        return unquote(raw) if "%" in raw else raw


class Query:
    """The query string parsed on first use (only when a ``query`` user-key source asks)."""

    __slots__ = ("_parsed", "_raw")

    def __init__(self, target: bytes) -> None:
        self._raw = target
        self._parsed: dict[str, str] | None = None

    def get(self, name: str, default: str | None = None) -> str | None:
        if self._parsed is None:
            _, _, qs = self._raw.partition(b"?")
            parsed: dict[str, str] = {}
            for key, value in parse_qsl(qs.decode("utf-8", "surrogateescape"), keep_blank_values=True):
                parsed.setdefault(key, value)
            self._parsed = parsed
        return self._parsed.get(name, default)


class HeadCache:
    """Request heads by their exact bytes, for heads without a body (most GETs repeat byte for
    byte per client). A hit skips llhttp and the checks: the same bytes parse and check the same
    way, and a body-less message leaves llhttp ready for the next one as if it had seen it. A head
    is kept from its second sighting on (one-off heads cost a hash, not a copy); heads over
    ``MAX_BYTES`` are not kept; the cache is emptied when full (``MAX_ENTRIES``, or ``MAX_COST``:
    a parsed field costs far more than its bytes, so a client's distinct heads of many small fields
    could otherwise hold about 48 MB) or when the config object is replaced (a reload may change
    the limits the checks used)."""

    MAX_BYTES = 4096
    MAX_ENTRIES = 1024
    MAX_COST = 8 * 1024 * 1024
    FIELD_COST = 320  # about what one parsed field costs (its pair, its line, its ``first`` entry)

    __slots__ = ("_config", "_cost", "_ctx", "_heads", "_seen", "lanes")

    def __init__(self, ctx: ProxyContext) -> None:
        self._ctx = ctx
        self._config: object = ctx.config
        self._heads: dict[bytes, RequestHead] = {}
        #: the heads by their bytes without ``get``'s config check, for the lanes' look-up (a lane
        #: checks the config its answer depends on itself; ``get`` empties the cache after a reload)
        self.lanes = self._heads
        self._seen: set[int] = set()
        self._cost = 0

    def get(self, data: bytes) -> RequestHead | None:
        if self._config is not self._ctx.config:
            self._config = self._ctx.config
            self._heads.clear()
            self._cost = 0
            return None
        return self._heads.get(data)

    def put(self, data: bytes, head: RequestHead) -> None:
        if len(data) > self.MAX_BYTES:
            return
        digest = hash(data)
        if digest not in self._seen:
            if len(self._seen) >= 4 * self.MAX_ENTRIES:
                self._seen.clear()
            self._seen.add(digest)
            return
        cost = 2 * len(data) + self.FIELD_COST * len(head.headers)  # the key, the head and its upstream copy
        if len(self._heads) >= self.MAX_ENTRIES or self._cost + cost > self.MAX_COST:
            self._heads.clear()
            self._cost = 0
        self._heads[data] = head
        self._cost += cost


def for_aiohttp(head: RequestHead, raw_size: int, max_header_bytes: int, max_body_bytes: int) -> bool:
    """Requests the aiohttp application serves (see the module docstring). ``raw_size`` is the
    head's length on the wire, which bounds the preflight's header-block size from above
    (``len(fields)`` at most)."""
    target = head.target
    if head.method in _AIOHTTP_METHODS or head.version not in (b"1.1", b"1.0") or not target.startswith(b"/"):
        return True
    if target.startswith(_AFFINITY_PREFIX) or (b"%" in target and head.path.startswith("/_affinity/")):
        return True
    expect = head.first.get(b"expect")
    if expect is not None and expect.strip().lower() != b"100-continue":
        return True
    if head.content_length is not None and head.content_length > max_body_bytes:
        return True
    headers = head.headers
    if len(headers) > MAX_FIELDS:
        return True
    if raw_size + len(headers) <= max_header_bytes:
        return False
    size = len(head.method) + len(target) + 12 + 4 * len(headers)
    for name, value in headers:
        size += len(name) + len(value)
    return size > max_header_bytes
