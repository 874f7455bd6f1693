"""The live dashboard: RecentEvents, /dashboard/data over HTTP, and the page rendered in headless Chromium.

Real servers on 127.0.0.1 port 0 (three demo backends, a proxy with an admin token). The browser
tests run Debian's ``chromium`` (``/usr/bin/chromium``; ``make test`` installs it with
``.ci/install-deps``) and are skipped with a reason when it is absent. The screenshot is saved as
``dashboard.png`` in the test's tmp dir.
"""

from __future__ import annotations

import asyncio
import html
import os
import re
from collections.abc import AsyncIterator
from dataclasses import replace
from html.parser import HTMLParser
from importlib.resources import files
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from affinity_proxy.config import AdminConfig, FlyConfig, InstanceConfig
from affinity_proxy.devtools.demo.backend import start_backend
from affinity_proxy.observability.events import RecentEvents
from affinity_proxy.routing.decide import DecisionReason, RepinReason, Route
from affinity_proxy.routing.model import InstanceId
from affinity_proxy.serve.app import ProxyServer
from tests.support.backends import Backends, make_config

CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "dash-token-" + "t" * 20
USERS = [f"user-{i}" for i in range(40)]
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="/usr/bin/chromium is absent (make test installs it: .ci/install-deps)"
)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- RecentEvents -----------------------------------------------------------------------------------

def test_recent_events_counts_per_second_and_forgets_old_seconds() -> None:
    clock = Clock(1000.2)
    ev = RecentEvents(seconds=10, max_repins=3, clock=clock)
    for _ in range(3):
        ev.response(replay_status=False)
    ev.response(replay_status=True)
    ev.route("replay", Route(InstanceId("b"), DecisionReason.HASH))
    ev.route("forward", Route(InstanceId("a"), DecisionReason.COOKIE))  # neither replay nor re-pin
    clock.now = 1002.9
    ev.route("forward", Route(InstanceId("c"), DecisionReason.REPIN, RepinReason.DEAD, orphan=InstanceId("a")))
    ev.response(replay_status=False)
    snap = ev.snapshot()
    assert snap["now"] == 1002 and snap["start"] == 993 and snap["seconds"] == 10
    assert snap["series"]["requests"] == [0] * 7 + [4, 0, 1]
    assert snap["series"]["replays"] == [0] * 7 + [1, 0, 0]
    assert snap["series"]["replay_status"] == [0] * 7 + [1, 0, 0]
    assert snap["series"]["repins"] == [0] * 9 + [1]
    assert snap["totals"] == {"requests": 5, "replays": 1, "replay_status": 1, "repins": 1}
    assert snap["recent_repins"] == [{"at": 1002.9, "instance": "c", "reason": "dead", "from": "a"}]
    assert ev.snapshot(3)["series"]["requests"] == [4, 0, 1]

    clock.now = 1010.5  # second 1000 has left the window; its slot is reused by 1010
    ev.response(replay_status=False)
    snap = ev.snapshot()
    assert snap["series"]["requests"] == [0, 1] + [0] * 7 + [1]
    assert snap["totals"]["requests"] == 2
    clock.now = 5000.0  # long quiet: everything reads 0 without any background work
    assert ev.snapshot()["totals"] == {"requests": 0, "replays": 0, "replay_status": 0, "repins": 0}


def test_replay_answered_counts_what_a_replay_route_and_its_response_count() -> None:
    """The replay lane's one call equals ``route("replay", ...)`` + ``response(True)`` for the routes
    it answers (cookie and force routes: never a re-pin)."""
    for reason in (DecisionReason.COOKIE, DecisionReason.FORCE):
        clock = Clock(700.4)
        pair, one = RecentEvents(seconds=10, clock=clock), RecentEvents(seconds=10, clock=clock)
        for t in (700.4, 700.9, 703.1, 712.0):  # 712: the slot of 702 is reused
            clock.now = t
            pair.route("replay", Route(InstanceId("b"), reason))
            pair.response(replay_status=True)
            one.replay_answered(t)
        assert one.snapshot() == pair.snapshot()
        assert one.snapshot()["totals"] == {"requests": 2, "replays": 2, "replay_status": 2, "repins": 0}


