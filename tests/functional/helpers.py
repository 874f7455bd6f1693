"""Small helpers shared by functional tests (no fixtures here)."""

from __future__ import annotations

import re
from http.cookies import SimpleCookie

import aiohttp

COOKIE = "fly-instance-id"


def base(server) -> str:  # type: ignore[no-untyped-def]
    return f"http://127.0.0.1:{server.main_port}"


def admin(server) -> str:  # type: ignore[no-untyped-def]
    return f"http://127.0.0.1:{server.admin_port}"


def affinity_cookie(resp: aiohttp.ClientResponse) -> str | None:
    """The affinity cookie value set by this response, if any."""
    for header in resp.headers.getall("Set-Cookie", []):
        jar: SimpleCookie = SimpleCookie()
        jar.load(header)
        if COOKIE in jar:
            return jar[COOKIE].value
    return None


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when absent)."""
    total = 0.0
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{(.*?)\}})? (\S+)$")
    for line in text.splitlines():
        m = pattern.match(line)
        if not m:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(1) or ""))
        if labels and any(got.get(k) != v for k, v in labels.items()):
            continue
        total += float(m.group(2))
    return total
