"""Access log: one structured line per request, with a request id passed upstream; no secrets."""

from __future__ import annotations

import json
import logging

from affinity_proxy.observability.logs import JsonFormatter
from tests.functional.helpers import COOKIE, affinity_cookie, base
from tests.support.backends import make_config


async def test_one_access_line_per_request_with_decision_and_request_id(engine: str, backends, start_proxy, http,
                                                                        caplog) -> None:
    server = await start_proxy(make_config(backends, engine=engine))
    caplog.set_level(logging.INFO, logger="affinity_proxy.access")
    async with http.get(base(server) + "/hello?x=1", headers={"X-User-Id": "logged-user"}) as resp:
        cookie = affinity_cookie(resp)
        body = await resp.json()
    async with http.get(base(server) + "/again", headers={"Cookie": f"{COOKIE}={cookie}",
                                                          "Fly-Request-Id": "01JQSECXHAJR7ZPGFRTQW5EK95-yyz"}) as resp:
        again = await resp.json()
    records = [r for r in caplog.records if r.name == "affinity_proxy.access"]
    assert len(records) == 2
    first, second = (r.fields for r in records)  # type: ignore[attr-defined]
    assert first["method"] == "GET" and first["path"] == "/hello" and first["status"] == 200
    assert first["reason"] == "hash" and first["instance"] == body["instance"] and first["action"] == "forward"
    assert isinstance(first["duration_ms"], float)
    assert len(first["request_id"]) >= 16
    assert body["headers"]["x-request-id"] == first["request_id"], "the request id is passed upstream"
    assert second["request_id"] == "01JQSECXHAJR7ZPGFRTQW5EK95-yyz" and second["reason"] == "cookie"
    assert again["instance"] == body["instance"]
    rendered = "\n".join(JsonFormatter().format(r) for r in records)
    for line in rendered.splitlines():
        json.loads(line)
    assert cookie not in rendered and "logged-user" not in rendered


async def test_bogus_request_id_is_replaced(engine: str, backends, start_proxy, http, caplog) -> None:
    server = await start_proxy(make_config(backends, engine=engine))
    caplog.set_level(logging.INFO, logger="affinity_proxy.access")
    async with http.get(base(server) + "/", headers={"X-Request-Id": "x" * 500}) as resp:
        assert resp.status == 200
    (record,) = [r for r in caplog.records if r.name == "affinity_proxy.access"]
    assert len(record.fields["request_id"]) < 100  # type: ignore[attr-defined]
