"""The same script of requests against both engines: the same answers, headers and metrics.

Each engine gets its own proxy (own memory pin store) over the same three demo backends. Random
choices (the instance of a new anonymous session) are compared by shape, everything deterministic
(user-key hashing, forced instances, errors, counters) by value.
"""

from __future__ import annotations

import re
import time
from dataclasses import replace
from typing import Any

import aiohttp

from affinity_proxy.routing.cookie import CookieCodec
from affinity_proxy.serve.app import ProxyServer
from tests.engines.fast.raw import exchange
from tests.functional.helpers import COOKIE, affinity_cookie, base
from tests.support.backends import make_config

#: Metric samples compared exactly (durations only by their count).
COMPARED = re.compile(
    r"^(affinity_requests_total|affinity_responses_total|affinity_repins_total|affinity_pin_conflicts_total"
    r"|affinity_replays_total|affinity_upstream_errors_total|affinity_store_errors_total"
    r"|affinity_upstream_request_duration_seconds_count)(\{[^}]*\})? (\S+)$"
)


async def script(server: ProxyServer, http: aiohttp.ClientSession) -> list[Any]:
    url = base(server)
    out: list[Any] = []

    async def get(path: str, **kwargs: Any) -> tuple[int, dict[str, Any], str | None, aiohttp.ClientResponse]:
        async with http.get(url + path, **kwargs) as resp:
            body = await resp.read()
            doc = await resp.json() if resp.content_type == "application/json" and body else {}
            out.append((path, resp.status, "X-Fly-Instance" in resp.headers, affinity_cookie(resp) is not None,
                        resp.headers.get("Retry-After"), resp.headers.getall("Server", [])))
            return resp.status, doc, affinity_cookie(resp), resp

    _, doc, anon_cookie, _ = await get("/")
    _, again, _, _ = await get("/", headers={"Cookie": f"{COOKIE}={anon_cookie}"})
    out.append(("sticky", again["instance"] == doc["instance"]))
    _, doc, user_cookie, _ = await get("/", headers={"X-User-Id": "parity-user"})
    out.append(("user instance", doc["instance"]))
    await get("/", headers={"X-User-Id": "parity-user", "Cookie": f"{COOKIE}={user_cookie}"})
    await get("/?userId=query-user")
    await get("/", headers={"Cookie": f"{COOKIE}=forged~value"})
    ghost = CookieCodec(server.config.cookie.secret).encode("ghost", int(time.time()), "")
    await get("/", headers={"Cookie": f"{COOKIE}={ghost}"})
    _, doc, _, _ = await get("/", headers={"fly-force-instance-id": "c"})
    out.append(("forced", doc["instance"]))
    _, doc, _, _ = await get("/_affinity/session-check", params={"userId": "parity-user"})
    out.append(("session-check keys", sorted(doc)))
    await get("/_affinity/nope")
    async with http.post(url + "/upload", data=b"z" * 1000, headers={"X-User-Id": "parity-user"}) as resp:
        out.append(("upload", resp.status, (await resp.json())["bytes"]))
    await get("/_control/respond", params={"status": "418", "body": "teapot"})
    for data in (b"POST / HTTP/1.1\r\nHost: p\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                 b"GET / HTTP/1.1\r\nHost: p\r\nHost: q\r\n\r\n"):
        result = await exchange(server.main_port, data)
        resp = result.responses[0]
        out.append(("raw", resp.status, resp.json(), result.closed, resp.getall("Server")))
    async with http.get(f"http://127.0.0.1:{server.admin_port}/metrics") as resp:
        text = await resp.text()
    metrics = {}
    for line in text.splitlines():
        m = COMPARED.match(line)
        if m:
            labels = m.group(2) or ""
            if m.group(1) == "affinity_upstream_request_duration_seconds_count":
                labels = ""  # anonymous sessions land on random instances: compare the total
            metrics[(m.group(1), labels)] = metrics.get((m.group(1), labels), 0.0) + float(m.group(3))
    out.append(("metrics", metrics))
    return out


async def test_both_engines_answer_and_count_alike(backends, http) -> None:
    results = {}
    for engine in ("aiohttp", "fast"):
        server = ProxyServer(replace(make_config(backends), engine=engine))
        await server.start()
        try:
            results[engine] = await script(server, http)
        finally:
            await server.stop()
    slow, fast = results["aiohttp"], results["fast"]
    assert len(slow) == len(fast)
    for a, b in zip(slow, fast, strict=True):
        assert a == b, (a, b)
    metrics = dict(fast[-1][1])
    assert metrics[("affinity_requests_total", '{action="forward",reason="cookie"}')] >= 2
    assert metrics[("affinity_responses_total", '{code="400"}')] == 2
