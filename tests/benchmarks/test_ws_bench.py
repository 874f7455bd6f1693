"""make bench-ws (issue #16): the nginx WebSocket config, the peers' sequence checks, the report's sums."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest

from benchmarks import nginx
from benchmarks.ws_bench import BEGIN, END, WsRow, carry_section, summary, with_ratios, write_section
from benchmarks.ws_peers import EchoServer, run_clients

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)


@pytest.mark.skipif(NGINX is None, reason="nginx not installed (make test installs it: .ci/install-deps)")
def test_nginx_accepts_the_websocket_proxy_config(tmp_path: Path) -> None:
    assert NGINX is not None
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp_path / "nginx-ws-temp" / sub).mkdir(parents=True)
    text = nginx.ws_proxy_conf(tmp_path, 8080, 9001)
    assert "proxy_set_header Upgrade $http_upgrade;" in text and "proxy_http_version 1.1;" in text
    path = tmp_path / "nginx-ws.conf"
    path.write_text(text)
    proc = subprocess.run([*nginx.nginx_argv(NGINX, tmp_path, path, "nginx-ws"), "-t", "-q"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("rate", [0.0, 2000.0])
async def test_the_clients_count_every_echo_against_the_echo_instance(rate: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(EchoServer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    calls = []
    try:
        stats, window, before, after = await run_clients("127.0.0.1", port, 4, 0.1, 0.3,
                                                         lambda: calls.append(1) or len(calls), rate)
    finally:
        server.close()
    assert (before, after) == (1, 2)
    assert stats.errors == [] and stats.wrong == 0 and stats.round_trips > 0
    assert window >= 0.3
    if rate:
        assert stats.round_trips <= rate * window * 1.2  # paced


def test_ratios_verdicts_and_the_results_section(tmp_path: Path) -> None:
    rnd = with_ratios([WsRow("nginx-ws", 5000, 20.0, 0.1, 0.0, 0), WsRow("affinity-ws", 5000, 26.0, 0.13, 0.0, 0),
                       WsRow("affinity-ws@old", 5000, 50.0, 0.25, 0.0, 0)])
    assert [r.ratio for r in rnd] == [1.0, 1.3, 2.5]
    table, verdicts = summary([rnd], ["nginx-ws", "affinity-ws", "affinity-ws@old"])
    assert "| affinity-ws | 5,000 | 26.0 | 1.30 |" in table
    assert verdicts == ["- affinity-ws: proxy CPU per round trip 1.30 x nginx's (goal ≤ 1.5), "
                        "0 dropped or reordered messages: **met**"]
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n")
    write_section(f"{BEGIN}\nfirst\n{END}", results)
    write_section(f"{BEGIN}\nsecond\n{END}", results)
    assert results.read_text() == f"# Benchmark results\n\n{BEGIN}\nsecond\n{END}\n"
    assert carry_section(results, "# a new run\n") == f"# a new run\n\n{BEGIN}\nsecond\n{END}\n"
