"""FlyMachinesApiSource against a real aiohttp app on loopback that answers like the Machines API."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from affinity_proxy.membership.fly_api import FlyMachinesApiSource, machine_state, machines_url
from affinity_proxy.membership.sources import DiscoveryError, MembershipSource
from affinity_proxy.routing.model import Instance, InstanceState

APP = "shop"
TOKEN = "fm2_s3cr3t-T0KEN-value"
LOCAL = "148e21ea7a4de8"


def machine(mid: str, state: str, region: str = "ams") -> dict[str, Any]:
    """One list entry shaped like the real API's (extra fields included and ignored)."""
    return {
        "id": mid, "name": f"{mid}-name", "state": state, "region": region, "instance_id": "01H" + mid.upper(),
        "private_ip": "fdaa:0:1::2", "image_ref": {"registry": "registry.fly.io", "repository": APP},
        "config": {"metadata": {"fly_process_group": "app", "fly_platform_version": "v2"}},
        "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z", "events": [],
    }


@dataclass
class FakeMachinesApi:
    """Serves ``GET /v1/apps/{app}/machines``; checks ``Authorization``; answers are changeable."""

    machines: list[Any] = field(default_factory=list)
    accept: str = f"Bearer {TOKEN}"
    status: int = 200
    body: bytes | None = None  # raw body instead of ``machines`` as JSON
    hang: bool = False
    seen: list[web.Request] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(request)
        if request.match_info["app"] != APP:
            return web.json_response({"error": "app not found"}, status=404)
        if request.headers.get("Authorization") != self.accept:
            return web.json_response({"error": "unauthorized"}, status=401)
        if self.hang:
            await self.release.wait()
        if self.body is not None:
            return web.Response(status=self.status, body=self.body, content_type="application/json")
        return web.json_response(self.machines, status=self.status)


@pytest.fixture
async def api() -> AsyncIterator[tuple[FakeMachinesApi, str]]:
    fake = FakeMachinesApi()
    app = web.Application()
    app.router.add_get("/v1/apps/{app}/machines", fake.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield fake, f"http://127.0.0.1:{port}"
    finally:
        fake.release.set()
        await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def source(api_url: str, session: aiohttp.ClientSession, **kw: Any) -> FlyMachinesApiSource:
    args: dict[str, Any] = dict(
        api_url=api_url, token=TOKEN, local_machine_id=LOCAL, private_url="http://{id}.vm.{app}.internal:{port}",
        private_port=8080, local_upstream="http://127.0.0.1:3000", session=session, timeout=2.0,
    )
    args.update(kw)
    return FlyMachinesApiSource(APP, **args)


def states(instances: list[Instance]) -> dict[str, InstanceState]:
    return {i.id: i.state for i in instances}


ALL_STATES = {
    "started": InstanceState.UP,
    "updating": InstanceState.UP,
    "replacing": InstanceState.UP,
    "restarting": InstanceState.UP,
    "created": InstanceState.STOPPED,
    "creating": InstanceState.STOPPED,
    "starting": InstanceState.STOPPED,
    "stopping": InstanceState.STOPPED,
    "stopped": InstanceState.STOPPED,
    "suspending": InstanceState.STOPPED,
    "suspended": InstanceState.STOPPED,
    "failed": InstanceState.DOWN,
    "launch_failed": InstanceState.DOWN,
    "destroying": None,
    "destroyed": None,
    "replaced": None,
    "migrated": None,
    "hibernating": InstanceState.STOPPED,  # unknown: kept, not chosen for new users
}


@pytest.mark.parametrize(("state", "expected"), ALL_STATES.items())
def test_state_table(state: str, expected: InstanceState | None) -> None:
    assert machine_state(state) == expected


async def test_lists_machines_with_mapped_states(
    api: tuple[FakeMachinesApi, str], session: aiohttp.ClientSession
) -> None:
    fake, url = api
    ids = {state: f"{n:014x}" for n, state in enumerate(ALL_STATES, start=0xA0000000000)}
    fake.machines = [machine(LOCAL, "started", "fra")] + [machine(mid, st, "yul") for st, mid in ids.items()]
    src = source(url, session)
    assert isinstance(src, MembershipSource)
    found = await src.fetch()
    expected = {LOCAL: InstanceState.UP} | {mid: ALL_STATES[st] for st, mid in ids.items() if ALL_STATES[st]}
    assert states(found) == expected
    local = found[0]
    assert (local.id, local.local, local.url, local.region) == (LOCAL, True, "http://127.0.0.1:3000", "fra")
    remote = next(i for i in found if i.id == ids["stopped"])
    assert (remote.local, remote.url, remote.region) == (False, f"http://{ids['stopped']}.vm.shop.internal:8080", "yul")
    request = fake.seen[-1]
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert request.path == "/v1/apps/shop/machines"


async def test_bad_entries_are_skipped(api: tuple[FakeMachinesApi, str], session: aiohttp.ClientSession) -> None:
    fake, url = api
    fake.machines = [
        "nope", None, {"state": "started"}, {"id": 12, "state": "started"}, {"id": "bad/id", "state": "started"},
        {"id": "aa1", "state": "started", "region": 5}, {"id": "aa1", "state": "stopped"}, {"id": "bb2"},
    ]
    found = await source(url, session).fetch()
    assert [(i.id, i.state, i.region) for i in found] == [
        ("aa1", InstanceState.UP, ""), ("bb2", InstanceState.STOPPED, ""),
    ]


async def test_unknown_state_warns_once(
    api: tuple[FakeMachinesApi, str], session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    fake, url = api
    fake.machines = [machine("aa1", "hibernating"), machine("bb2", "hibernating")]
    src = source(url, session)
    with caplog.at_level(logging.WARNING, logger="affinity_proxy.discovery.api"):
        await src.fetch()
        await src.fetch()
    assert [r.getMessage().count("hibernating") for r in caplog.records] == [1]


async def test_wrong_token_is_an_error_without_the_token(
    api: tuple[FakeMachinesApi, str], session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    fake, url = api
    fake.accept = "Bearer another"
    with caplog.at_level(logging.DEBUG), pytest.raises(DiscoveryError) as err:
        await source(url, session).fetch()
    message = str(err.value)
    assert "HTTP 401 (check FLY_API_TOKEN)" in message and "unauthorized" in message
    assert TOKEN not in message and TOKEN not in caplog.text
    assert TOKEN not in repr(source(url, session))


async def test_error_body_echoing_the_token_is_scrubbed(
    api: tuple[FakeMachinesApi, str], session: aiohttp.ClientSession
) -> None:
    fake, url = api
    fake.status = 500
    fake.body = json.dumps({"error": f"internal: bad header Bearer {TOKEN}"}).encode()
    with pytest.raises(DiscoveryError, match="HTTP 500") as err:
        await source(url, session).fetch()
    assert TOKEN not in str(err.value) and "<redacted>" in str(err.value)


async def test_unknown_app_is_an_error(api: tuple[FakeMachinesApi, str], session: aiohttp.ClientSession) -> None:
    _, url = api
    src = FlyMachinesApiSource(
        "other", api_url=url, token=TOKEN, local_machine_id=LOCAL, private_url="http://{id}:1", private_port=1,
        local_upstream="http://u", session=session,
    )
    with pytest.raises(DiscoveryError, match=r"/v1/apps/other/machines answered HTTP 404: .*app not found"):
        await src.fetch()


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"<html>oops</html>", "not JSON: '<html>oops</html>'"),
        (b"", r"not JSON: \(empty body\)"),
        (b'{"machines": []}', "expected a JSON array of machines, got dict"),
        (b"x" * 5000, r"not JSON: 'x{200}\.\.\.'"),
    ],
)
async def test_bad_json_is_an_error(
    api: tuple[FakeMachinesApi, str], session: aiohttp.ClientSession, body: bytes, match: str
) -> None:
    fake, url = api
    fake.body = body
    with pytest.raises(DiscoveryError, match=match):
        await source(url, session).fetch()


