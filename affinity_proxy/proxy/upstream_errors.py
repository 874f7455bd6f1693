"""Exceptions the forward path raises to the request handler, and the mapping from aiohttp's.

The handler decides what the client sees (JSON error, retry on another instance, health report);
this module only classifies. ``upstream_error_from`` is the single place that knows which aiohttp
exception means "nothing was sent" (safe to retry) versus "the instance may have seen the
request". Imports aiohttp, the standard library and ``proxy.act`` (the status per kind).
"""

from __future__ import annotations

from typing import Literal, TypeAlias

import aiohttp

from affinity_proxy.proxy.act import UPSTREAM_STATUS

UpstreamErrorKind: TypeAlias = Literal["connect", "timeout", "protocol"]

_DEFAULT_STATUS = UPSTREAM_STATUS


class UpstreamError(Exception):
    """Talking to the instance failed.

    Attributes (all read-only by convention):

    - ``kind``: ``"connect"`` (refused, unreachable, DNS, TLS, or connect/pool-wait timeout),
      ``"timeout"`` (no bytes for ``read_timeout`` while waiting for the response or its body) or
      ``"protocol"`` (the instance disconnected, answered garbage, or refused a WebSocket
      handshake). Doubles as the ``kind`` label of ``affinity_upstream_errors_total``.
    - ``retryable``: True only when no byte of the request reached the instance (``connect``),
      so the same request, body included, may be sent to another instance.
    - ``status``: what the client should get: 502 for connect/protocol, 504 for timeout.
    - ``response_started``: True when the failure came after the client's response headers were
      sent. The client connection has then already been closed so the client sees a truncated
      response; the caller must not try to answer (aiohttp would drop it anyway) and should only
      count and report.
    - ``upstream_status``: the HTTP status the instance answered a WebSocket handshake with, when
      that is why it failed; otherwise None.
    """

    def __init__(
        self,
        kind: UpstreamErrorKind,
        message: str = "",
        *,
        retryable: bool | None = None,
        status: int | None = None,
        response_started: bool = False,
        upstream_status: int | None = None,
    ) -> None:
        super().__init__(message or kind)
        self.kind: UpstreamErrorKind = kind
        self.retryable: bool = (kind == "connect") if retryable is None else retryable
        self.status: int = _DEFAULT_STATUS[kind] if status is None else status
        self.response_started = response_started
        self.upstream_status = upstream_status

    def __repr__(self) -> str:
        return (
            f"UpstreamError(kind={self.kind!r}, status={self.status}, retryable={self.retryable}, "
            f"response_started={self.response_started}, message={str(self)!r})"
        )


class BodyTooLarge(Exception):
    """The request body is over ``max_body_bytes``; the client should get 413.

    ``declared`` is the Content-Length when that alone was too large (raised before the instance
    was contacted), or None when the body was counted while streaming. ``limit`` is the limit.
    """

    status = 413

    def __init__(self, limit: int, declared: int | None = None) -> None:
        detail = f"declared {declared} bytes" if declared is not None else "body exceeded while streaming"
        super().__init__(f"request body over {limit} bytes ({detail})")
        self.limit = limit
        self.declared = declared


def upstream_error_from(exc: BaseException, *, response_started: bool = False) -> UpstreamError:
    """Classify an aiohttp/asyncio exception raised while talking to an instance.

    Order matters: aiohttp's connect timeout is both a ``ServerTimeoutError`` and a
    ``TimeoutError``, but it means nothing was sent, so it is ``connect`` (retryable). The
    result is never retryable once ``response_started``. Pure; the caller chains ``from exc``.
    """
    kind: UpstreamErrorKind
    if isinstance(exc, aiohttp.ConnectionTimeoutError | aiohttp.ClientConnectorError):
        kind = "connect"
    elif isinstance(exc, TimeoutError):
        kind = "timeout"
    else:
        kind = "protocol"
    retryable = kind == "connect" and not response_started
    return UpstreamError(
        kind,
        f"{type(exc).__name__}: {exc}",
        retryable=retryable,
        response_started=response_started,
    )
