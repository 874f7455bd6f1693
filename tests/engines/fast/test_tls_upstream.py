"""``https://`` instances: both engines speak TLS to them alike.

The instance is the demo backend served over TLS with a self-signed certificate made by the
``openssl`` command line in a temporary directory (for ``localhost`` and ``127.0.0.1``). Both
engines verify instance certificates against the system trust store, as aiohttp's client does by
default (there is no config key to turn verification off): so the certificate is trusted only by
a proxy started with ``SSL_CERT_FILE`` naming it. That proxy runs as ``affinity-proxy serve`` in
a subprocess (aiohttp loads its default trust store when it is imported), once per engine; the
untrusted case runs in this process. The backend records the SNI name each handshake carried.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from affinity_proxy.config import Config, CookieConfig, HealthConfig, InstanceConfig, LimitsConfig
from affinity_proxy.devtools.demo.backend import build_backend_app
from affinity_proxy.devtools.ports import free_port
from affinity_proxy.serve.app import ProxyServer
from tests.engines.fast.raw import exchange

ENGINES = ("aiohttp", "fast")
ROOT = Path(__file__).resolve().parents[3]

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="needs the openssl command line (make test installs it: .ci/install-deps)"
)


@dataclass
class TlsBackend:
    port: int
    cert: Path
    runner: web.AppRunner
    server_names: list[str | None] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"


def make_certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate (and its key) for localhost and 127.0.0.1."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


def spawn_serve(config: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "affinity_proxy", "serve", "--config", str(config)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop_serve(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
async def tls_backend(tmp_path: Path) -> AsyncIterator[TlsBackend]:
    cert, key = make_certificate(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    names: list[str | None] = []
    context.sni_callback = lambda _sock, name, _ctx: names.append(name)  # type: ignore[assignment,misc,return-value]
    runner = web.AppRunner(build_backend_app("t"))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    backend = TlsBackend(port, cert, runner, names)
    yield backend
    await runner.cleanup()


def serve_yaml(engine: str, port: int, admin: int, url: str) -> str:
    return "\n".join([
        "mode: proxy",
        f"engine: {engine}",
        f'listen: "127.0.0.1:{port}"',
        f'admin_listen: "127.0.0.1:{admin}"',
        "instances:",
        f"  - {{id: t, url: '{url}'}}",
        "cookie:",
        "  secret: tls-test-secret-0123456789abcdef",
        "health:",
        "  interval: 0.2",
        "  healthy_after: 1",
        "store:",
        "  url: memory://",
        "log:",
        "  level: WARNING",
        "",
    ])


async def wait_healthy(http: aiohttp.ClientSession, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    async with asyncio.timeout(60):
        while True:
            assert proc.poll() is None, log.read_bytes().decode(errors="replace")  # noqa: ASYNC240
            try:
                async with http.get(f"http://127.0.0.1:{port}/_affinity/health") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)


async def test_https_instances_are_served_alike_by_both_engines(tls_backend: TlsBackend, tmp_path: Path) -> None:
    """With the certificate trusted, both engines forward to the instance over TLS (SNI =
    the instance's host name), with keep-alive, request bodies, HEAD and the same answers."""
    env = dict(os.environ, SSL_CERT_FILE=str(tls_backend.cert), PYTHONPATH=str(ROOT), LOG_LEVEL="WARNING")
    env.pop("SSL_CERT_DIR", None)
    results: dict[str, list[object]] = {}
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        for engine in ENGINES:
            port, admin = free_port(), free_port()
            config = tmp_path / f"{engine}.yaml"
            config.write_text(serve_yaml(engine, port, admin, tls_backend.url))
            proc = spawn_serve(config, env, tmp_path / f"{engine}.log")
            try:
                tls_backend.server_names.clear()
                await wait_healthy(http, port, proc, tmp_path / f"{engine}.log")
                seen: list[object] = []
                for _ in range(3):
                    async with http.get(f"http://127.0.0.1:{port}/hello?x=1", headers={"X-Test": "tls"}) as resp:
                        doc = await resp.json()
                        seen.append((resp.status, resp.headers["X-Fly-Instance"], doc["instance"], doc["path"]))
                body = os.urandom(300_000)
                async with http.post(f"http://127.0.0.1:{port}/upload", data=body) as resp:
                    doc = await resp.json()
                    seen.append((resp.status, doc["bytes"]))
                head = await exchange(port, b"HEAD /hello HTTP/1.1\r\nHost: app.test\r\n\r\n"
                                            b"GET /hello HTTP/1.1\r\nHost: app.test\r\n\r\n",
                                      expect=2, head_requests={0})
                seen.append([(r.status, r.body == b"") for r in head.responses])
                results[engine] = seen
                assert tls_backend.server_names and set(tls_backend.server_names) == {"localhost"}, engine
            finally:
                stop_serve(proc)
    assert results["fast"] == results["aiohttp"]
    assert results["fast"][0] == (200, "t", "t", "/hello")
    assert results["fast"][3] == (200, 300_000)
    assert results["fast"][4] == [(200, True), (200, False)]


def untrusting_config(engine: str, url: str) -> Config:
    return Config(
        engine=engine, listen="127.0.0.1:0", admin_listen="127.0.0.1:0",
        instances=(InstanceConfig("t", url),), cookie=CookieConfig(secret="tls-test-secret-0123456789abcdef"),
        health=HealthConfig(interval=60.0), limits=LimitsConfig(upstream_connect_timeout=2.0),
    )


async def test_an_untrusted_certificate_is_refused_alike(tls_backend: TlsBackend) -> None:
    """Without the certificate in the trust store neither engine sends the request: the answer is
    the same JSON error from both, and the instance never saw an HTTP request."""
    answers: dict[str, list[tuple[int, str]]] = {}
    for engine in ENGINES:
        server = ProxyServer(untrusting_config(engine, tls_backend.url))
        await server.start()
        try:
            answers[engine] = []
            for _ in range(2):
                result = await exchange(server.main_port, b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n", expect=1)
                resp = result.responses[0]
                answers[engine].append((resp.status, resp.json()["error"]))
        finally:
            await server.stop()
    assert answers["fast"] == answers["aiohttp"]
    assert all(status in (502, 503) for status, _ in answers["fast"])
    assert build_count(tls_backend) == 0


def build_count(backend: TlsBackend) -> int:
    from affinity_proxy.devtools.demo.backend import BACKEND_STATE

    return int(backend.runner.app[BACKEND_STATE].count)  # type: ignore[union-attr]
