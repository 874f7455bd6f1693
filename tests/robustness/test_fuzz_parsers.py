"""Property-based fuzzing of what the existing parser properties (tests/routing, tests/config/test_config.py)
do not reach: hostile requests end to end against a live proxy, the header filters, the
Set-Cookie builder, limits validation and config files as YAML text.

The end-to-end properties drive real proxies (proxy mode and fly mode, demo backends behind them)
running on an event loop in a background thread, so hypothesis's synchronous test bodies can send
raw bytes over blocking sockets. Example counts are bounded; no deadline (network I/O).
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import socket
import tempfile
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from affinity_proxy.config import (
    Config,
    ConfigError,
    CookieConfig,
    FlyConfig,
    HealthConfig,
    InstanceConfig,
    LimitsConfig,
    UserKeySourceConfig,
    config_from_mapping,
    load_config,
)
from affinity_proxy.devtools.demo.backend import start_backend
from affinity_proxy.proxy.headers import (
    HOP_BY_HOP,
    downstream_response_headers,
    is_safe_header,
    upstream_request_headers,
)
from affinity_proxy.routing.cookie import CookieCodec, set_cookie_value
from affinity_proxy.routing.model import is_valid_instance_id
from affinity_proxy.serve.app import ProxyServer

COOKIE = "fly-instance-id"
KNOWN = {"a", "b", "c", "m1", "m2", "m3"}


# --------------------------------------------------------------------------- live proxies on a thread


class LoopThread:
    """An event loop running in a daemon thread; ``run`` executes a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.loop.shutdown_asyncgens()

        self.run(drain())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class Live:
    proxy_port: int
    fly_port: int


@pytest.fixture(scope="module")
def live(engine: str) -> Iterator[Live]:
    lt = LoopThread()
    runners: list[Any] = []
    servers: list[ProxyServer] = []

    async def start() -> Live:
        ports = {}
        for name in ("a", "b", "c"):
            runner, ports[name] = await start_backend(name)
            runners.append(runner)
        common = dict(
            engine=engine, listen="127.0.0.1:0", admin_listen="127.0.0.1:0",
            cookie=CookieConfig(secret="fuzz-secret-" + "f" * 20),
            user_key=(UserKeySourceConfig("header", "X-User-Id"), UserKeySourceConfig("query", "userId"),
                      UserKeySourceConfig("cookie", "uid")),
            health=HealthConfig(interval=1.0, timeout=1.0, unhealthy_after=3, healthy_after=1),
            limits=LimitsConfig(client_timeout=2.0, upstream_timeout=5.0, upstream_connect_timeout=1.0,
                                max_body_bytes=1024 * 1024),
        )
        members = tuple(InstanceConfig(n, f"http://127.0.0.1:{p}") for n, p in ports.items())
        proxy = ProxyServer(Config(instances=members, **common))  # type: ignore[arg-type]
        urls = {m: f"http://127.0.0.1:{ports[b]}" for m, b in (("m1", "a"), ("m2", "b"), ("m3", "c"))}
        fly = ProxyServer(Config(mode="fly", instances=tuple(InstanceConfig(m, u) for m, u in urls.items()),
                                 fly=FlyConfig(app="fuzz", machine_id="m1", region="lcl", upstream=urls["m1"]),
                                 **common))  # type: ignore[arg-type]
        for server in (proxy, fly):
            await server.start()
            servers.append(server)
        return Live(proxy.main_port, fly.main_port)

    async def stop() -> None:
        for server in servers:
            await server.stop()
        for runner in runners:
            await runner.cleanup()

    try:
        yield lt.run(start())
    finally:
        lt.run(stop())
        lt.close()


def _exchange(port: int, data: bytes) -> tuple[int, bytes]:
    """Send ``data`` on a fresh blocking socket; the status of the first response and its head."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
    assert buf.startswith(b"HTTP/1."), f"no HTTP answer: {buf[:200]!r}"
    return int(buf.split(b" ", 2)[1]), buf.split(b"\r\n\r\n", 1)[0]


def _check_head(head: bytes) -> None:
    """Our own headers in any answer are well formed whatever the request carried."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        lname = name.strip().lower()
        value = value.strip()
        if lname == b"x-fly-instance":
            assert value.decode() in KNOWN, value
        elif lname == b"fly-replay":
            assert re.fullmatch(rb"(?:prefer_)?instance=m[23];state=affinity(?:;timeout=\d+m?s;fallback=prefer_self)?",
                                value), value
        elif lname == b"set-cookie" and value.startswith(COOKIE.encode() + b"="):
            assert re.fullmatch(rb"fly-instance-id=1~(a|b|c|m1|m2|m3)~[0-9a-z]+~[A-Za-z0-9_-]*~[A-Za-z0-9_-]{22}; "
                                rb"Max-Age=\d+; Path=/; HttpOnly; SameSite=Lax", value), value


