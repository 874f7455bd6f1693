"""The benchmark harness's pure parts: wrk's output parser, the wrk command line, the nginx
configurations and the ratio tables. No load is run here and nothing is timed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from benchmarks import nginx
from benchmarks.run import REFERENCE, Row, median_rows, table, verdicts, with_ratios
from benchmarks.wrk import STATUS_LUA, WrkParseError, parse_wrk_output, to_ms, wrk_argv

# Captured from Debian's wrk 4.1.0 with benchmarks/wrk.py's Lua script, against an nginx backend.
DIRECT = """\
Running 3s test @ http://127.0.0.1:45945/
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.59ms    3.16ms  37.83ms   91.97%
    Req/Sec    67.46k    13.52k   95.67k    70.00%
  Latency Distribution
     50%  212.00us
     75%    2.06ms
     90%    4.26ms
     99%   16.21ms
  203321 requests in 3.03s, 29.47MB read
Requests/sec:  67062.09
Transfer/sec:      9.72MB
status 200 203321
"""

# Captured against a fly-mode node answering every request with a 409 fly-replay.
FLY = """\
Running 3s test @ http://127.0.0.1:37649/
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     9.61ms    3.71ms  35.10ms   70.49%
    Req/Sec     5.24k   512.96     6.48k    73.33%
  Latency Distribution
     50%    9.15ms
     75%   11.35ms
     90%   13.55ms
     99%   21.98ms
  15649 requests in 3.00s, 3.69MB read
  Non-2xx or 3xx responses: 15649
Requests/sec:   5209.96
Transfer/sec:      1.23MB
status 409 15649
"""

# wrk's report without the Lua script, with socket errors and slow latencies (seconds).
TROUBLED = """\
Running 10s test @ http://127.0.0.1:8080/
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   120.50ms  300.10ms   1.99s    95.00%
    Req/Sec   800.00    100.00     1.00k    80.00%
  Latency Distribution
     50%   40.00ms
     75%   60.00ms
     90%  200.00ms
     99%    1.50s
  8000 requests in 10.01s, 1.00MB read
  Socket errors: connect 0, read 3, write 1, timeout 12
  Non-2xx or 3xx responses: 7
