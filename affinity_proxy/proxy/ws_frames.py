"""WebSocket frame headers, read as bytes go by: what a byte relay must know and nothing more.

After the 101 the relay forwards each direction's bytes as they arrive, masked or not (RFC 6455
5.1: client frames are masked, instance frames are not; the relay never unmasks). ``FrameScanner``
reads only the frame headers of one direction so that the relay can (1) refuse a message over
``limits.max_ws_message_bytes`` before any byte of its offending frame is forwarded (the header
says the payload length), (2) know when that side has sent a CLOSE frame, and (3) know when the
bytes forwarded so far end on a frame boundary, the only place where the relay may insert a frame
of its own (a PING, or a CLOSE when the other side vanished). A header split across two reads is
held back until it is whole, so a refused frame never has a byte forwarded.

``frame()`` builds the few frames the relay sends itself. Pure: no I/O, no clocks, no aiohttp.
Protocol details the endpoints check anyway (UTF-8 in text frames, reserved bits and opcodes,
control frames over 125 bytes) are left to them, as nginx does.
"""

from __future__ import annotations

import os

__all__ = ["CLOSE", "PING", "FrameScanner", "close_frame", "frame"]

CLOSE = 0x8
PING = 0x9
#: RFC 6455 7.4.1: the message is too big to process.
MESSAGE_TOO_BIG = 1009
#: RFC 6455 7.4.1: protocol error (a 64-bit length with its top bit set).
PROTOCOL_ERROR = 1002


class FrameScanner:
    """One direction's frame headers. ``feed(data)`` returns the bytes that may be forwarded now.

    ``max_message`` (0 = no limit) bounds a message's payload, summed over its fragments (as
    aiohttp's ``max_msg_size`` does); control frames do not count. When a frame would pass the
    limit, ``feed`` returns only what precedes that frame's header and sets ``violation`` (1009,
    or 1002 for an impossible length); from then on the scanner keeps reading headers (to see a
    CLOSE) but returns nothing. ``close_seen`` turns true when a CLOSE frame's header went by.
    ``at_boundary`` is true when everything returned so far ends where a frame ends.
    """

    __slots__ = ("close_seen", "held", "max_message", "message", "need", "violation")

    def __init__(self, max_message: int = 0) -> None:
        self.max_message = max_message
        self.need = 0  # payload bytes of the current frame still to come
        self.held = b""  # the start of a header split across reads, not forwarded yet
        self.message = 0  # payload bytes of the current (possibly fragmented) data message
        self.close_seen = False
        self.violation = 0

    @property
    def at_boundary(self) -> bool:
        """The bytes returned so far end where a frame ends (after a refusal nothing more is
        returned, so they end before the refused frame however much of it is still to come)."""
        return bool(self.violation) or (self.need == 0 and not self.held)

    def feed(self, data: bytes) -> bytes:
        need = self.need
        n = len(data)
        if not need and not self.held and n > 1 and not self.violation:
            # The usual read of a chatty session: exactly one whole small frame.
            b1 = data[1]
            length = b1 & 0x7F
            if length < 126 and (6 if b1 & 0x80 else 2) + length == n:
                opcode = data[0] & 0x0F
                if opcode & 0x8:
                    if opcode == CLOSE:
                        self.close_seen = True
                    return data
                message = length if opcode else self.message + length
                if not self.max_message or message <= self.max_message:
                    self.message = message
                    return data
        if need >= n and not self.held:  # the middle of a payload
            self.need = need - n
            return b"" if self.violation else data
        if self.held:
            data = self.held + data
            n = len(data)
            self.held = b""
        pos = need
        limit = self.max_message
        while pos < n:
            if n - pos < 2:
                break
            b1 = data[pos + 1]
            length = b1 & 0x7F
            head = 6 if b1 & 0x80 else 2
            if length == 126:
                head += 2
                if n - pos < head:
                    break
                length = int.from_bytes(data[pos + 2:pos + 4], "big")
            elif length == 127:
                head += 8
                if n - pos < head:
                    break
                length = int.from_bytes(data[pos + 2:pos + 10], "big")
            elif n - pos < head:
                break
            opcode = data[pos] & 0x0F
            if opcode & 0x8:
                if opcode == CLOSE:
                    self.close_seen = True
            elif not self.violation:
                self.message = length if opcode else self.message + length
                if length >> 63:
                    return self._refuse(data, pos, head + length, PROTOCOL_ERROR)
                if limit and self.message > limit:
                    return self._refuse(data, pos, head + length, MESSAGE_TOO_BIG)
            pos += head + length
        if pos >= n:
            self.need = pos - n
            return b"" if self.violation else data
        self.need = 0
        self.held = data[pos:]
        return b"" if self.violation else data[:pos]

    def _refuse(self, data: bytes, pos: int, size: int, code: int) -> bytes:
        """Stop forwarding at ``pos`` (a header); skip that frame and keep scanning what follows."""
        self.violation = code
        rest = data[pos + size:]
        self.need = max(0, pos + size - len(data))
        if rest:
            self.feed(rest)
        return data[:pos]


def frame(opcode: int, payload: bytes, *, masked: bool) -> bytes:
    """One FIN frame of a control-sized payload (≤ 125 bytes), masked when it goes to the instance."""
    if len(payload) > 125:
        raise ValueError("control frame payload over 125 bytes")
    if not masked:
        return bytes((0x80 | opcode, len(payload))) + payload
    key = os.urandom(4)
    body = bytes(b ^ key[i & 3] for i, b in enumerate(payload))
    return bytes((0x80 | opcode, 0x80 | len(payload))) + key + body


def close_frame(code: int, reason: bytes = b"", *, masked: bool) -> bytes:
    """A CLOSE frame with ``code`` and ``reason`` (cut to the 123 bytes a CLOSE frame allows)."""
    return frame(CLOSE, code.to_bytes(2, "big") + reason[:123], masked=masked)