# Bytes a header value may carry on the wire (no CR/LF: those end the line; NUL included on purpose).
_value_bytes = st.binary(max_size=120).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
_value_text = st.text(st.characters(codec="latin-1", exclude_characters="\r\n"), max_size=120).map(
    lambda s: s.encode("latin-1"))
_values = st.one_of(_value_bytes, _value_text, st.sampled_from([
    b"a", b"m2", b"m3", b"evil", b"instance=m2", b"1~a~1~~" + b"A" * 22, b"a;b", b'"', b"%00", b"\xff\xfe",
    b"instance=m2;state=affinity", b"instance=m9;reason=timeout", b"${X}", b" ", b"",
]))
_names = st.sampled_from([
    b"X-User-Id", b"Cookie", b"fly-force-instance-id", b"fly-replay-src", b"fly-replay-failed",
    b"fly-preferred-instance-unavailable", b"X-Forwarded-For", b"X-Forwarded-Host", b"X-Request-Id",
    b"Fly-Request-Id", b"Connection", b"Upgrade", b"Accept-Encoding", b"Authorization", b"Origin",
    b"Sec-WebSocket-Key", b"Sec-WebSocket-Version", b"Expect", b"X-Custom", b"TE", b"Trailer", b"Keep-Alive",
])
_cookie_values = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80),
    st.sampled_from(["1~a~1~~", "1~m2~zz~abc~" + "B" * 22, "evil", "m2", "", "~", "1~~~~", "a" * 600]),
).map(lambda s: s.encode("latin-1"))
_paths = st.lists(st.sampled_from([*"abcXYZ019/._-~%?=&#;:@!$'()*+,", "%2F", "%00", "%ff", "..", "//"]),
                  max_size=40).map(lambda parts: ("/" + "".join(parts)).encode())
_methods = st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"])


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mode=st.sampled_from(["proxy", "fly"]),
    method=_methods,
    path=_paths,
    headers=st.lists(st.tuples(_names, _values), max_size=6),
    affinity=st.one_of(st.none(), _cookie_values),
    uid=st.one_of(st.none(), _cookie_values),
)
def test_hostile_requests_never_get_a_5xx(live: Live, mode: str, method: bytes, path: bytes,
                                          headers: list[tuple[bytes, bytes]], affinity: bytes | None,
                                          uid: bytes | None) -> None:
    lines = [method + b" " + path + b" HTTP/1.1", b"Host: fuzz.test"]
    lines += [name + b": " + value for name, value in headers if name.lower() != b"expect"]
    cookies = []
    if affinity is not None:
        cookies.append(COOKIE.encode() + b"=" + affinity)
    if uid is not None:
        cookies.append(b"uid=" + uid)
    if cookies:
        lines.append(b"Cookie: " + b"; ".join(cookies))
    lines.append(b"Connection: close")
    port = live.proxy_port if mode == "proxy" else live.fly_port
    status, head = _exchange(port, b"\r\n".join(lines) + b"\r\n\r\n")
    assert status < 500, (status, head)
    _check_head(head)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(["proxy", "fly"]), data=st.binary(min_size=1, max_size=300))
def test_random_bytes_after_a_request_line_never_get_a_5xx(live: Live, mode: str, data: bytes) -> None:
    """Arbitrary bytes where headers belong: a 4xx or a proxied answer, and never a hang (the
    payload always ends with a blank line, so the head is complete)."""
    port = live.proxy_port if mode == "proxy" else live.fly_port
    status, head = _exchange(port, b"GET / HTTP/1.1\r\nHost: fuzz.test\r\n" + data + b"\r\nConnection: close\r\n\r\n")
    assert status < 500, (status, head)
    _check_head(head)


# --------------------------------------------------------------------------- header filters

_any_name = st.one_of(st.text(max_size=20), st.sampled_from([*sorted(HOP_BY_HOP), "Set-Cookie", "X-A", "Host"]))
_any_value = st.text(max_size=40)


