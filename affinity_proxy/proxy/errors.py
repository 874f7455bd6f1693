"""JSON error responses: every refusal the proxy itself produces has a small JSON body.

Messages are fixed strings chosen here, never request data, so nothing a client sends is echoed.
"""

from __future__ import annotations

import json

from aiohttp import web

_TITLES = {
    400: "bad request",
    401: "unauthorized",
    404: "not found",
    405: "method not allowed",
    413: "request body too large",
    431: "request header fields too large",
    502: "bad gateway",
    503: "service unavailable",
    504: "gateway timeout",
}


def json_error(
    status: int, message: str, *, code: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON error: ``{"error": <code>, "message": <message>, "status": N}``."""
    body = {"error": code or _TITLES.get(status, "error").replace(" ", "_"), "message": message, "status": status}
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        content_type="application/json",
        headers=headers,
    )