def test_recent_events_keeps_the_last_repins_newest_first_without_user_keys() -> None:
    clock = Clock(50.0)
    ev = RecentEvents(seconds=60, max_repins=3, clock=clock)
    reasons = [RepinReason.DEAD, RepinReason.GONE, RepinReason.INVALID_COOKIE, RepinReason.UNAVAILABLE]
    for i, reason in enumerate(reasons):
        clock.now = 50.0 + i
        ev.route("forward", Route(InstanceId(f"i{i}"), DecisionReason.REPIN, reason))
    ev.route("forward", Route(InstanceId("m1"), DecisionReason.LOOP_GUARD, set_cookie=True))
    recent = ev.snapshot()["recent_repins"]
    assert [r["reason"] for r in recent] == ["loop_guard", "unavailable", "invalid_cookie"]
    assert set(recent[0]) == {"at", "instance", "reason", "from"}
    assert ev.snapshot()["totals"]["repins"] == 5
    with pytest.raises(ValueError):
        RecentEvents(seconds=0)


# --- a real proxy ------------------------------------------------------------------------------------

@pytest.fixture
async def proxy(backends: Backends) -> AsyncIterator[ProxyServer]:
    server = ProxyServer(make_config(backends, admin=AdminConfig(token=TOKEN)))
    await server.start()
    yield server
    await server.stop()


def admin_url(server: ProxyServer, path: str) -> str:
    return f"http://127.0.0.1:{server.admin_port}{path}"


AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def send_traffic(server: ProxyServer, backends: Backends, http: aiohttp.ClientSession) -> int:
    """Every user once, stop ``b``, every user again (b's users are re-pinned, reason ``dead``).
    Returns the number of requests sent."""
    base = f"http://127.0.0.1:{server.main_port}"
    pinned: dict[str, str] = {}
    for user in USERS:
        async with http.get(f"{base}/page", headers={"X-User-Id": user}) as resp:
            assert resp.status == 200
            pinned[user] = (await resp.json())["instance"]
    assert "b" in pinned.values(), "some users must live on b"
    await backends.stop("b")
    for user in USERS:
        async with http.get(f"{base}/page", headers={"X-User-Id": user}) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["instance"] != "b"
    return 2 * len(USERS)


async def test_dashboard_data_needs_the_token_and_the_page_does_not(proxy: ProxyServer, http) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        async with http.get(admin_url(proxy, "/dashboard/data"), headers=headers) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"] == "unauthorized"
    async with http.get(admin_url(proxy, "/dashboard/data"), headers=AUTH) as resp:
        assert resp.status == 200
        assert resp.headers["Cache-Control"] == "no-store"
    for path, kind in (("/dashboard", "text/html"), ("/dashboard/dashboard.js", "text/javascript"),
                       ("/dashboard/dashboard.css", "text/css")):
        async with http.get(admin_url(proxy, path)) as resp:  # static, holds no data: no token needed
            assert resp.status == 200, path
            assert resp.content_type == kind
            assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
    async with http.get(admin_url(proxy, "/dashboard/"), allow_redirects=False) as resp:
        assert resp.status == 302 and resp.headers["Location"] == "../dashboard"
    for path in ("/metrics", "/instances", "/session-check", "/dashboard/nope", "/dashboardx"):
        async with http.get(admin_url(proxy, path)) as resp:  # the exemption is only for the static files
            assert resp.status == 401, path


def test_the_page_loads_nothing_from_other_hosts() -> None:
    static = files("affinity_proxy.admin") / "static"
    for name in ("dashboard.html", "dashboard.js", "dashboard.css"):
        text = (static / name).read_text()
        urls = set(re.findall(r"""(?:https?:)?//[A-Za-z0-9.-]+\.[A-Za-z]{2,}[^\s"')]*""", text))
        assert urls <= {"http://www.w3.org/2000/svg"}, (name, urls)  # the SVG namespace is a name, not a fetch
        assert "@import" not in text and "innerHTML" not in text, name


