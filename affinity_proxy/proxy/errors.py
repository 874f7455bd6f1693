"""JSON error responses: every refusal the proxy itself produces has a small JSON body.

Messages are fixed strings chosen here, never request data, so nothing a client sends is echoed.
"""

from __future__ import annotations

from aiohttp import web

from affinity_proxy.proxy.act import error_body


def json_error(
    status: int, message: str, *, code: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON error (``act.error_body``) as an aiohttp response."""
    return web.Response(
        status=status,
        body=error_body(status, message, code),
        content_type="application/json",
        headers=headers,
    )
