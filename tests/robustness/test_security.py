"""Security properties of the public edge and the admin listener (issue #7, item 4).

- the admin listener defaults to loopback, and with ``admin.token`` every admin route (walked from
  the router, every method) answers 401 without it; the dashboard's public static files hold no data;
- the main listener serves only ``/_affinity/health`` and ``/_affinity/session-check`` itself:
  ``/metrics``, ``/pins``... go to the app, never to our admin handlers;
- ``fly-force-instance-id`` and affinity cookies can only name known instances: anything else is
  ignored, and the proxy never connects to a host a client named;
- nothing a client sends is echoed into ``fly-replay``, ``Set-Cookie`` or ``X-Fly-Instance``;
- cookie secret rotation keeps users on their instance;
- the Docker images run as a non-root user.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import replace
from pathlib import Path

import pytest

from affinity_proxy.config import (
    AdminConfig,
    Config,
    CookieConfig,
    FlyConfig,
    HealthConfig,
    InstanceConfig,
    LimitsConfig,
    UserKeySourceConfig,
    config_from_mapping,
)
from affinity_proxy.serve.app import ProxyServer
from tests.functional.helpers import COOKIE, affinity_cookie
from tests.robustness.conftest import RecordingBackend, make_config
from tests.robustness.rawhttp import exchange, request
from tests.support.backends import Backends

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "admin-" + secrets.token_hex(16)
SECRET = "cookie-secret-" + secrets.token_hex(16)
KNOWN = {"a", "b", "c"}

# --------------------------------------------------------------------------- admin listener


def test_admin_listener_defaults_to_loopback() -> None:
    config = config_from_mapping({"instances": [{"id": "a", "url": "http://127.0.0.1:1"}],
                                  "cookie": {"secret": "s"}}, {})
    assert config.admin_host == "127.0.0.1"
    assert Config().admin_host == "127.0.0.1"
    reference = (ROOT / "config" / "proxy.yaml").read_text()
    assert re.search(r'^admin_listen: "127\.0\.0\.1:\d+"', reference, re.M)
    compose = (ROOT / "examples" / "docker-compose.yml").read_text()
    assert "9091:9091" not in compose.replace("127.0.0.1:9091:9091", ""), "compose publishes the admin port publicly"


SAMPLE_PARAMS = {"user": "someone", "id": "a", "tail": "x", "filename": "dashboard.js"}


def _admin_requests(server: ProxyServer) -> list[tuple[str, str, bool]]:
    """(method, path, public) for every route of the admin app; ``*`` routes in every method."""
    out = []
    for route in server.admin_app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if path is None:
            continue
        for name, value in SAMPLE_PARAMS.items():
            path = path.replace("{" + name + "}", value)
        assert "{" not in path, f"no sample value for {path}"
        public = bool(getattr(route.handler, "admin_public", False))
        methods = ["GET", "POST", "PUT", "DELETE", "PATCH"] if route.method == "*" else [route.method]
        out.extend((m, path, public) for m in methods)
    return out


@pytest.fixture
async def guarded(engine: str, backends: Backends, start_proxy, http) -> ProxyServer:  # type: ignore[no-untyped-def]
    server = await start_proxy(make_config(backends, engine=engine, admin=AdminConfig(token=TOKEN),
                                           cookie=CookieConfig(secret=SECRET)))
    # some data worth stealing: pins with recognisable user keys
    for i in range(3):
        async with http.get(f"http://127.0.0.1:{server.main_port}/", headers={"X-User-Id": f"victim-{i}"}) as resp:
            assert resp.status == 200
    return server  # type: ignore[no-any-return]


async def test_every_admin_route_needs_the_token(guarded: ProxyServer, backends: Backends, http) -> None:  # type: ignore[no-untyped-def]
    base = f"http://127.0.0.1:{guarded.admin_port}"
    routes = _admin_requests(guarded)
    assert {p for _, p, _ in routes} >= {"/metrics", "/pins", "/pins/someone", "/instances", "/reap", "/reload",
                                         "/instances/a/drain", "/health", "/session-check"}
    wrong = [None, f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", f"bearer {TOKEN}", TOKEN, f"Basic {TOKEN}",
             f"Bearer  {TOKEN}", f"Bearer {TOKEN}\tx"]
    public = []
    for method, path, is_public in routes:
        if is_public:
            public.append(path)
            continue
        for auth in wrong:
            headers = {"Authorization": auth} if auth is not None else {}
            async with http.request(method, base + path, headers=headers, json={"instance": "a"}) as resp:
                body = await resp.read()
                assert resp.status == 401, (method, path, auth, resp.status)
                assert resp.headers.get("WWW-Authenticate", "").startswith("Bearer")
                assert b"victim" not in body and TOKEN.encode() not in body
    # unknown paths do not reveal which routes exist
    for path in ("/nope", "/pins/", "/admin", "/../metrics"):
        async with http.get(base + path) as resp:
            assert resp.status == 401
    # nothing changed: the drain, reap, pin and reload calls above were all refused
    view = guarded.ctx.membership.current()
    assert {i.id: i.state.value for i in view.instances} == {"a": "up", "b": "up", "c": "up"}
    assert len(await guarded.ctx.store.list(None, limit=100)) == 3
    # with the token they work (read-only ones)
    async with http.get(base + "/pins", headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
        assert resp.status == 200 and b"victim" in await resp.read()
    # the public static files hold no data
    forbidden = [b"victim", TOKEN.encode(), SECRET.encode(), *(str(p).encode() for p in backends.ports.values())]
    assert public, "expected the dashboard's static files to be public"
    for path in public:
        async with http.get(base + path, allow_redirects=False) as resp:
            body = await resp.read()
            assert resp.status in (200, 301, 302, 307, 308), (path, resp.status)
            for needle in forbidden:
                assert needle not in body, (path, needle)
            if resp.status == 200:
                assert resp.content_type in ("text/html", "text/javascript", "text/css", "application/javascript")


def test_admin_token_is_compared_in_constant_time() -> None:
    import inspect

    from affinity_proxy.admin.api import token_middleware

    source = inspect.getsource(token_middleware)
    assert "hmac.compare_digest" in source and "==" not in source.split("compare_digest", 1)[1].split("\n", 2)[0]


async def test_admin_routes_without_a_token_configured_are_open_only_on_loopback() -> None:
    """Without a token the admin listener must stay on loopback: that is the only protection."""
    config = config_from_mapping({"instances": [{"id": "a", "url": "http://127.0.0.1:1"}],
                                  "cookie": {"secret": "s"}}, {})
    assert config.admin.token is None and config.admin_host in ("127.0.0.1", "::1", "localhost")


async def test_main_listener_exposes_no_admin_data(guarded: ProxyServer, backends: Backends, http) -> None:  # type: ignore[no-untyped-def]
    base = f"http://127.0.0.1:{guarded.main_port}"
    own = {r.resource.canonical for r in guarded.main_app.router.routes() if r.resource is not None}
    assert own == {"/_affinity/health", "/_affinity/session-check", "/_affinity/{tail}", "/{tail}"}
    for path in ("/metrics", "/pins", "/pins/victim-0", "/instances", "/health", "/reap", "/reload",
                 "/session-check", "/dashboard", "/dashboard/data", "/instances/a/drain"):
        for method in ("GET", "POST", "PUT", "DELETE"):
            async with http.request(method, base + path, headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
                body = await resp.json()
                assert resp.status == 200 and resp.headers["X-Fly-Instance"] in KNOWN, (method, path)
                assert body["instance"] in KNOWN and body["path"] == path  # the app answered, not us
    for path in ("/_affinity/metrics", "/_affinity/pins", "/_affinity/pins/victim-0", "/_affinity/instances",
                 "/_affinity/reap", "/_affinity/reload", "/_affinity/dashboard", "/_affinity/dashboard/data",
                 "/_affinity/", "/_affinity/health/../metrics", "/_affinity/%2e%2e/metrics"):
        for method in ("GET", "POST", "PUT", "DELETE"):
            async with http.request(method, base + path, headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
                text = await resp.text()
                if resp.status == 200:  # a path that normalises out of /_affinity/ reached the app
                    assert resp.headers["X-Fly-Instance"] in KNOWN, (method, path)
                else:
                    assert resp.status in (404, 405), (method, path, resp.status)
                assert "victim" not in text and "affinity_requests_total" not in text
    # session-check explains routing; it names instances, never their addresses or any secret
    async with http.get(base + "/_affinity/session-check?userId=victim-1") as resp:
        text = await resp.text()
    assert resp.status == 200
    for needle in (TOKEN, SECRET, *(f":{p}" for p in backends.ports.values())):
        assert needle not in text


# --------------------------------------------------------------------------- only known instances


HOSTILE_IDS = [
    "evil", "A", "a ", " a", "a\t", "a;b", "a,b", "../a", "a/../b", "*", "", "0" * 65,
    "127.0.0.1", "localhost", "{trap}", "http://{trap}", "http://{trap}/", "a@{trap}", "a.internal",
    "a%00", "a\u00e9", "${{FLY_MACHINE_ID}}",
]


@pytest.fixture
async def with_trap(engine: str, backends: Backends, recording_backend, start_proxy):  # type: ignore[no-untyped-def]
    trap: RecordingBackend = await recording_backend()
    server = await start_proxy(make_config(backends, engine=engine, cookie=CookieConfig(secret=SECRET)))
    yield server, trap
    assert trap.connections == 0, "the proxy connected to an address a client named"


def _raw_header_value(value: str) -> bytes:
    return value.encode("utf-8")


async def test_force_instance_header_names_only_known_instances(with_trap, http) -> None:  # type: ignore[no-untyped-def]
    server, trap = with_trap
    trap_addr = f"127.0.0.1:{trap.port}"
    for raw in HOSTILE_IDS:
        value = raw.format(trap=trap_addr)
        head = (b"GET /forced HTTP/1.1\r\nHost: proxy.test\r\nfly-force-instance-id: " + _raw_header_value(value)
                + b"\r\nConnection: close\r\n\r\n")
        resp = await exchange(server.main_port, head)
        if resp.status == 400:  # the header itself was unparsable (control characters)
            continue
        assert resp.status == 200, (value, resp.status, resp.body[:200])
        assert resp.headers["X-Fly-Instance"] in KNOWN and resp.json()["instance"] in KNOWN, value
        for cookie in resp.headers.getall("Set-Cookie", []):
            assert COOKIE_RE.fullmatch(cookie), (value, cookie)
    for known in sorted(KNOWN):  # control: a known id is honoured
        async with http.get(f"http://127.0.0.1:{server.main_port}/", headers={"fly-force-instance-id": known}) as resp:
            assert resp.headers["X-Fly-Instance"] == known


async def test_forged_and_unknown_cookies_are_ignored(with_trap, http) -> None:  # type: ignore[no-untyped-def]
    server, trap = with_trap
    trap_addr = f"127.0.0.1:{trap.port}"
    fake_sig = "A" * 22
    values = [f"1~evil~{'1' * 6}~~{fake_sig}", f"1~a~zzzzzz~~{fake_sig}", "evil", trap_addr, "a", "1~a~1~~",
              f"1~{trap_addr}~1~~{fake_sig}", "2~a~1~~" + fake_sig, "1~a~1~~" + fake_sig + "~x"]
    for value in values:
        head = f"GET /c HTTP/1.1\r\nHost: proxy.test\r\nCookie: {COOKIE}={value}\r\nConnection: close\r\n\r\n"
        resp = await exchange(server.main_port, head.encode())
        assert resp.status == 200, value
        assert resp.headers["X-Fly-Instance"] in KNOWN
        cookie = resp.headers.get("Set-Cookie", "")
        assert cookie.startswith(f"{COOKIE}=1~{resp.headers['X-Fly-Instance']}~"), (value, cookie)


async def test_unsigned_cookies_still_only_name_known_instances(engine: str, backends: Backends, recording_backend,  # type: ignore[no-untyped-def]
                                                                start_proxy) -> None:
    trap: RecordingBackend = await recording_backend()
    server = await start_proxy(make_config(backends, engine=engine, cookie=CookieConfig(signed=False)))
    trap_addr = f"127.0.0.1:{trap.port}"
    for value in ["evil", trap_addr, f"1~{trap_addr}~1~~", "1~evil~1~~", "localhost", "a.b", "b"]:
        head = f"GET /c HTTP/1.1\r\nHost: proxy.test\r\nCookie: {COOKIE}={value}\r\nConnection: close\r\n\r\n"
        resp = await exchange(server.main_port, head.encode())
        assert resp.status == 200 and resp.headers["X-Fly-Instance"] in KNOWN, value
        if value == "b":
            assert resp.headers["X-Fly-Instance"] == "b"  # control: a known bare id is honoured
    assert trap.connections == 0


async def test_admin_cannot_pin_a_user_to_an_unknown_instance(engine: str, backends: Backends, start_proxy,  # type: ignore[no-untyped-def]
                                                              http) -> None:
    server = await start_proxy(make_config(backends, engine=engine))
    for instance in ("evil", "http://127.0.0.1:1", "", None, 5):
        async with http.put(f"http://127.0.0.1:{server.admin_port}/pins/u1", json={"instance": instance}) as resp:
            assert resp.status == 400
    assert await server.ctx.store.get("u1") is None


# --------------------------------------------------------------------------- nothing echoed


HOSTILE_VALUES = [
    "instance=evil", "evil;instance=evil", "a;state=x", "x\tinstance=evil", "x, instance=evil",
    '"quoted"', "x=1; Path=/; Domain=evil.example", "fly-instance-id=evil", "<script>alert(1)</script>",
    "\u00e9\u00e8", "a" * 300, "%0d%0aSet-Cookie:%20x=y", "${jndi:ldap://evil}", "m2;", "m2 ", "m9",
]

REPLAY_RE = re.compile(
    r"(?:instance|prefer_instance)=(m1|m2|m3);state=affinity(?:;timeout=\d+m?s;fallback=prefer_self)?")
COOKIE_RE = re.compile(
    rf"{COOKIE}=1~(m1|m2|m3|a|b|c)~[0-9a-z]+~[A-Za-z0-9_-]*~[A-Za-z0-9_-]{{22}}; "
    r"Max-Age=\d+; Path=/; HttpOnly; SameSite=Lax")


def _fly_config(backends: Backends, engine: str) -> Config:
    urls = {m: f"http://127.0.0.1:{backends.ports[b]}" for m, b in (("m1", "a"), ("m2", "b"), ("m3", "c"))}
    return Config(
        engine=engine,
        mode="fly",
        listen="127.0.0.1:0",
        admin_listen="127.0.0.1:0",
        instances=tuple(InstanceConfig(m, u) for m, u in urls.items()),
        cookie=CookieConfig(secret=SECRET),
        user_key=(UserKeySourceConfig("header", "X-User-Id"), UserKeySourceConfig("query", "userId"),
                  UserKeySourceConfig("cookie", "uid")),
        fly=FlyConfig(app="demo", machine_id="m1", region="lcl", upstream=urls["m1"]),
        health=HealthConfig(interval=0.3, timeout=2.0, unhealthy_after=1, healthy_after=1),  # 2 s: see fly_config
        limits=LimitsConfig(upstream_connect_timeout=1.0),
    )


def _assert_nothing_echoed(resp_headers, body: bytes, hostile: str) -> None:  # type: ignore[no-untyped-def]
    replay = resp_headers.getall("fly-replay", [])
    for value in replay:
        assert REPLAY_RE.fullmatch(value), value
    for value in resp_headers.getall("Set-Cookie", []):
        assert COOKIE_RE.fullmatch(value), value
    instance = resp_headers.get("X-Fly-Instance")
    assert instance is None or instance in {"m1", "m2", "m3"}
    if len(hostile) >= 3 and hostile not in ("m2;", "m2 "):
        for name, value in resp_headers.items():
            if name.lower() not in ("date", "content-length", "content-type", "server", "x-request-id"):
                assert hostile not in value, (name, value)
    if replay:
        doc = __import__("json").loads(body)
        assert set(doc) == {"message", "instance"} and doc["instance"] in {"m2", "m3"}


@pytest.mark.parametrize("prefer", [False, True])
async def test_client_values_are_never_echoed_into_replay_or_cookies(engine: str, backends: Backends, start_proxy, http,  # type: ignore[no-untyped-def]
                                                                     prefer: bool) -> None:
    config = _fly_config(backends, engine=engine)
    config = replace(config, fly=replace(config.fly, prefer_instance=prefer, replay_timeout=5.0))
    server = await start_proxy(config)
    base = f"http://127.0.0.1:{server.main_port}"
    replays = 0
    for hostile in HOSTILE_VALUES:
        for where in ("user", "query", "cookie-user", "force", "affinity-cookie", "replay-src", "replay-failed",
                      "unavailable"):
            headers: dict[str, str] = {}
            params: dict[str, str] = {}
            if where == "user":
                headers["X-User-Id"] = hostile
            elif where == "query":
                params["userId"] = hostile
            elif where == "cookie-user":
                headers["Cookie"] = f"uid={hostile}"
            elif where == "force":
                headers["fly-force-instance-id"] = hostile
            elif where == "affinity-cookie":
                headers["Cookie"] = f"{COOKIE}={hostile}"
            elif where == "replay-src":
                headers["fly-replay-src"] = f"instance={hostile};state={hostile}"
            elif where == "replay-failed":
                headers["fly-replay-failed"] = f"instance={hostile};reason={hostile}"
            else:
                headers["fly-preferred-instance-unavailable"] = hostile
            headers = {k: v.encode("utf-8").decode("latin-1") for k, v in headers.items()}
            async with http.get(base + "/echo", headers=headers, params=params) as resp:
                body = await resp.read()
                assert resp.status in (200, 409), (where, hostile, resp.status, body[:200])
                replays += resp.status == 409
                _assert_nothing_echoed(resp.headers, body, hostile)
    assert replays, "expected some requests to be replayed to m2/m3"


# --------------------------------------------------------------------------- secret rotation


async def test_cookie_secret_rotation_logs_nobody_out(engine: str, backends: Backends, start_proxy, http) -> None:  # type: ignore[no-untyped-def]
    old, new = "old-secret-" + "o" * 20, "new-secret-" + "n" * 20
    first = await start_proxy(make_config(backends, engine=engine, cookie=CookieConfig(secret=old)))
    cookies = {}
    for i in range(12):
        async with http.get(f"http://127.0.0.1:{first.main_port}/") as resp:
            cookies[i] = (affinity_cookie(resp), resp.headers["X-Fly-Instance"])
    rotated = await start_proxy(make_config(backends, engine=engine,
                                            cookie=CookieConfig(secret=new, previous_secrets=(old,))))
    for value, instance in cookies.values():
        async with http.get(f"http://127.0.0.1:{rotated.main_port}/", headers={"Cookie": f"{COOKIE}={value}"}) as resp:
            assert resp.headers["X-Fly-Instance"] == instance  # still on its instance
            reissued = affinity_cookie(resp)
            assert reissued and reissued != value  # re-signed with the new secret
        async with http.get(f"http://127.0.0.1:{rotated.main_port}/",
                            headers={"Cookie": f"{COOKIE}={reissued}"}) as resp:
            assert resp.headers["X-Fly-Instance"] == instance and affinity_cookie(resp) is None
    dropped = await start_proxy(make_config(backends, engine=engine, cookie=CookieConfig(secret=new)))
    value, _ = cookies[0]
    async with http.get(f"http://127.0.0.1:{dropped.main_port}/", headers={"Cookie": f"{COOKIE}={value}"}) as resp:
        assert affinity_cookie(resp) is not None  # old secret retired: the cookie is re-issued, never trusted


# --------------------------------------------------------------------------- deployment


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "examples/fly/Dockerfile"])
def test_docker_images_run_as_non_root(dockerfile: str) -> None:
    lines = []
    for raw in (ROOT / dockerfile).read_text().replace("\\\n", " ").splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            lines.append(line)
    final_stage = max(i for i, line in enumerate(lines) if line.upper().startswith("FROM "))
    stage = lines[final_stage:]
    users = [(i, line.split(None, 1)[1].strip()) for i, line in enumerate(stage) if line.upper().startswith("USER ")]
    starts = [i for i, line in enumerate(stage) if line.upper().startswith(("CMD ", "ENTRYPOINT "))]
    assert users and starts, dockerfile
    last_user_index, user = users[-1]
    assert last_user_index < min(starts), "USER must come before CMD/ENTRYPOINT"
    name = user.split(":")[0]
    assert name not in ("root", "0"), f"{dockerfile} runs as {user}"
    created = " ".join(line for line in stage if line.upper().startswith("RUN "))
    assert re.search(rf"useradd\b.*\b{re.escape(name)}\b", created), f"{dockerfile}: user {name} is never created"
    assert re.search(r"--uid\s+[1-9]\d*", created), f"{dockerfile}: the user's uid must be non-zero"


def test_parse_errors_echo_nothing() -> None:
    """The protocol-level error bodies are fixed text (no request bytes, no parser message)."""
    from affinity_proxy.proxy.limits import refusal_bytes

    for per_ip in (False, True):
        assert b"127.0.0.1" not in refusal_bytes(per_ip)


async def test_malformed_request_answer_contains_no_request_bytes(engine: str, backends: Backends, start_proxy) -> None:  # type: ignore[no-untyped-def]
    server = await start_proxy(make_config(backends, engine=engine))
    marker = "Z" + secrets.token_hex(8)
    for data in (f"GET /{marker} HTTP/1.1 x\r\nHost: h\r\n\r\n".encode(),
                 f"GET / HTTP/1.1\r\nHost: h\r\nX-{marker}: a\x00\r\n\r\n".encode(),
                 f"GET / HTTP/1.1\r\nHost: h\r\n{marker} x: y\r\n\r\n".encode(),
                 request("GET", "/", [("X-Big", marker * 3000)])):
        resp = await exchange(server.main_port, data)
        assert 400 <= resp.status < 500
        assert marker.encode() not in resp.body and all(marker not in v for v in resp.headers.values())