async def test_dashboard_data_shape_and_numbers(proxy: ProxyServer, backends: Backends, http) -> None:
    sent = await send_traffic(proxy, backends, http)
    async with http.get(admin_url(proxy, "/dashboard/data"), headers=AUTH) as resp:
        doc = await resp.json()
    assert set(doc) >= {"node", "pid", "mode", "region", "status", "uptime_seconds", "store", "replay_status",
                        "instances", "pins", "events"}
    assert doc["node"] == proxy.ctx.node and doc["pid"] == os.getpid() and doc["mode"] == "proxy"
    assert doc["store"] == {"kind": "memory", "ok": True}
    assert doc["replay_status"] == 409
    counts = dict(await proxy.ctx.store.counts())
    by_id = {i["id"]: i for i in doc["instances"]}
    assert list(by_id) == ["a", "b", "c"]
    assert by_id["b"]["state"] == "down"
    assert {k: v["pins"] for k, v in by_id.items()} == {k: counts.get(k, 0) for k in "abc"}
    assert set(by_id["a"]) == {"id", "state", "region", "weight", "local", "pins", "sessions"}
    assert set(doc["sessions"]) == {"total", "max", "mean", "balance", "load_factor"}  # placement.live's snapshot
    assert doc["pins"]["total"] == len(USERS) and doc["pins"]["live"] is True
    assert doc["pins"]["max"] == max(counts.values())
    events = doc["events"]
    assert events["seconds"] == 600
    assert all(len(v) == 600 for v in events["series"].values())
    assert events["totals"]["requests"] == sent
    assert events["totals"]["replays"] == 0 and events["totals"]["replay_status"] == 0
    moved = [r for r in events["recent_repins"] if r["from"] == "b"]
    assert moved and all(r["reason"] == "dead" and r["instance"] in ("a", "c") for r in moved)
    assert events["totals"]["repins"] == len(events["recent_repins"]) == len(moved)
    for r in events["recent_repins"]:  # no user key in clear
        assert not any(u in str(r) for u in USERS)

    async with http.get(admin_url(proxy, "/dashboard/data?seconds=30"), headers=AUTH) as resp:
        short = await resp.json()
    assert short["events"]["seconds"] == 30 and short["events"]["totals"]["requests"] == sent


async def test_app_answers_with_the_replay_status_are_counted(proxy: ProxyServer, http) -> None:
    base = f"http://127.0.0.1:{proxy.main_port}"
    for status in (409, 409, 200, 404):
        async with http.get(f"{base}/_control/respond?status={status}", headers={"X-User-Id": "u"}) as resp:
            assert resp.status == status
    async with http.get(admin_url(proxy, "/dashboard/data"), headers=AUTH) as resp:
        totals = (await resp.json())["events"]["totals"]
    assert totals == {"requests": 4, "replays": 0, "replay_status": 2, "repins": 0}


async def test_fly_node_counts_replays_and_the_loop_guard(http) -> None:
    runner, app_port = await start_backend("m1")
    config = replace(
        make_config(Backends()), mode="fly",
        instances=tuple(InstanceConfig(m, f"http://127.0.0.1:{app_port}") for m in ("m1", "m2", "m3")),
        # placement hash: new users are spread over the 3 Machines, so about 2 in 3 are replayed
        # (with the default `local` every new user would stay on m1 and nothing would be replayed)
        fly=FlyConfig(app="demo", machine_id="m1", region="lcl", upstream=f"http://127.0.0.1:{app_port}",
                      placement="hash"),
    )
    node = ProxyServer(config)
    await node.start()
    try:
        base = f"http://127.0.0.1:{node.main_port}"
        statuses: dict[str, int] = {}
        for user in USERS[:20]:
            async with http.get(f"{base}/", headers={"X-User-Id": user}) as resp:
                statuses[user] = resp.status
        replayed = [u for u, s in statuses.items() if s == 409]
        assert replayed and len(replayed) < len(statuses)
        headers = {"X-User-Id": replayed[0], "fly-replay-src": "instance=m9;region=lcl;t=1;state=affinity"}
        async with http.get(f"{base}/", headers=headers) as resp:
            assert resp.status == 200  # already replayed once: served here, re-pinned here
        async with http.get(f"http://127.0.0.1:{node.admin_port}/dashboard/data") as resp:
            doc = await resp.json()
    finally:
        await node.stop()
        await runner.cleanup()
    assert doc["mode"] == "fly" and doc["region"] == "lcl"
    totals = doc["events"]["totals"]
    assert totals["replays"] == totals["replay_status"] == len(replayed)
    assert totals["requests"] == len(statuses) + 1
    assert doc["events"]["recent_repins"][0]["reason"] == "loop_guard"
    assert doc["events"]["recent_repins"][0]["instance"] == "m1"
    assert [i["local"] for i in doc["instances"]] == [True, False, False]


# --- headless Chromium -------------------------------------------------------------------------------

CHROMIUM_SECONDS = 90.0