@settings(max_examples=400)
@given(st.lists(st.tuples(_any_name, _any_value), max_size=12), st.one_of(st.none(), st.text(max_size=20)),
       st.one_of(st.none(), st.text(max_size=30)))
def test_header_filters_never_emit_unsafe_or_hop_by_hop_headers(pairs: list[tuple[str, str]], client_ip: str | None,
                                                                 host: str | None) -> None:
    headers: CIMultiDict[str] = CIMultiDict(pairs)
    named_in_connection = {t.strip().lower() for v in headers.getall("Connection", []) for t in v.split(",")}
    upstream = upstream_request_headers(headers, client_ip=client_ip, scheme="http", host=host, request_id="r1",
                                        drop=("fly-force-instance-id",))
    assert "fly-force-instance-id" not in upstream
    for out in (upstream, downstream_response_headers(headers)):
        for name, value in out.items():
            assert is_safe_header(name, value), (name, value)
            assert name.lower() not in HOP_BY_HOP and name.lower() not in named_in_connection - {""}


@settings(max_examples=400)
@given(name=st.text(max_size=20), value=st.text(max_size=40), path=st.text(max_size=20),
       domain=st.one_of(st.none(), st.text(max_size=20)), same_site=st.text(max_size=8),
       max_age=st.integers(min_value=-5, max_value=10**9))
def test_set_cookie_builder_only_raises_value_error_and_never_splits(name: str, value: str, path: str,
                                                                      domain: str | None, same_site: str,
                                                                      max_age: int) -> None:
    try:
        out = set_cookie_value(name, value, max_age=max_age, path=path, domain=domain, secure=True, http_only=True,
                               same_site=same_site)
    except ValueError:
        return
    assert not re.search(r"[\x00-\x1f\x7f]", out)
    first = out.split("; ", 1)[0]
    assert first == f"{name}={value}" and ";" not in value and "," not in value


@settings(max_examples=400)
@given(raw=st.text(max_size=120), signed=st.booleans())
def test_decoded_cookies_only_name_valid_instance_ids(raw: str, signed: bool) -> None:
    codec = CookieCodec("s" * 20 if signed else None, signed=signed)
    decoded = codec.decode(raw, 1_700_000_000.0)
    if hasattr(decoded, "instance"):
        assert is_valid_instance_id(decoded.instance)
        assert codec.encode(decoded.instance, decoded.issued_at, decoded.user_digest)


# --------------------------------------------------------------------------- config: limits and YAML text

_limit_values = st.one_of(
    st.integers(min_value=-10, max_value=10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["1s", "0", "0s", "-1", "16KiB", "1MB", "10GiB", "1.5", "inf", "nan",
                                           "1h30m", "${A}", "${A:-5}", True, None, [], {}]),
)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.sampled_from([f.name for f in dataclasses.fields(LimitsConfig)])
                       | st.text(max_size=6), _limit_values, max_size=5))
def test_limits_only_raise_config_error_and_accepted_values_are_sane(limits: dict[str, Any]) -> None:
    data = {"instances": [{"id": "a", "url": "http://127.0.0.1:1"}], "cookie": {"secret": "s"}, "limits": limits}
    try:
        config = config_from_mapping(data, {"A": "7"})
    except ConfigError as err:
        assert str(err).startswith("limits")
        return
    lim = config.limits
    assert lim.max_connections >= 1 and lim.max_connections_per_ip >= 0
    assert lim.max_header_bytes >= 1024 and lim.max_body_bytes >= 1 and lim.max_ws_message_bytes >= 1
    for name in ("client_timeout", "upstream_timeout", "upstream_connect_timeout"):
        value = getattr(lim, name)
        assert value > 0 and value == value and value != float("inf"), (name, value)
    assert lim.ws_heartbeat >= 0


_yaml_text = st.lists(st.sampled_from([
    *"abcdelimtsnofuxrgkyv_:-{}[],'\"#&*!|>%@` \t\n0123456789.$",
    "limits:", "instances:", "  - id: a\n    url: http://127.0.0.1:1\n", "cookie: {secret: s}\n", "mode: fly\n",
    "<<: *a\n", "&a ", "!!python/object:os.system ", "? ", "${A}", "\x00", "\u00e9", "\ufeff",
]), max_size=60).map("".join)


@settings(max_examples=300, deadline=None)
@given(_yaml_text)
def test_config_files_only_raise_config_error(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "proxy.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            load_config(path, {"A": "1"})
        except ConfigError:
            pass
