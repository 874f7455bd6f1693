"""An instance's response head, filtered for the client as it is parsed, and a cache of them.

``ResponseHead.add`` is llhttp's per-header callback: it keeps every pair (for the rare general
filter) and the lines that reach the client unchanged (``downstream_response_headers``: no
hop-by-hop header, no ``X-Fly-Instance`` of the instance's, nothing unsafe), noting the framing.
``ResponseCache`` remembers complete heads by their exact bytes: an instance answering the same
head again (within a second, since ``Date`` is part of it) with a body of the announced length
in the same read is relayed without running llhttp, the same bytes meaning the same parse.
Pure; no I/O.
"""

from __future__ import annotations

from . import wire

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
        self.client_memo: tuple[object, ...] | None = None  # ``rewrite.known_client_head``'s memo

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