async def run_chromium(profile: Path, url: str, *extra: str) -> str:
    """Run headless Chromium on ``url`` with a virtual time budget (our server keeps running in this
    event loop meanwhile) and return its stdout. ``profile``: a fresh user-data dir."""
    args = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}",
        "--virtual-time-budget=5000", *extra, url,
    ]
    proc = await asyncio.create_subprocess_exec(
        str(CHROMIUM), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CHROMIUM_SECONDS)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"chromium did not finish within {CHROMIUM_SECONDS} s")
    assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
    return out.decode()


class Dom(HTMLParser):
    """Collects, per element id and per ``data-instance`` row, the text and attributes we assert on."""

    def __init__(self) -> None:
        super().__init__()
        self.by_id: dict[str, dict[str, Any]] = {}
        self.rows: dict[str, dict[str, str]] = {}
        self.repins: list[list[str]] = []
        self._open: list[tuple[str, dict[str, Any] | None, str | None]] = []
        self._row: str | None = None
        self._repin: list[str] | None = None
        self._cell: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        entry = None
        if "id" in a:
            entry = self.by_id[a["id"]] = {"attrs": a, "text": ""}
        if tag == "tr" and "data-instance" in a:
            self._row = a["data-instance"]
            self.rows[self._row] = {}
        if tag == "tr" and "data-reason" in a:
            self._repin = []
            self.repins.append(self._repin)
        cell = None
        if self._row is not None and tag == "td":
            cell = a.get("class", "").split(" ")[0] or None
            if cell == "pins":
                self.rows[self._row]["pins"] = a.get("data-pins", "")
        if tag == "span" and "data-state" in a and self._row is not None:
            self.rows[self._row]["state"] = a["data-state"]
        if self._repin is not None and tag == "td":
            self._repin.append("")
        self._open.append((tag, entry, cell))

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            open_tag, _, _ = self._open.pop()
            if open_tag == tag:
                break
        if tag == "tr":
            self._row = None
            self._repin = None

    def handle_data(self, data: str) -> None:
        for _, entry, _ in self._open:
            if entry is not None:
                entry["text"] += data
        if self._row is not None:
            for _, _, cell in self._open:
                if cell in ("id", "region"):
                    self.rows[self._row][cell] = self.rows[self._row].get(cell, "") + data
        if self._repin is not None and self._repin:
            self._repin[-1] += data

    def text(self, element_id: str) -> str:
        return html.unescape(self.by_id[element_id]["text"]).strip()


@needs_chromium
async def test_dashboard_renders_live_data_in_chromium(proxy: ProxyServer, backends: Backends, http,
                                                       tmp_path: Path) -> None:
    await send_traffic(proxy, backends, http)
    some_user = USERS[0]
    url = admin_url(proxy, f"/dashboard?userId={some_user}#token={TOKEN}")
    dom_text = await run_chromium(tmp_path / "profile-dom", url, "--dump-dom")
    (tmp_path / "dashboard.dom.html").write_text(dom_text)
    dom = Dom()
    dom.feed(dom_text)
    body = re.search(r"<body[^>]*>", dom_text)
    assert body and 'data-loaded="true"' in body.group(0), dom_text[:3000]
    assert dom.by_id["error"]["attrs"].get("hidden") is not None, dom.text("error")

    counts = dict(await proxy.ctx.store.counts())
    assert set(dom.rows) == {"a", "b", "c"}
    for inst in "abc":
        assert dom.rows[inst]["id"].strip() == inst
        assert int(dom.rows[inst]["pins"]) == counts.get(inst, 0), (inst, dom.rows[inst], counts)
    assert dom.rows["b"]["state"] == "down" and dom.rows["a"]["state"] == "up"
    assert dom.text("pin-summary").startswith(f"{len(USERS)} pins")

    assert int(dom.text("total-requests")) >= 2 * len(USERS)
    assert float(dom.text("rate-requests")) >= 0  # the last 10 whole seconds: may be 0 on a slow machine
    assert int(dom.text("total-repins")) > 0
    assert dom.repins, "recent re-pins rendered"
    assert all(cells[1] == "b" and cells[3] == "dead" for cells in dom.repins), dom.repins
    assert 'class="reason">dead<' in dom_text

    assert dom.text("node") == proxy.ctx.node
    assert dom.text("store") == "memory · ok"
    assert dom.text("status") == "ok"
    assert "polyline" in dom_text and 'class="s-requests"' in dom_text

    pin = await proxy.ctx.store.get(some_user)
    assert pin is not None
    check = dom.text("check-result")
    assert check.startswith(f"User {some_user} is pinned to {pin.instance}"), check
    assert dom.by_id["check-result"]["attrs"]["data-decision"] == pin.instance

    shot = tmp_path / "dashboard.png"
    await run_chromium(tmp_path / "profile-shot", url, f"--screenshot={shot}", "--window-size=1280,900")
    assert shot.exists()
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000, f"screenshot of {len(data)} bytes looks empty"
    print(f"dashboard screenshot: {shot}")


