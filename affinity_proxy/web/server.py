"""aiohttp plumbing: a runner whose protocol answers parse errors with JSON, and 431 for headers
that exceed the limits (aiohttp's default answer to every parse error is a plain-text 400).
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server


def _is_header_overflow(exc: BaseException | None) -> bool:
    if isinstance(exc, LineTooLong):
        return True
    return exc is not None and "Too many headers" in str(exc)


class _JsonErrorRequestHandler(RequestHandler):  # type: ignore[misc]
    """Same protocol; protocol-level errors become JSON (431 for header overflow)."""

    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        resp = super().handle_error(request, status, exc, message)
        if status == 400 and _is_header_overflow(exc):
            status = 431
        if status in (400, 431):
            title = "request header fields too large" if status == 431 else "malformed request"
            body = {"error": title.replace(" ", "_"), "message": title, "status": status}
            resp = web.Response(status=status, body=json.dumps(body).encode(), content_type="application/json")
            resp.force_close()
        return resp


class _JsonErrorServer(Server):
    __slots__ = ()

    def __call__(self) -> RequestHandler:
        return _JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)


class ProxyAppRunner(web.AppRunner):
    """AppRunner whose connections use ``_JsonErrorRequestHandler``."""

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        server.__class__ = _JsonErrorServer
        return server


def handler_args(max_header_bytes: int) -> dict[str, Any]:
    """Parser limits: one header line may use the whole header budget; the total is checked by the
    guard middleware (aiohttp only limits single lines)."""
    return {
        "max_line_size": max(max_header_bytes, 1024),
        "max_field_size": max(max_header_bytes, 1024),
        "max_headers": 128,
    }