Requests/sec:    799.20
Transfer/sec:    102.30KB
"""


def test_parses_a_captured_run() -> None:
    r = parse_wrk_output(DIRECT)
    assert r.requests == 203321
    assert r.seconds == pytest.approx(3.03)
    assert r.rps == pytest.approx(67062.09)
    assert r.p50_ms == pytest.approx(0.212)
    assert r.p99_ms == pytest.approx(16.21)
    assert r.statuses == {200: 203321}
    assert r.socket_errors == {}
    assert r.errors() == 0


def test_fly_replays_are_errors_only_when_not_expected() -> None:
    r = parse_wrk_output(FLY)
    assert r.statuses == {409: 15649}
    assert r.non_2xx_3xx == 15649
    assert r.errors(expected_status=409) == 0
    assert r.errors() == 15649  # for a proxy target a 409 is a failure
    assert r.p50_ms == pytest.approx(9.15)


def test_socket_errors_and_non_2xx_without_the_lua_script() -> None:
    r = parse_wrk_output(TROUBLED)
    assert r.socket_errors == {"connect": 0, "read": 3, "write": 1, "timeout": 12}
    assert r.non_2xx_3xx == 7
    assert r.errors() == 16 + 7
    assert r.p99_ms == pytest.approx(1500.0)
    with pytest.raises(WrkParseError):
        r.errors(expected_status=409)  # needs the status counts


def test_status_lines_count_unexpected_statuses() -> None:
    r = parse_wrk_output(FLY.replace("status 409 15649", "status 409 15000\nstatus 502 600\nstatus 200 49"))
    assert r.errors(expected_status=409) == 649
    assert r.errors() == 15600  # 409 and 502 are not 2xx/3xx; 200 is fine


@pytest.mark.parametrize("text", ["", "wrk: connection refused\n", DIRECT.replace("     99%   16.21ms\n", "")])
def test_incomplete_output_is_an_error(text: str) -> None:
    with pytest.raises(WrkParseError):
        parse_wrk_output(text)


def test_units() -> None:
    assert to_ms("250.00", "us") == pytest.approx(0.25)
    assert to_ms("2", "s") == 2000.0
    assert to_ms("1.5", "m") == 90_000.0


def test_wrk_command_line() -> None:
    argv = wrk_argv("wrk", "http://127.0.0.1:8080/", duration=10, connections=50,
                    headers=[("Cookie", "fly-instance-id=abc"), ("X-User-Id", "u")], script=Path("/t/s.lua"), cpu=0)
    assert argv[:3] == ["taskset", "-c", "0"]
    assert argv[3:8] == ["wrk", "-t1", "-c50", "-d10s", "--latency"]
    assert argv[-1] == "http://127.0.0.1:8080/"
    assert ["-H", "Cookie: fly-instance-id=abc"] == argv[argv.index("-H"):argv.index("-H") + 2]
    assert argv[argv.index("-s") + 1] == "/t/s.lua"
    assert "taskset" not in wrk_argv("wrk", "http://127.0.0.1:1/", duration=1, connections=1)
    with pytest.raises(ValueError):
        wrk_argv("wrk", "http://10.0.0.1:80/", duration=1, connections=1)


def test_lua_script_reports_from_done() -> None:
    assert "function done(" in STATUS_LUA and 'thread:get("statuses")' in STATUS_LUA
    assert re.search(r'status %d %d\\n', STATUS_LUA)


def _servers(conf: str) -> list[str]:
    return re.findall(r"listen (127\.0\.0\.1:\d+)", conf)


def test_backend_config(tmp_path: Path) -> None:
    conf = nginx.backend_conf(tmp_path, [("app-1", 9001), ("app-2", 9002), ("app-3", 9003)])
    assert "daemon off;" in conf
    assert re.search(r"^worker_processes 1;$", conf, re.M)
    assert f"pid {tmp_path / 'backends.pid'};" in conf
    assert f"error_log {tmp_path / 'backends-error.log'} warn;" in conf
    assert _servers(conf) == ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"]
    assert re.findall(r'return 200 "([^"]+)";', conf) == ["app-1", "app-2", "app-3"]
    assert "access_log off;" in conf
    assert str(tmp_path) in conf.split("client_body_temp_path", 1)[1].split(";", 1)[0]
    with pytest.raises(ValueError):
        nginx.backend_conf(tmp_path, [('bad"id', 1)])
    with pytest.raises(ValueError):
        nginx.backend_conf(tmp_path, [])


def test_proxy_config(tmp_path: Path) -> None:
    conf = nginx.proxy_conf(tmp_path, 8080, [9001, 9002, 9003], cookie_name="fly-instance-id")
    assert re.search(r"^worker_processes 1;$", conf, re.M) and "daemon off;" in conf
    upstream = conf.split("upstream affinity_apps {", 1)[1].split("}", 1)[0]
    assert "hash $affinity_cookie consistent;" in upstream
    assert "keepalive 64;" in upstream
    assert re.findall(r"server (127\.0\.0\.1:\d+);", upstream) == ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"]
    assert _servers(conf) == ["127.0.0.1:8080"]
    assert "proxy_http_version 1.1;" in conf
    assert 'proxy_set_header Connection "";' in conf
    assert "map $http_cookie $affinity_cookie {" in conf
    assert "$cookie_fly-instance-id" not in conf  # nginx variable names cannot contain '-'


def test_cookie_map_regex_extracts_the_value() -> None:
    text = nginx.cookie_map("fly-instance-id")
    pattern = re.search(r'"~(.*)" \$1;', text)
    assert pattern is not None
    regex = re.compile(pattern.group(1).replace("\\\\", "\\"))  # as nginx reads the quoted string

    def value(header: str) -> str | None:
        m = regex.search(header)
        return m.group(1) if m else None

    assert value("fly-instance-id=1~app-2~abc~d~sig") == "1~app-2~abc~d~sig"
    assert value("a=1; fly-instance-id=xyz; b=2") == "xyz"
    assert value("a=1;fly-instance-id=xyz") == "xyz"
    assert value("my-fly-instance-id=nope") is None
    assert value("session=1") is None
    with pytest.raises(ValueError):
        nginx.cookie_map("bad name")


NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)


@pytest.mark.skipif(NGINX is None, reason="nginx not installed (make test installs it: .ci/install-deps)")
def test_nginx_accepts_the_generated_configs(tmp_path: Path) -> None:
    binary = NGINX
    assert binary is not None
    for name in ("backends", "nginx-proxy"):
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (tmp_path / f"{name}-temp" / sub).mkdir(parents=True)
    for name, text in (("backends", nginx.backend_conf(tmp_path, [("app-1", 9001), ("app-2", 9002)])),
                       ("nginx-proxy", nginx.proxy_conf(tmp_path, 8080, [9001, 9002]))):
        path = tmp_path / f"{name}.conf"
        path.write_text(text)
        proc = subprocess.run([*nginx.nginx_argv(binary, tmp_path, path, name), "-t", "-q"],
                              capture_output=True, text=True, timeout=30, check=False)
        assert proc.returncode == 0, proc.stderr


def _row(target: str, rps: float, p99: float, errors: int = 0) -> Row:
    return Row(target, rps, p99 / 4, p99, errors, int(rps * 10), 1.0)


def test_ratios_are_against_the_same_round_and_medians_of_ratios() -> None:
    round1 = with_ratios([_row(REFERENCE, 40_000, 2.0), _row("affinity-proxy", 20_000, 3.0)])
    round2 = with_ratios([_row(REFERENCE, 20_000, 4.0), _row("affinity-proxy", 12_000, 4.0, errors=2)])
    round3 = with_ratios([_row(REFERENCE, 30_000, 2.0), _row("affinity-proxy", 18_000, 2.0)])
    assert round1[0].rps_ratio == 1.0 and round1[1].rps_ratio == pytest.approx(0.5)
    assert round1[1].p99_ratio == pytest.approx(1.5)
    med = {r.target: r for r in median_rows([round1, round2, round3])}
    proxy = med["affinity-proxy"]
    assert proxy.rps == 18_000
    assert proxy.rps_ratio == pytest.approx(0.6)  # median of 0.5, 0.6, 0.6 (not 18k / 30k of the medians)
    assert proxy.p99_ratio == pytest.approx(1.0)  # median of 1.5, 1.0, 1.0
    assert proxy.errors == 2
    assert [r.target for r in median_rows([round1])] == [REFERENCE, "affinity-proxy"]
    text = table(median_rows([round1, round2, round3]))
    assert text.splitlines()[0].startswith("| target | req/s |")
    assert "| affinity-proxy | 18,000 |" in text
    assert any("not met" in line for line in verdicts(median_rows([round1, round2, round3])))