@needs_chromium
async def test_dashboard_without_a_valid_token_says_how_to_give_one(proxy: ProxyServer, tmp_path: Path) -> None:
    dom = Dom()
    dom.feed(await run_chromium(tmp_path / "profile", admin_url(proxy, "/dashboard#token=wrong"), "--dump-dom"))
    assert "token was refused" in dom.text("error")
    assert "#token=" in dom.text("error")
    assert dom.rows == {}


# --- safe by default: the admin listener in a real browser ---------------------------------------------


@needs_chromium
async def test_dashboard_works_when_opened_as_localhost(proxy: ProxyServer, tmp_path: Path) -> None:
    """``localhost`` is one of the names the admin listener answers to (IP literals are the others)."""
    url = f"http://localhost:{proxy.admin_port}/dashboard#token={TOKEN}"
    dom_text = await run_chromium(tmp_path / "profile", url, "--dump-dom")
    dom = Dom()
    dom.feed(dom_text)
    body = re.search(r"<body[^>]*>", dom_text)
    assert body and 'data-loaded="true"' in body.group(0), dom_text[:3000]
    assert set(dom.rows) == {"a", "b", "c"}


ATTACKER_PAGE = """<!doctype html><html><body><script>
fetch("http://127.0.0.1:{admin_port}/instances/a/drain", {{method: "POST", mode: "no-cors", body: "x"}})
  .then(function () {{ document.body.setAttribute("data-sent", "yes"); }})
  .catch(function () {{ document.body.setAttribute("data-sent", "error"); }});
</script></body></html>"""


@pytest.fixture
async def open_proxy(backends: Backends) -> AsyncIterator[tuple[ProxyServer, list[tuple[str, str, int]]]]:
    """The issue's setup: no admin token (the default), admin listener on loopback. Records what the
    admin listener answered (method, path, status)."""
    server = ProxyServer(make_config(backends))
    seen: list[tuple[str, str, int]] = []

    async def record(request: web.Request, response: web.StreamResponse) -> None:
        seen.append((request.method, request.path, response.status))

    server.admin_app.on_response_prepare.append(record)
    await server.start()
    yield server, seen
    await server.stop()


@needs_chromium
async def test_a_page_on_another_site_cannot_drain_through_the_browser(open_proxy, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """CSRF: a page the operator visits posts to the admin listener. Chromium sends it (no-cors POST
    with a text body needs no preflight), with ``Origin: http://evil.example:PORT``: 403, nothing drained."""
    server, seen = open_proxy
    page = web.Application()

    async def attacker(request: web.Request) -> web.Response:
        return web.Response(text=ATTACKER_PAGE.format(admin_port=server.admin_port), content_type="text/html")

    page.router.add_get("/", attacker)
    runner = web.AppRunner(page, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        dom_text = await run_chromium(tmp_path / "profile", f"http://evil.example:{port}/", "--dump-dom",
                                      "--host-resolver-rules=MAP evil.example 127.0.0.1")
    finally:
        await runner.cleanup()
    assert 'data-sent="yes"' in dom_text, dom_text[:2000]  # the browser did send it
    assert ("POST", "/instances/a/drain", 403) in seen, seen
    assert server.ctx.membership.current().state_of(InstanceId("a")).value == "up"


@needs_chromium
async def test_dns_rebinding_reads_no_user_keys(open_proxy, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Rebinding: evil.example now resolves to 127.0.0.1, so the attacker's page is same-origin with
    the admin listener under its own name. The Host header gives it away: 421, no pins."""
    server, seen = open_proxy
    await server.ctx.store.set("victim-user", InstanceId("a"))
    dom_text = await run_chromium(tmp_path / "profile", f"http://evil.example:{server.admin_port}/pins",
                                  "--dump-dom", "--host-resolver-rules=MAP evil.example 127.0.0.1")
    assert "victim-user" not in dom_text
    assert "misdirected_host" in dom_text, dom_text[:2000]
    assert ("GET", "/pins", 421) in seen, seen
