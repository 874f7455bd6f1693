"""ByteRelay: after the 101, move a WebSocket's bytes both ways, reading only frame headers.

Each leg's socket stays with the aiohttp protocol that did its handshake (the server's request
handler on the client leg, the client connection's handler on the instance leg); the relay is
installed as their payload parser (``set_parser``, the hook aiohttp's own WebSocket readers use,
which also hands over what they read after the 101), then a ``_Tap`` goes in front of each so that
reads come straight here while aiohttp still owns each connection's life, flow control and
bookkeeping. Every chunk read is written, as it is, to the other leg's transport. Frames are
neither unmasked nor re-encoded: ``proxy.ws_frames.FrameScanner`` reads their headers to enforce
``max_ws_message_bytes``, to see CLOSE frames go by and to find frame boundaries.

What the relay does on its own, always at a frame boundary of the stream it writes into:

- a message over the limit: nothing of it is forwarded; both legs get CLOSE 1009 (1002 for an
  impossible length) and the relay waits for their answers;
- a leg that ends without a closing handshake (connection lost, or no answer to a heartbeat
  ping): the other leg gets CLOSE 1001 (the client went away) or 1014 (the instance went away);
- ``heartbeat`` seconds without a byte from a leg: it is pinged, and declared gone when nothing
  comes back within half that time (aiohttp's heartbeat rule); the answers are forwarded like any
  frame (an unsolicited PONG is legal, RFC 6455 5.5.3);
- ``close(code)`` (graceful shutdown): both legs get that CLOSE.

CLOSE frames of the endpoints are forwarded untouched, so close codes and reasons pass as sent.
The relay ends when both legs have exchanged CLOSE frames (or are gone), closing both sockets;
``close_timeout`` after the first CLOSE it drops whatever is left. Back-pressure goes across:
while a leg's transport has more buffered than its high-water mark, the other leg is not read.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from affinity_proxy.proxy.ws_frames import PING, FrameScanner, close_frame, frame

__all__ = ["GOING_AWAY", "INSTANCE_GONE", "ByteRelay"]

log = logging.getLogger("affinity_proxy.forwarding.websocket")

GOING_AWAY = 1001  # sent to the instance when the client vanished
INSTANCE_GONE = 1014  # "bad gateway": sent to the client when the instance vanished
# Seconds between checks of a paused writer (only while one is paused), doubling up to the maximum:
# aiohttp's protocols expose ``writing_paused`` but no public wait for its end.
_RETRY_PAUSED = 0.005
_RETRY_PAUSED_MAX = 0.2


class _Leg:
    """One side of the relay: its transport, the protocol aiohttp gave it, and what it has done."""

    __slots__ = ("close_sent", "eof", "gone_code", "masked", "name", "peer", "ping_out", "protocol", "rx",
                 "scanner", "throttled", "transport")

    def __init__(self, name: str, transport: Any, protocol: Any, max_message: int, *, masked: bool,
                 gone_code: int) -> None:
        self.name = name
        self.transport = transport
        self.protocol = protocol  # aiohttp's: its ``writing_paused`` says when to stop the other leg
        self.scanner = FrameScanner(max_message)  # the frames this leg sends
        self.masked = masked  # frames written to this leg must be masked (the instance leg)
        self.gone_code = gone_code  # what the other leg is told when this one vanishes
        self.peer: _Leg = self
        self.eof = False
        self.close_sent = False  # a CLOSE frame (forwarded or ours) was written to this leg
        self.rx = False  # bytes came from this leg since the last heartbeat tick
        self.ping_out = False
        self.throttled = False

    def finished(self) -> bool:
        """Gone, or both CLOSE frames exchanged with it (its own forwarded whole)."""
        s = self.scanner
        return self.eof or (self.close_sent and s.close_seen and s.need == 0 and not s.held)


class _Feed:
    """The parser interface aiohttp's protocols call with a leg's bytes (``feed_data``/``feed_eof``)."""

    __slots__ = ("leg", "relay")

    def __init__(self, relay: ByteRelay, leg: _Leg) -> None:
        self.relay = relay
        self.leg = leg

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.relay.received(self.leg, data)
        return False, b""

    def feed_eof(self) -> None:
        self.relay.lost(self.leg)


class _Tap(asyncio.Protocol):
    """Put in front of aiohttp's protocol on a leg's transport once the relay runs: bytes come
    straight here (not through aiohttp's ``data_received`` and its per-read bookkeeping), while
    everything else still reaches aiohttp's protocol: flow control (its ``writing_paused`` and the
    engine's write-stall deadline), end of stream and ``connection_lost`` (its cleanup, and the
    ``feed_eof`` of the relay's parser)."""

    __slots__ = ("inner", "leg", "relay")

    def __init__(self, relay: ByteRelay, leg: _Leg, inner: Any) -> None:
        self.relay = relay
        self.leg = leg
        self.inner = inner

    def data_received(self, data: bytes) -> None:
        self.relay.received(self.leg, data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()  # type: ignore[no-any-return]

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class ByteRelay:
    """The relay of one session; ``client_feed``/``instance_feed`` go to each leg's ``set_parser``.

    ``wait()`` returns once the session is over (both sockets closed, or closing after their last
    CLOSE frame is written). No task of its own: everything runs in the
    protocols' callbacks and a few timers (heartbeat, close timeout, a paused writer's check).
    """

    def __init__(self, client: tuple[Any, Any], instance: tuple[Any, Any], *, max_message_bytes: int,
                 heartbeat: float | None, close_timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self.client = _Leg("client", *client, max_message_bytes, masked=False, gone_code=GOING_AWAY)
        self.instance = _Leg("instance", *instance, max_message_bytes, masked=True, gone_code=INSTANCE_GONE)
        self.client.peer, self.instance.peer = self.instance, self.client
        self.client_feed = _Feed(self, self.client)
        self.instance_feed = _Feed(self, self.instance)
        self._done: asyncio.Future[None] = self._loop.create_future()
        self._forwarding = True
        self._close_timeout = close_timeout
        self._timers: list[asyncio.TimerHandle] = []
        self._closing: asyncio.TimerHandle | None = None
        self._heartbeat = heartbeat
        if heartbeat:
            for leg in (self.client, self.instance):
                self._timers.append(self._loop.call_later(heartbeat, self._beat, leg))

    @property
    def done(self) -> bool:
        return self._done.done()

    def tap(self) -> None:
        """Once each leg's aiohttp protocol has handed over what it held (``set_parser``), read
        both transports directly (``_Tap``)."""
        for leg in (self.client, self.instance):
            if not leg.eof and not leg.transport.is_closing():
                leg.transport.set_protocol(_Tap(self, leg, leg.protocol))

    async def wait(self) -> None:
        await asyncio.shield(self._done)

    # --- the data path -------------------------------------------------------------------------

    def received(self, src: _Leg, data: bytes) -> None:
        src.rx = True
        scanner = src.scanner
        out = scanner.feed(data)
        dst = src.peer
        if out and self._forwarding and not dst.eof:
            dst.transport.write(out)
            if dst.protocol.writing_paused and not src.throttled:
                self._throttle(src)
        if scanner.violation and self._forwarding:
            log.debug("websocket %s sent a message over the limit: closing with %s", src.name, scanner.violation)
            self._close_both(scanner.violation, b"")
        elif scanner.close_seen:
            if self._forwarding and not dst.close_sent:
                dst.close_sent = True  # the endpoint's CLOSE, passed on as it is
            self._check()

    def lost(self, leg: _Leg) -> None:
        """A leg's connection ended (aiohttp's ``connection_lost``)."""
        if leg.eof:
            return
        leg.eof = True
        if self.done:
            return
        other = leg.peer
        if not leg.scanner.close_seen and not other.close_sent:
            log.debug("websocket %s leg ended without a closing handshake; closing the other with %s",
                      leg.name, leg.gone_code)
            self._forwarding = False
            self._send_close(other, leg.gone_code)
        self._check()

    def close(self, code: int, reason: bytes = b"") -> None:
        """Start closing both legs with ``code`` (a graceful shutdown: 1001)."""
        if not self.done:
            self._close_both(code, reason)

    def abort(self) -> None:
        """Drop both sockets now (the handler was cancelled, or the close timeout passed)."""
        for leg in (self.client, self.instance):
            if not leg.eof:
                leg.eof = True
                leg.transport.abort()
        self._end()

    # --- closing ---------------------------------------------------------------------------------

    def _close_both(self, code: int, reason: bytes) -> None:
        self._forwarding = False
        for leg in (self.client, self.instance):
            self._send_close(leg, code, reason)
        self._check()

    def _send_close(self, dst: _Leg, code: int, reason: bytes = b"") -> None:
        """Our own CLOSE to ``dst``, if the stream into it is at a frame boundary (else drop it)."""
        if dst.eof or dst.close_sent:
            return
        if dst.peer.scanner.at_boundary:
            dst.transport.write(close_frame(code, reason, masked=dst.masked))
            dst.close_sent = True
        else:  # mid-frame: no frame of ours can be put in; the socket goes
            dst.eof = True
            dst.transport.abort()

    def _check(self) -> None:
        """End once both legs are finished; start the close timeout at the first CLOSE."""
        if self.done:
            return
        c, i = self.client, self.instance
        if c.finished() and i.finished():
            for leg in (c, i):
                if not leg.eof:
                    leg.eof = True
                    leg.transport.close()  # after what is buffered: the last CLOSE frame
            self._end()
        elif self._closing is None:
            self._closing = self._loop.call_later(self._close_timeout, self._close_timed_out)

    def _close_timed_out(self) -> None:
        if not self.done:
            log.debug("websocket closing handshake not finished after %ss; dropping both legs", self._close_timeout)
            self.abort()

    def _end(self) -> None:
        for timer in self._timers:
            timer.cancel()
        if self._closing is not None:
            self._closing.cancel()
        if not self._done.done():
            self._done.set_result(None)

    # --- back-pressure and heartbeat ----------------------------------------------------------------

    def _throttle(self, src: _Leg) -> None:
        src.throttled = True
        src.transport.pause_reading()
        self._timers.append(self._loop.call_later(_RETRY_PAUSED, self._unthrottle, src, _RETRY_PAUSED))

    def _unthrottle(self, src: _Leg, delay: float) -> None:
        if self.done or src.eof:
            return
        dst = src.peer
        if dst.eof or not dst.protocol.writing_paused:
            src.throttled = False
            src.transport.resume_reading()
        else:
            delay = min(delay * 2, _RETRY_PAUSED_MAX)
            self._timers.append(self._loop.call_later(delay, self._unthrottle, src, delay))
        if len(self._timers) > 64:
            self._timers = [t for t in self._timers if not t.cancelled() and t.when() > self._loop.time()]

    def _beat(self, leg: _Leg) -> None:
        """Every ``heartbeat`` s: quiet leg -> PING; a PING unanswered for half that -> the leg is gone."""
        heartbeat = self._heartbeat
        if self.done or not self._forwarding or leg.eof or heartbeat is None:
            return
        if leg.rx:
            leg.rx = leg.ping_out = False
            delay = heartbeat
        elif leg.ping_out:
            log.debug("websocket %s leg did not answer a heartbeat ping; dropping it", leg.name)
            leg.transport.abort()
            self.lost(leg)
            return
        elif leg.peer.scanner.at_boundary:
            leg.transport.write(frame(PING, b"", masked=leg.masked))
            leg.ping_out = True
            delay = heartbeat / 2
        else:
            delay = heartbeat
        self._timers.append(self._loop.call_later(delay, self._beat, leg))
        if len(self._timers) > 64:
            self._timers = [t for t in self._timers if not t.cancelled() and t.when() > self._loop.time()]
