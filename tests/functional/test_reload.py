"""Hot reload (POST /reload, also what SIGHUP does): instances, weights and cookie settings change
without a restart; open WebSockets and cookie-pinned users stay; an invalid file changes nothing."""

from __future__ import annotations

from pathlib import Path

from affinity_proxy.config import load_config
from tests.functional.helpers import COOKIE, admin, affinity_cookie, base
from tests.support.backends import Backends
from tests.support.engine import engine_line


def write_config(path: Path, backends: Backends, ids: list[str], *, engine: str,
                 secret: str = "reload-secret-0123456789", previous: list[str] | None = None, extra: str = "") -> None:
    """The proxy's config file (re-read by every reload), on the test's engine."""
    lines = [
        engine_line(engine),
        "listen: 127.0.0.1:0",
        "admin_listen: 127.0.0.1:0",
        f"cookie: {{secret: {secret}, previous_secrets: {previous or []}}}",
        "user_key: [{header: X-User-Id}]",
        "health: {interval: 0.3, timeout: 0.3, unhealthy_after: 1, healthy_after: 1}",
        "instances:",
        *(f"  - {{id: {i}, url: 'http://127.0.0.1:{backends.ports[i]}'}}" for i in ids),
    ]
    path.write_text("\n".join(lines) + "\n" + extra)


async def test_reload_adds_an_instance_and_keeps_sessions(engine: str, backends, start_proxy, http, tmp_path) -> None:
    cfg = tmp_path / "proxy.yaml"
    write_config(cfg, backends, ["a", "b", "c"], engine=engine)
    server = await start_proxy(load_config(cfg), config_path=str(cfg))
    cookies = {}
    for i in range(60):
        async with http.get(base(server) + "/") as resp:
            cookies[i] = (affinity_cookie(resp), (await resp.json())["instance"])
    ws = await http.ws_connect(base(server) + "/ws")
    await ws.send_str("whoami")
    ws_instance = (await ws.receive(timeout=5)).data

    await backends.start("d")
    write_config(cfg, backends, ["a", "b", "c", "d"], engine=engine)
    async with http.post(admin(server) + "/reload") as resp:
        doc = await resp.json()
        assert resp.status == 200, doc
    assert doc["changed"] == ["instances"] and doc["needs_restart"] == []
    assert "d" in server.ctx.membership.current().by_id

    await ws.send_str("whoami")
    assert (await ws.receive(timeout=5)).data == ws_instance, "open WebSockets survive a reload"
    await ws.close()
    for cookie, instance in cookies.values():
        async with http.get(base(server) + "/", headers={"Cookie": f"{COOKIE}={cookie}"}) as resp:
            assert (await resp.json())["instance"] == instance
    seen = set()
    for i in range(120):
        async with http.get(base(server) + "/", headers={"X-User-Id": f"after-reload-{i}"}) as resp:
            seen.add((await resp.json())["instance"])
    assert "d" in seen, "new users reach the new instance"


async def test_invalid_reload_keeps_the_running_config(engine: str, backends, start_proxy, http, tmp_path) -> None:
    cfg = tmp_path / "proxy.yaml"
    write_config(cfg, backends, ["a", "b", "c"], engine=engine)
    server = await start_proxy(load_config(cfg), config_path=str(cfg))
    before = server.ctx.config
    cfg.write_text(cfg.read_text() + "cookie_colour: blue\n")
    async with http.post(admin(server) + "/reload") as resp:
        doc = await resp.json()
        assert resp.status == 400
    assert "cookie_colour" in doc["error"]
    assert server.ctx.config is before
    async with http.get(base(server) + "/") as resp:
        assert resp.status == 200


async def test_reload_rotates_the_cookie_secret_without_logging_anyone_out(engine: str, backends, start_proxy, http,
                                                                           tmp_path) -> None:
    cfg = tmp_path / "proxy.yaml"
    write_config(cfg, backends, ["a", "b", "c"], engine=engine, secret="old-secret-0123456789")
    server = await start_proxy(load_config(cfg), config_path=str(cfg))
    async with http.get(base(server) + "/") as resp:
        cookie = affinity_cookie(resp)
        instance = (await resp.json())["instance"]
    write_config(cfg, backends, ["a", "b", "c"], engine=engine, secret="new-secret-0123456789",
                 previous=["old-secret-0123456789"])
    async with http.post(admin(server) + "/reload") as resp:
        assert (await resp.json())["changed"] == ["cookie"]
    async with http.get(base(server) + "/", headers={"Cookie": f"{COOKIE}={cookie}"}) as resp:
        assert (await resp.json())["instance"] == instance
        reissued = affinity_cookie(resp)
        assert reissued and reissued != cookie, "re-signed with the new secret"


async def test_reload_without_config_file_is_refused(engine: str, backends, start_proxy, http) -> None:
    from tests.support.backends import make_config

    server = await start_proxy(make_config(backends, engine=engine))
    async with http.post(admin(server) + "/reload") as resp:
        assert resp.status == 400
        assert "config file" in (await resp.json())["error"]


async def test_reload_reports_keys_that_need_a_restart(engine: str, backends, start_proxy, http, tmp_path) -> None:
    cfg = tmp_path / "proxy.yaml"
    write_config(cfg, backends, ["a", "b", "c"], engine=engine)
    server = await start_proxy(load_config(cfg), config_path=str(cfg))
    cfg.write_text(cfg.read_text().replace("listen: 127.0.0.1:0\n", "listen: 127.0.0.1:1\n", 1))
    async with http.post(admin(server) + "/reload") as resp:
        doc = await resp.json()
    assert doc["ok"] is True and doc["needs_restart"] == ["listen"]
    assert server.ctx.config.listen == "127.0.0.1:0"