async def test_timeout_is_an_error(api: tuple[FakeMachinesApi, str], session: aiohttp.ClientSession) -> None:
    fake, url = api
    fake.hang = True
    with pytest.raises(DiscoveryError, match=r"no answer within 0\.2s"):
        await source(url, session, timeout=0.2).fetch()


async def test_unreachable_api_is_an_error(session: aiohttp.ClientSession) -> None:
    app = web.Application()
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    await runner.cleanup()
    with pytest.raises(DiscoveryError, match=rf"127\.0\.0\.1:{port}/v1/apps/shop/machines failed: .*Connect") as err:
        await source(f"http://127.0.0.1:{port}", session).fetch()
    assert TOKEN not in str(err.value)


async def test_flyv1_token_and_process_group(api: tuple[FakeMachinesApi, str], session: aiohttp.ClientSession) -> None:
    fake, url = api
    fake.accept = f"FlyV1 {TOKEN}"
    fake.machines = [machine("aa1", "started")]
    src = source(url + "/v1/", session, token=f"FlyV1 {TOKEN}", process_group="web")
    assert states(await src.fetch()) == {"aa1": InstanceState.UP}
    assert fake.seen[-1].query["metadata.fly_process_group"] == "web"
    assert fake.seen[-1].path == "/v1/apps/shop/machines"


async def test_empty_token_is_refused(session: aiohttp.ClientSession) -> None:
    with pytest.raises(ValueError, match="FLY_API_TOKEN"):
        source("http://127.0.0.1:1", session, token=" ")


@pytest.mark.parametrize(
    ("api_url", "expected"),
    [
        ("http://_api.internal:4280", "http://_api.internal:4280/v1/apps/shop/machines"),
        ("http://_api.internal:4280/", "http://_api.internal:4280/v1/apps/shop/machines"),
        ("https://api.machines.dev/v1", "https://api.machines.dev/v1/apps/shop/machines"),
    ],
)
def test_machines_url(api_url: str, expected: str) -> None:
    assert machines_url(api_url, APP) == expected
