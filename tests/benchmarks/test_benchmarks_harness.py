"""The benchmark harness: wrk's output parser, the wrk command line, the nginx and HAProxy
configurations, same-round ratios, medians with their spread, flagged rounds, and the byte relay
(relaying real bytes over 127.0.0.1). No load is run here and nothing is timed."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from affinity_proxy.devtools.ports import free_port as _free_port
from benchmarks import byte_relay, haproxy, nginx
from benchmarks.refs import (
    COMPARABLE,
    RefError,
    Worktrees,
    check_imports_from,
    check_ref_syntax,
    mirrored,
    ref_label,
    ref_target_name,
    resolve,
    split_target_name,
)
from benchmarks.rounds import (
    CEILING,
    NEW_SESSION_REFERENCE,
    REFERENCE,
    Leg,
    Row,
    Spread,
    combine_legs,
    comparison_lines,
    flag_rounds,
    mixture_quantile,
    per_core,
    ref_pairs,
    reference_table,
    round_order,
    round_table,
    same_round_ratio,
    serpentine,
    summarize,
    summary_table,
    unflagged,
    verdicts,
    with_ratios,
)
from benchmarks.rounds import DIRECT as DIRECT_TARGET
from benchmarks.run import count_targets, estimate_seconds, legs_text, parse_args
from benchmarks.targets import Processes, proxy_configs, start_targets
from benchmarks.wrk import GRID_PERCENTILES, STATUS_LUA, WrkParseError, parse_wrk_output, to_ms, wrk_argv

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

# Captured from Debian's wrk 4.1.0 with benchmarks/wrk.py's Lua script (the latency grid: 0 = min,
# 1..99, 99.5, 99.9, 99.99, 100 = max, in microseconds), against nginx-proxy.
GRID = """\
Running 1s test @ http://127.0.0.1:19279/
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   464.27us  179.05us   2.75ms   94.70%
    Req/Sec   103.40k     1.71k  106.16k    72.73%
  Latency Distribution
     50%  429.00us
     75%  494.00us
     90%  585.00us
     99%    1.34ms
  112912 requests in 1.10s, 16.37MB read
Requests/sec: 102619.10
Transfer/sec:     14.88MB
latency p 0 127
latency p 1 280
latency p 2 298
latency p 3 309
latency p 4 317
latency p 5 325
latency p 6 331
latency p 7 337
latency p 8 343
latency p 9 348
latency p 10 353
latency p 11 357
latency p 12 361
latency p 13 365
latency p 14 368
latency p 15 372
latency p 16 375
latency p 17 378
latency p 18 381
latency p 19 383
latency p 20 386
latency p 21 388
latency p 22 390
latency p 23 392
latency p 24 394
latency p 25 396
latency p 26 398
latency p 27 399
latency p 28 401
latency p 29 402
latency p 30 404
latency p 31 405
latency p 32 406
latency p 33 408
latency p 34 409
latency p 35 410
latency p 36 412
latency p 37 413
latency p 38 414
latency p 39 415
latency p 40 417
latency p 41 418
latency p 42 419
latency p 43 420
latency p 44 421
latency p 45 423
latency p 46 424
latency p 47 425
latency p 48 426
latency p 49 427
latency p 50 429
latency p 51 430
latency p 52 432
latency p 53 433
latency p 54 434
latency p 55 436
latency p 56 438
latency p 57 439
latency p 58 441
latency p 59 443
latency p 60 445
latency p 61 447
latency p 62 449
latency p 63 451
latency p 64 454
latency p 65 456
latency p 66 459
latency p 67 462
latency p 68 465
latency p 69 469
latency p 70 473
latency p 71 476
latency p 72 480
latency p 73 484
latency p 74 489
latency p 75 494
latency p 76 499
latency p 77 504
latency p 78 509
latency p 79 514
latency p 80 520
latency p 81 526
latency p 82 532
latency p 83 538
latency p 84 544
latency p 85 551
latency p 86 558
latency p 87 565
latency p 88 572
latency p 89 578
latency p 90 585
latency p 91 593
latency p 92 600
latency p 93 608
latency p 94 618
latency p 95 630
latency p 96 645
latency p 97 666
latency p 98 744
latency p 99 1337
latency p 99.5 1839
latency p 99.9 2364
latency p 99.99 2587
latency p 100 2752
status 200 112912
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
    assert re.search(r'latency p %g %d\\n", p, latency:percentile\(p\)', STATUS_LUA)
    assert "latency.min" in STATUS_LUA and "latency.max" in STATUS_LUA
    grid = re.search(r"local GRID = \{([^}]*)\}", STATUS_LUA)
    assert grid is not None
    assert [float(v) for v in grid.group(1).split(",")] == [float(p) for p in GRID_PERCENTILES]
    assert GRID_PERCENTILES[:3] == (1, 2, 3) and GRID_PERCENTILES[-4:] == (99, 99.5, 99.9, 99.99)


def test_parses_the_latency_grid_of_a_captured_run() -> None:
    r = parse_wrk_output(GRID)
    assert r.requests == 112912 and r.statuses == {200: 112912}
    assert len(r.latency_grid) == len(GRID_PERCENTILES) + 2
    assert r.latency_grid[0] == (0.0, pytest.approx(0.127))  # the minimum
    assert r.latency_grid[-1] == (100.0, pytest.approx(2.752))  # the maximum, as wrk's "Max" (2.75ms)
    grid = dict(r.latency_grid)
    assert grid[50.0] == pytest.approx(r.p50_ms) == pytest.approx(0.429)  # wrk's own 50%: the same function
    assert grid[99.0] == pytest.approx(1.337) and r.p99_ms == pytest.approx(1.34)  # wrk prints 2 decimals
    assert grid[99.99] == pytest.approx(2.587)
    pcts = [p for p, _ in r.latency_grid]
    assert pcts == sorted(pcts) and [v for _, v in r.latency_grid] == sorted(v for _, v in r.latency_grid)
    assert parse_wrk_output(DIRECT).latency_grid == ()  # without the grid lines: none
    with pytest.raises(WrkParseError):
        parse_wrk_output(GRID.replace("latency p 99.5 ", "latency p 199.5 "))


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


def _row(target: str, rps: float, p99: float = 2.0, *, errors: int = 0, cpu: float | None = 1.0,
         other: float | None = 0.0, reference: str = REFERENCE) -> Row:
    return Row(target, rps, p99 / 4, p99, errors, int(rps * 10), cpu, other_cpu=other, reference=reference)


def _round(nginx: float = 50_000, direct: float = 100_000, proxy: float = 30_000, relay: float = 40_000,
           haproxy_rps: float = 60_000, new: float = 20_000, *, nginx_cpu: float = 1.0, haproxy_cpu: float = 1.0,
           other: float = 0.0) -> list[Row]:
    return with_ratios([
        _row(REFERENCE, nginx, cpu=nginx_cpu, other=other), _row(DIRECT_TARGET, direct), _row(CEILING, relay),
        _row("affinity-proxy", proxy), _row(NEW_SESSION_REFERENCE, haproxy_rps, cpu=haproxy_cpu,
                                            reference=NEW_SESSION_REFERENCE),
        _row("affinity-new", new, reference=NEW_SESSION_REFERENCE),
    ])


# --- spreads, ratios, medians -----------------------------------------------------------------


def test_spread_of_values() -> None:
    assert Spread.of([]) is None
    assert Spread.of([None, None]) is None
    assert Spread.of([3.0, None, 1.0, 2.0]) == Spread(2.0, 1.0, 3.0)
    assert Spread.of([1.0, 4.0]) == Spread(2.5, 1.0, 4.0)  # even count: the mean of the middle two
    assert Spread.of([0.5]) == Spread(0.5, 0.5, 0.5)


def test_spread_cell() -> None:
    assert Spread(0.63, 0.55, 0.7).cell(".2f") == "0.63 (0.55-0.70)"
    assert Spread(48_000, 45_100, 50_200).cell(",.0f") == "48,000 (45,100-50,200)"
    assert Spread(0.631, 0.629, 0.632).cell(".2f") == "0.63"  # no range when it rounds away


def test_ratios_are_against_each_rows_reference_and_the_relay_of_the_same_round() -> None:
    rows = {r.target: r for r in _round()}
    assert rows[REFERENCE].rps_ratio == 1.0 and rows[REFERENCE].p99_ratio == 1.0
    assert rows["affinity-proxy"].rps_ratio == pytest.approx(0.6)  # 30k / nginx 50k
    assert rows["affinity-new"].rps_ratio == pytest.approx(1 / 3)  # 20k / haproxy 60k
    assert rows["affinity-proxy"].ceiling_ratio == pytest.approx(0.75)  # 30k / relay 40k
    assert rows[CEILING].ceiling_ratio == 1.0
    assert rows[NEW_SESSION_REFERENCE].ceiling_ratio == pytest.approx(1.5)


def test_ratios_without_a_reference_or_relay_are_missing_not_invented() -> None:
    rows = {r.target: r for r in with_ratios([_row("affinity-proxy", 10_000), _row("affinity-new", 5_000,
                                                                                  reference=NEW_SESSION_REFERENCE)])}
    assert rows["affinity-proxy"].rps_ratio is None and rows["affinity-proxy"].ceiling_ratio is None
    assert rows["affinity-new"].p99_ratio is None
    zero = {r.target: r for r in with_ratios([_row(REFERENCE, 0.0, 0.0), _row("affinity-proxy", 10_000)])}
    assert zero["affinity-proxy"].rps_ratio is None and zero["affinity-proxy"].p99_ratio is None  # no division by 0


def test_summary_is_the_median_of_same_round_ratios_with_min_max() -> None:
    rounds = [_round(nginx=n, proxy=p) for n, p in ((40_000, 20_000), (20_000, 12_000), (30_000, 18_000))]
    rounds[1] = [r if r.target != "affinity-proxy" else dataclasses.replace(r, errors=2) for r in rounds[1]]
    by = {s.target: s for s in summarize(rounds)}
    proxy = by["affinity-proxy"]
    assert proxy.rps == Spread(18_000, 12_000, 20_000)
    assert proxy.rps_ratio == Spread(0.6, 0.5, 0.6)  # 0.5, 0.6, 0.6: not 18k / 30k of the medians
    assert proxy.errors == 2 and proxy.rounds == 3
    assert proxy.requests == (20_000 + 12_000 + 18_000) * 10
    assert proxy.reference == REFERENCE and by["affinity-new"].reference == NEW_SESSION_REFERENCE
    assert [s.target for s in summarize(rounds)] == [REFERENCE, DIRECT_TARGET, CEILING, "affinity-proxy",
                                                     NEW_SESSION_REFERENCE, "affinity-new"]


def test_summary_of_a_target_missing_from_some_rounds_and_of_missing_cpu() -> None:
    rounds = [with_ratios([_row(REFERENCE, 50_000, other=0.3), _row("x", 10_000, cpu=None, other=None)]),
              with_ratios([_row(REFERENCE, 40_000, other=0.1)])]
    by = {s.target: s for s in summarize(rounds)}
    assert by["x"].rounds == 1 and by["x"].cpu is None and by["x"].other_cpu is None
    assert by[REFERENCE].other_cpu == pytest.approx(0.3)  # the worst round's, not the median
    assert by[REFERENCE].rps == Spread(45_000, 40_000, 50_000)


# --- flagged rounds ----------------------------------------------------------------------------


def test_quiet_rounds_are_not_flagged() -> None:
    rounds = [_round(nginx=n, direct=2 * n) for n in (50_000, 52_000, 49_000, 51_000, 55_000)]
    assert flag_rounds(rounds) == {}
    assert unflagged(rounds, {}) == rounds


def test_a_slow_nginx_per_core_is_flagged_and_says_why() -> None:
    # Round 3: nginx got its core but did 30 % less with it (the committed 0.90x came from such a run).
    rounds = [_round(nginx=n, direct=115_000) for n in (76_000, 80_000, 53_000, 78_000, 77_000)]
    flags = flag_rounds(rounds)
    assert list(flags) == [2]
    assert any("nginx-proxy 53,000 req/s per core" in r and "below the run's median 77,000" in r for r in flags[2])
    assert any(r.startswith("direct ÷ nginx-proxy") for r in flags[2])  # the direct ratio moved as well
    assert unflagged(rounds, flags) == [rounds[i] for i in (0, 1, 3, 4)]


def test_nginx_per_core_is_req_s_over_the_cpu_it_got() -> None:
    # Half the req/s on half a core is the same nginx: not flagged on that count.
    rounds = [_round(nginx=50_000, direct=100_000), _round(nginx=25_000, direct=50_000, nginx_cpu=0.5),
              _round(nginx=50_000, direct=100_000)]
    assert flag_rounds(rounds) == {}
    assert per_core(rounds[1][0]) == pytest.approx(50_000)
    assert per_core(_row("x", 100.0, cpu=None)) is None and per_core(_row("x", 100.0, cpu=0.0)) is None
    assert per_core(None) is None


@pytest.mark.parametrize(("factor", "flagged"), [(1.14, False), (0.86, False), (1.16, True), (0.84, True)])
def test_tolerance_boundary(factor: float, flagged: bool) -> None:
    rounds = [_round(nginx=50_000 * f, direct=100_000 * f) for f in (1.0, 1.0, factor)]
    assert (2 in flag_rounds(rounds)) is flagged
    assert flag_rounds(rounds, tolerance=0.5) == {}


def test_a_fast_nginx_is_flagged_too() -> None:
    rounds = [_round(nginx=n, direct=2 * n) for n in (50_000, 50_000, 65_000)]
    assert "above" in flag_rounds(rounds)[2][0]


def test_haproxy_per_core_is_checked_like_nginx() -> None:
    rounds = [_round(), _round(haproxy_rps=40_000), _round(), _round()]
    flags = flag_rounds(rounds)
    assert list(flags) == [1]
    assert flags[1][0].startswith("haproxy-insert 40,000 req/s per core")


def test_direct_over_nginx_out_of_its_band_is_flagged_alone() -> None:
    rounds = [_round(direct=100_000), _round(direct=100_000), _round(direct=140_000), _round(direct=98_000)]
    flags = flag_rounds(rounds)
    assert list(flags) == [2]
    assert flags[2] == ["direct ÷ nginx-proxy 2.80, 40% above the run's median 2.00"]


def test_other_work_on_the_machine_flags_the_round() -> None:
    rounds = [_round(), _round(other=0.6), _round(other=0.25)]
    flags = flag_rounds(rounds)
    assert list(flags) == [1]  # 0.25 is at the limit, not above it
    assert flags[1] == ["other work above 0.25 cores during 1 of 6 measurements (up to 0.60, while nginx-proxy ran)"]
    assert list(flag_rounds(rounds, other_cpu_limit=0.1)) == [1, 2]
    assert list(flag_rounds([_round(other=1.5)])) == [0]  # one round: only other work can flag it


def test_a_round_can_have_several_reasons_and_nothing_is_dropped() -> None:
    rounds = [_round(), _round(), _round(nginx=30_000, other=1.0), _round()]
    flags = flag_rounds(rounds)
    assert len(flags[2]) == 3  # nginx per core, direct ÷ nginx, other work
    assert summarize(rounds)[0].rps.lo == 30_000  # the all-rounds summary keeps the flagged round
    assert summarize(unflagged(rounds, flags))[0].rps.lo == 50_000


def test_reference_table_shows_what_the_flagging_saw() -> None:
    rounds = [_round(), _round(nginx=30_000, other=0.5), _round()]
    lines = reference_table(rounds, flag_rounds(rounds)).splitlines()
    assert lines[0] == ("| round | flagged | nginx-proxy req/s per core | haproxy-insert req/s per core | "
                        "direct ÷ nginx-proxy | max other CPU |")
    assert lines[2] == "| 1 | no | 50,000 | 60,000 | 2.00 | 0.00 |"
    assert lines[3] == "| 2 | yes | 30,000 | 60,000 | 3.33 | 0.50 |"
    assert len(lines) == 5
    bare = reference_table([with_ratios([_row("affinity-proxy", 1.0, other=None)])], {})
    assert bare.splitlines()[2] == "| 1 | no | - | - | - | - |"


def test_rounds_without_references_flag_nothing() -> None:
    rounds = [with_ratios([_row("affinity-proxy", n)]) for n in (10_000, 30_000, 50_000)]
    assert flag_rounds(rounds) == {}
    assert flag_rounds([]) == {}


@pytest.mark.parametrize(("tolerance", "limit"), [(0.0, 0.25), (1.0, 0.25), (-0.1, 0.25), (0.15, -1.0)])
def test_flagging_settings_out_of_range_are_refused(tolerance: float, limit: float) -> None:
    with pytest.raises(ValueError):
        flag_rounds([_round()], tolerance=tolerance, other_cpu_limit=limit)


# --- tables and verdicts ---------------------------------------------------------------------


def test_tables() -> None:
    rounds = [_round(proxy=p) for p in (30_000, 36_000, 33_000)]
    text = round_table(rounds[0])
    assert text.splitlines()[0].startswith("| target | vs | req/s |")
    assert "| affinity-proxy | nginx | 30,000 |" in text
    assert "| affinity-new | haproxy | 20,000 |" in text
    summary = summary_table(summarize(rounds))
    assert "| affinity-proxy | nginx | 0.66 (0.60-0.72) | 0.82 (0.75-0.90) | 33,000 (30,000-36,000) |" in summary
    assert all(line.count("|") == summary.splitlines()[0].count("|") for line in summary.splitlines())


def test_verdicts_against_issue_16() -> None:
    met = verdicts(summarize([_round(proxy=40_000, new=36_000) for _ in range(5)]))
    assert any(line.startswith("- proxy mode: 0.80 x nginx-proxy") and line.endswith("**met**") for line in met)
    assert any(line.startswith("- new sessions") and "0.60 x HAProxy" in line and line.endswith("**met**")
               for line in met)
    assert any("byte-relay ceiling: 1.00" in line for line in met)
    not_met = verdicts(summarize([_round(proxy=30_000, new=12_000)]))
    assert sum(line.endswith("**not met**") for line in not_met) == 2
    errors = [_round(proxy=40_000)]
    errors[0] = [r if r.target != "affinity-proxy" else dataclasses.replace(r, errors=1) for r in errors[0]]
    lines = verdicts(summarize(errors))
    assert any(line.startswith("- proxy mode:") and line.endswith("**not met**") for line in lines)


# --- legs: a round's measurement of a target split in serpentine legs ----------------------------


def _uniform(lo: float, hi: float) -> tuple[tuple[float, float], ...]:
    """The grid of a uniform distribution on [lo, hi] ms, on the Lua script's percentiles."""
    return tuple((p, lo + (hi - lo) * p / 100) for p in (0, *GRID_PERCENTILES, 100))


def _leg(target: str = "affinity-proxy", requests: int = 100_000, seconds: float = 2.0, *, errors: int = 0,
         p50: float = 0.5, p99: float = 2.0, grid: tuple[tuple[float, float], ...] = (), cpu: float | None = 1.9,
         elapsed: float = 2.0, other: float | None = 0.0) -> Leg:
    return Leg(target, requests, seconds, errors, p50, p99, latency_grid=grid, cpu_seconds=cpu, elapsed=elapsed,
               other_cpu=other)


def test_one_leg_is_the_run_itself() -> None:
    r = parse_wrk_output(GRID)
    seconds = r.requests / r.rps
    leg = Leg("nginx-proxy", r.requests, seconds, r.errors(), r.p50_ms, r.p99_ms, latency_grid=r.latency_grid,
              cpu_seconds=1.05, elapsed=1.1, other_cpu=0.02)
    row = combine_legs([leg])
    assert row.rps == pytest.approx(r.rps)  # wrk's own req/s back
    assert row.requests == r.requests and row.errors == 0
    assert row.p50_ms == pytest.approx(r.p50_ms)  # exactly the grid's 50 %, which is wrk's 50 %
    assert row.p99_ms == pytest.approx(1.337) == pytest.approx(r.p99_ms, abs=0.005)  # wrk's, within its rounding
    assert row.cpu == pytest.approx(1.05 / 1.1) and row.other_cpu == 0.02
    assert row.target == "nginx-proxy" and row.reference == REFERENCE and row.rps_ratio is None
    # Every grid percentile of one distribution comes back exactly, ties (steps) included.
    for pct, value in r.latency_grid:
        assert mixture_quantile([(7.0, r.latency_grid)], pct) == pytest.approx(value)
    steps = ((0, 1.0), (10, 1.0), (50, 1.0), (51, 3.0), (90, 3.0), (99, 3.0), (100, 9.0))
    assert [mixture_quantile([(1.0, steps)], p) for p in (0, 10, 50, 51, 90, 99, 100)] == [1, 1, 1, 3, 3, 3, 9]
    # One leg without the grid: wrk's own percentiles.
    bare = combine_legs([_leg(p50=0.7, p99=3.3)])
    assert (bare.p50_ms, bare.p99_ms) == (0.7, 3.3)


def test_two_legs_give_the_quantiles_of_the_mixture() -> None:
    low, high = _uniform(0.0, 1.0), _uniform(1.0, 2.0)
    # Equal weights: uniform on [0, 2] ms.
    for pct, want in ((1, 0.02), (25, 0.5), (50, 1.0), (75, 1.5), (99, 1.98), (99.9, 1.998)):
        assert mixture_quantile([(1.0, low), (1.0, high)], pct) == pytest.approx(want)
    # 3:1 by requests: F(x) = 0.75 x below 1 ms, 0.75 + 0.25 (x - 1) above.
    assert mixture_quantile([(3.0, low), (1.0, high)], 50) == pytest.approx(2 / 3)
    assert mixture_quantile([(3.0, low), (1.0, high)], 99) == pytest.approx(1.96)
    row = combine_legs([_leg(requests=300_000, grid=low), _leg(requests=100_000, grid=high)])
    assert row.p50_ms == pytest.approx(2 / 3) and row.p99_ms == pytest.approx(1.96)
    # Not the mean of the legs' percentiles (that would be 1.0 and 1.485 at equal weights).
    same = combine_legs([_leg(grid=low), _leg(grid=high)])
    assert same.p50_ms == pytest.approx(1.0) and same.p99_ms == pytest.approx(1.98)
    # Overlapping legs: one twice as slow as the other, equal weights.
    a, b = _uniform(0.0, 2.0), _uniform(1.0, 3.0)  # F = x/4 on [0,1], x/2 - 1/4 on [1,2], (x+1)/4 on [2,3]
    assert mixture_quantile([(1.0, a), (1.0, b)], 50) == pytest.approx(1.5)
    assert mixture_quantile([(1.0, a), (1.0, b)], 90) == pytest.approx(2.6)
    # A leg that served nothing weighs nothing; a part without weight or grid is left out.
    assert combine_legs([_leg(grid=low), _leg(requests=0, grid=high)]).p99_ms == pytest.approx(0.99)
    with pytest.raises(ValueError):
        mixture_quantile([(0.0, low), (1.0, ())], 50)
    with pytest.raises(ValueError):
        mixture_quantile([(1.0, low)], 101)


def test_legs_combine_requests_seconds_errors_and_cpu() -> None:
    legs = [_leg(requests=100_000, seconds=2.0, errors=1, cpu=1.9, elapsed=2.02, other=0.05),
            _leg(requests=80_000, seconds=2.01, errors=0, cpu=2.0, elapsed=2.1, other=0.3),
            _leg(requests=120_000, seconds=1.99, errors=4, cpu=1.8, elapsed=2.0, other=None)]
    row = combine_legs(legs)
    assert row.rps == pytest.approx(300_000 / 6.0)  # requests over seconds: not the mean of the legs' req/s
    assert row.requests == 300_000 and row.errors == 5
    assert row.cpu == pytest.approx(5.7 / 6.12)  # CPU-seconds over wall seconds
    assert row.other_cpu == 0.3  # the worst leg's
    # Without the grid: the request-weighted mean of wrk's own percentiles.
    mixed = combine_legs([_leg(requests=300, p50=1.0, p99=4.0),
                          _leg(requests=100, p50=2.0, p99=8.0, grid=_uniform(0, 1))])
    assert mixed.p50_ms == pytest.approx(1.25) and mixed.p99_ms == pytest.approx(5.0)
    assert combine_legs([_leg(cpu=None), _leg()]).cpu is None  # a leg without CPU: no CPU figure
    assert combine_legs([_leg(other=None)]).other_cpu is None
    nothing = combine_legs([_leg(requests=0, seconds=0.0, p50=0.0, p99=0.0)])
    assert nothing.rps == 0.0 and nothing.requests == 0
    with pytest.raises(ValueError):
        combine_legs([])
    with pytest.raises(ValueError):
        combine_legs([_leg("a"), _leg("b")])


def test_round_order_rotates_and_reverses() -> None:
    names = ["a", "b", "c", "d"]
    assert [round_order(names, i) for i in range(5)] == [
        ["a", "b", "c", "d"], ["d", "c", "b", "a"], ["b", "c", "d", "a"], ["c", "b", "a", "d"], ["c", "d", "a", "b"]]
    assert [r[0] for r in (round_order(names, i) for i in range(0, 8, 2))] == names  # a different one first
    assert round_order([], 3) == []


@pytest.mark.parametrize("n", [1, 2, 5, 10])
@pytest.mark.parametrize("legs", [1, 2, 3, 4, 6])
def test_serpentine_legs_spread_every_target_over_the_round(n: int, legs: int) -> None:
    order = [f"t{i}" for i in range(n)]
    runs = serpentine(order, legs)
    assert len(runs) == n * legs
    assert [t for k, t in runs if k == 0] == order and [k for k, _ in runs] == sorted(k for k, _ in runs)
    if legs > 1:
        assert [t for k, t in runs if k == 1] == order[::-1]  # the sweep turns back
    positions = {t: [i for i, (_, name) in enumerate(runs) if name == t] for t in order}
    assert all(len(p) == legs for p in positions.values())  # every target in every leg, once
    for p in positions.values():
        assert all(k * n <= i < (k + 1) * n for k, i in enumerate(p))  # one leg in each slice of the round
        assert all(b - a <= 2 * n - 1 for a, b in itertools.pairwise(p))  # never more than 2 sweeps apart
    if legs % 2 == 0:  # an even number of legs: every target's mean time in the round is the middle
        assert all(sum(p) / legs == pytest.approx((n * legs - 1) / 2) for p in positions.values())
        half = n * legs // 2  # and half of its legs fall in each half of the round
        assert all(sum(i < half for i in p) == legs // 2 for p in positions.values())
    with pytest.raises(ValueError):
        serpentine(order, 0)


def test_legs_arguments() -> None:
    assert parse_args([]).legs == 4
    assert parse_args(["--legs", "1"]).legs == 1  # one run per target per round: the old behaviour
    assert parse_args(["--quick"]).legs == 1 and parse_args(["--quick", "--legs", "3"]).legs == 3
    assert parse_args(["--duration", "6", "--legs", "3"]).legs == 3
    for argv in (["--legs", "0"], ["--legs", "3"], ["--duration", "3", "--legs", "4"], ["--legs", "21"],
                 ["--duration", "8", "--legs", "16"]):  # wrk's -d is whole seconds, at least 1
        with pytest.raises(SystemExit):
            parse_args(argv)


def test_estimate_counts_every_leg() -> None:
    one, four = estimate_seconds(10, 5, 8, 2, legs=1), estimate_seconds(10, 5, 8, 2, legs=4)
    assert four > one > 10 * 5 * 8
    assert estimate_seconds(10, 5, 8, 2, legs=7) - four == pytest.approx(four - one)  # linear in the legs
    assert estimate_seconds(10, 5, 8, 2) == one


def test_results_say_how_legs_work(tmp_path: Path) -> None:
    import datetime as dt

    from benchmarks.run import results_markdown
    from benchmarks.targets import Target

    info = {"nproc": "2", "cpu": "x", "kernel": "6", "versions": "python 3", "commit": "abc"}
    targets = [Target(n, "t", 1, [], list) for n in (REFERENCE, "affinity-proxy")]
    rounds = [with_ratios([_row(REFERENCE, 50_000), _row("affinity-proxy", 30_000)])]
    argv = ["--legs", "4", "--output", str(tmp_path / "r.md")]
    text = results_markdown(info, "python -m benchmarks.run " + " ".join(argv), parse_args(argv), targets, rounds, {},
                            ("0", "0"), dt.datetime.now(dt.UTC), 1.0)
    assert "- load: wrk -t1 -c50, 4 legs of 2s per target per round, serpentine order" in text
    assert "--legs 4" in text
    assert legs_text(1, 8) == "-d8s per target per round"
    from benchmarks import run
    assert "serpentine" in (run.__doc__ or "") and "--legs" in (run.__doc__ or "")


# --- the run's shape ---------------------------------------------------------------------------


def test_make_bench_runs_five_rounds_within_ten_minutes() -> None:
    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    line = next(ln for ln in makefile.splitlines() if "-m benchmarks.run" in ln)
    args = parse_args(line.split("-m benchmarks.run", 1)[1].split())
    assert args.rounds >= 5
    from benchmarks.targets import ALL_TARGETS
    assert args.legs == 4
    assert estimate_seconds(len(ALL_TARGETS), args.rounds, args.duration, args.warmup, args.legs) < 600
    assert args.output is not None and args.output.name == "RESULTS.md"


@pytest.mark.parametrize("argv", [["--tolerance", "0"], ["--tolerance", "1.5"], ["--other-cpu-limit", "-1"],
                                  ["--rounds", "0"], ["--targets", "nginx-proxy,bogus"]])
def test_bad_arguments_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)


def test_quick_writes_nothing_unless_asked(tmp_path: Path) -> None:
    assert parse_args(["--quick"]).output is None
    assert parse_args(["--quick", "--output", str(tmp_path / "r.md")]).rounds == 1


# --- HAProxy ----------------------------------------------------------------------------------


def test_haproxy_insert_config() -> None:
    conf = haproxy.insert_conf(8080, [("app-1", 9001), ("app-2", 9002)], cookie_name="fly-instance-id")
    assert "bind 127.0.0.1:8080" in conf
    assert "cookie fly-instance-id insert indirect nocache httponly" in conf
    assert re.findall(r"server (\S+) (127\.0\.0\.1:\d+) cookie (\S+)", conf) == [
        ("app-1", "127.0.0.1:9001", "app-1"), ("app-2", "127.0.0.1:9002", "app-2")]
    assert "nbthread 1" in conf and "option http-keep-alive" in conf
    assert haproxy.haproxy_argv("/usr/sbin/haproxy", Path("/t/h.cfg")) == ["/usr/sbin/haproxy", "-db", "-f", "/t/h.cfg"]


@pytest.mark.parametrize(("backends", "cookie"), [([], "c"), ([("bad id", 1)], "c"), ([("a\nb", 1)], "c"),
                                                  ([("app-1", 1)], "bad name"), ([("app-1", 1)], "")])
def test_haproxy_config_refuses_bad_input(backends: list[tuple[str, int]], cookie: str) -> None:
    with pytest.raises(ValueError):
        haproxy.insert_conf(8080, backends, cookie_name=cookie)


HAPROXY = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if Path(p).exists()), None)


@pytest.mark.skipif(HAPROXY is None, reason="haproxy not installed (.ci/install-deps installs it)")
def test_haproxy_accepts_the_generated_config(tmp_path: Path) -> None:
    assert HAPROXY is not None
    path = tmp_path / "h.cfg"
    path.write_text(haproxy.insert_conf(8080, [("app-1", 9001), ("app-2", 9002), ("app-3", 9003)]))
    proc = subprocess.run([HAPROXY, "-c", "-f", str(path)], capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- the byte relay (a real process, real sockets on 127.0.0.1) ------------------------------------


@contextlib.contextmanager
def _relay(upstream_port: int) -> Iterator[int]:
    """``python -m benchmarks.byte_relay`` to ``upstream_port``: yields its port once it accepts,
    then stops it with SIGTERM (a clean exit is part of the test)."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.byte_relay", "--listen", f"127.0.0.1:{port}",
                             "--upstream", f"127.0.0.1:{upstream_port}"], cwd=Path(__file__).resolve().parents[2],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the byte relay did not listen within 30 s"
                time.sleep(0.05)
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stderr:
                proc.stderr.close()


def _read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_byte_relay_copies_bytes_both_ways_and_passes_eof_on() -> None:
    seen: list[bytes] = []
    listener = socket.create_server(("127.0.0.1", 0))

    def upstream() -> None:  # every connection: read to EOF, answer 1000 x the bytes upper-cased, close
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # the listener was closed: the test is over
            with conn:
                data = _read_all(conn)
                seen.append(data)
                conn.sendall(data.upper() * 1000)  # more than a socket buffer: back-pressure on the way

    thread = threading.Thread(target=upstream, daemon=True)
    thread.start()
    try:
        with _relay(listener.getsockname()[1]) as port, socket.create_connection(("127.0.0.1", port), 10) as client:
            client.sendall(b"GET / HTTP/1.1\r\n")  # may arrive before the relay's upstream connection exists
            client.sendall(b"Host: x\r\n\r\n")
            client.shutdown(socket.SHUT_WR)
            answer = _read_all(client)
    finally:
        listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() (close() alone does not, on Linux)
        listener.close()
        thread.join(timeout=30)
    assert not thread.is_alive()
    assert answer == b"GET / HTTP/1.1\r\nHOST: X\r\n\r\n" * 1000
    assert b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" in seen  # (the readiness probe's connection sent nothing)


def test_byte_relay_closes_the_client_when_the_upstream_refuses() -> None:
    with _relay(_free_port()) as port, socket.create_connection(("127.0.0.1", port), 10) as client:
        client.sendall(b"hello")
        try:
            assert client.recv(100) == b""  # closed, not left open (a hang would time the test out)
        except ConnectionResetError:
            pass  # or aborted: closed either way


@pytest.mark.parametrize("argv", [["--listen", "nope", "--upstream", "127.0.0.1:1"],
                                  ["--listen", "127.0.0.1:1", "--upstream", "127.0.0.1:x"],
                                  ["--listen", "127.0.0.1:1"]])
def test_byte_relay_refuses_bad_arguments(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        byte_relay.main(argv)


# --- against an earlier commit (--compare-ref) ---------------------------------------------------

SHA = "9c433204caeeab6bd4a67be0fcb9f174ad14047a"


def test_ref_target_names() -> None:
    assert ref_target_name("affinity-proxy", "pre-redesign") == "affinity-proxy@pre-redesign"
    assert split_target_name("affinity-fly@v1.2") == ("affinity-fly", "v1.2")
    assert split_target_name("affinity-fly") == ("affinity-fly", None)
    assert ref_label("pre-redesign", SHA) == "pre-redesign"  # a name stays as given
    assert ref_label(SHA, SHA) == "9c433204caee" and ref_label(SHA.upper(), SHA) == "9c433204caee"
    assert ref_label("9c433204caee", SHA) == "9c433204caee"
    for name in ("nginx-proxy", "byte-relay", "haproxy-insert"):
        with pytest.raises(ValueError):
            ref_target_name(name, "x")  # only affinity-proxy targets have a twin
    assert mirrored(["nginx-proxy", "affinity-new", "affinity-proxy", "direct"]) == ["affinity-proxy", "affinity-new"]
    assert count_targets(["nginx-proxy", "affinity-proxy", "affinity-fly"], refs=2) == 7
    assert count_targets(["nginx-proxy"], refs=0) == 1


@pytest.mark.parametrize("ref", ["", "-x", "--output=/tmp/x", "a b", "a@b", "a,b", "x|y", "a\nb", "x" * 101])
def test_bad_refs_are_refused(ref: str) -> None:
    with pytest.raises(ValueError):
        check_ref_syntax(ref)
    with pytest.raises(SystemExit):
        parse_args(["--compare-ref", ref])


def test_compare_ref_arguments() -> None:
    args = parse_args(["--compare-ref", "pre-redesign", "--compare-ref", "HEAD~3"])
    assert args.compare_ref == ["pre-redesign", "HEAD~3"]
    assert parse_args([]).compare_ref == []
    for argv in (["--compare-ref", "a", "--compare-ref", "a"],  # the same ref twice
                 ["--compare-ref", "a", "--targets", "nginx-proxy,direct"]):  # nothing to compare
        with pytest.raises(SystemExit):
            parse_args(argv)


def test_resolve_refuses_what_is_not_a_commit_here() -> None:
    with pytest.raises(RefError):
        resolve("no-such-ref-in-this-repository")
    with pytest.raises(ValueError):
        resolve("-h")


def _pair_rounds(pairs: list[tuple[float, float]], *, twin_errors: int = 0) -> list[list[Row]]:
    return [with_ratios([_row(REFERENCE, 50_000), _row("affinity-proxy", cur, p99=2.0),
                         _row("affinity-proxy@old", old, p99=4.0, errors=twin_errors)]) for cur, old in pairs]


def test_same_round_ratio_is_the_median_of_per_round_ratios() -> None:
    rounds = _pair_rounds([(30_000, 30_000), (20_000, 25_000), (33_000, 30_000)])
    assert same_round_ratio(rounds, "affinity-proxy", "affinity-proxy@old") == Spread(1.0, 0.8, 1.1)
    rounds.append(with_ratios([_row("affinity-proxy", 10_000)]))  # a round without the twin: left out
    assert same_round_ratio(rounds, "affinity-proxy", "affinity-proxy@old") == Spread(1.0, 0.8, 1.1)
    assert same_round_ratio(rounds, "affinity-proxy", "affinity-fly@old") is None
    assert same_round_ratio(_pair_rounds([(1.0, 0.0)]), "affinity-proxy", "affinity-proxy@old") is None  # no ÷ 0


def test_ref_pairs_need_both_sides() -> None:
    names = ["nginx-proxy", "affinity-proxy", "affinity-proxy@a", "affinity-proxy@b", "affinity-fly@a", "x@"]
    assert ref_pairs(names) == [("affinity-proxy", "affinity-proxy@a", "a"),
                                ("affinity-proxy", "affinity-proxy@b", "b")]


def test_the_comparison_line() -> None:
    lines = comparison_lines(_pair_rounds([(29_000, 30_000), (28_000, 30_000), (30_000, 30_000)]))
    assert lines == ["- affinity-proxy: current / old same-round ratio: 0.967 (0.933-1.000) req/s, p99 0.50; "
                     "within 5% of old (median ≥ 0.95, 0 errors): **met**"]
    slower = comparison_lines(_pair_rounds([(27_000, 30_000)]))
    assert slower[0].startswith("- affinity-proxy: current / old same-round ratio: 0.900 req/s")
    assert slower[0].endswith("**not met**")
    errors = comparison_lines(_pair_rounds([(30_000, 30_000)], twin_errors=3))
    assert errors[0].endswith("**not met** (0 errors current, 3 at old)")  # errors make it not like for like
    assert comparison_lines(_round() and [_round()]) == []  # no twin, no line
    assert comparison_lines(_pair_rounds([(28_000, 30_000)]), tolerance=0.10)[0].endswith("**met**")


def test_a_ref_gets_the_same_configs_as_the_current_tree() -> None:
    backends = [("app-1", 9001), ("app-2", 9002), ("app-3", 9003)]
    want = ["nginx-proxy", "affinity-proxy", "affinity-fly", "affinity-new"]

    def configs(first_port: int) -> list[tuple[str, int, str]]:
        ports = [(first_port + 2 * i, first_port + 2 * i + 1) for i in range(4)]
        return proxy_configs(want, ports=ports, secret="s" * 64, backends=backends, fly_upstream=9001)

    current, ref = configs(20000), configs(30000)
    assert [(n, p) for n, p, _ in current] == [("affinity-proxy", 20000), ("affinity-fly", 20002)]
    for (_, port, text), (_, ref_port, ref_text) in zip(current, ref, strict=True):
        # Only the ports differ: listen and admin_listen.
        assert ref_text.replace(f":{ref_port}", ":L").replace(f":{ref_port + 1}", ":A") == \
            text.replace(f":{port}", ":L").replace(f":{port + 1}", ":A")
    proxy, fly = current[0][2], current[1][2]
    assert "mode: proxy" in proxy and "engine: fast" in proxy and "secret: " + "s" * 64 in proxy
    assert "mode: fly" in fly and "machine_id: m1" in fly and "upstream: http://127.0.0.1:9001" in fly
    assert re.findall(r"id: (m\d), url: 'http://127.0.0.1:(\d+)'", fly) == [("m1", "9001"), ("m2", "9002"),
                                                                         ("m3", "9003")]
    # affinity-new alone still needs the proxy-mode fast engine process (it loads that one).
    only_new = proxy_configs(["affinity-new"], ports=[(1, 2)], secret="s", backends=backends, fly_upstream=9001)
    assert [n for n, _, _ in only_new] == ["affinity-proxy"]
    assert set(COMPARABLE) >= {"affinity-proxy", "affinity-fly", "affinity-new"}


def test_make_bench_compare_passes_the_ref() -> None:
    makefile = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    line = next(ln for ln in makefile.splitlines() if "--compare-ref" in ln)
    argv = line.split("-m benchmarks.run", 1)[1].replace("$(REF)", "pre-redesign").split()
    args = parse_args(argv)
    assert args.compare_ref == ["pre-redesign"] and args.rounds >= 5
    names = args.targets.split(",")
    assert {"affinity-proxy", "affinity-fly", "nginx-proxy"} <= set(names)
    assert args.legs == 4
    assert estimate_seconds(count_targets(names, 1), args.rounds, args.duration, args.warmup, args.legs) < 720


@pytest.mark.skipif(NGINX is None, reason="nginx not installed (make test installs it: .ci/install-deps)")
def test_a_ref_runs_from_its_worktree_and_answers(tmp_path: Path) -> None:
    """HEAD checked out beside the tree: its proxy and fly node start from the worktree's code (not
    the editable install), answer as the current ones do, and everything is gone afterwards."""
    assert NGINX is not None
    worktrees = Worktrees()
    try:
        tree = worktrees.add("HEAD")
        with pytest.raises(RefError):
            worktrees.add("HEAD")  # twice: refused
        assert tree.label == "HEAD" and tree.path.is_dir()
        assert check_imports_from(tree).is_relative_to(tree.path)
        procs = Processes(tmp_path)
        try:
            targets = start_targets(procs, nginx_bin=NGINX, target_cpu=None, backend_cpu=None,
                                    only=["affinity-proxy", "affinity-fly"], refs=[tree])
        finally:
            assert procs.finish() == []
        # start_targets had each one answer as expected (200 with its own cookie; 409 replays).
        assert [t.name for t in targets] == ["affinity-proxy", "affinity-proxy@HEAD", "affinity-fly",
                                             "affinity-fly@HEAD"]
        assert "worktree" not in targets[0].what and f"at HEAD ({tree.sha[:12]})" in targets[1].what
    finally:
        assert worktrees.remove_all() == []
    assert not tree.path.exists() and not tree.path.parent.exists()
    listed = subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[2]), "worktree", "list"],
                            capture_output=True, text=True, timeout=30, check=True).stdout
    assert str(tree.path) not in listed


def test_results_markdown_has_the_comparison_section(tmp_path: Path) -> None:
    import datetime as dt

    from benchmarks.refs import RefTree
    from benchmarks.run import results_markdown
    from benchmarks.targets import Target

    args = parse_args(["--compare-ref", "old", "--output", str(tmp_path / "r.md")])
    info = {"nproc": "2", "cpu": "x", "kernel": "6", "versions": "python 3", "commit": "abc"}
    targets = [Target(n, "t", 1, [], list) for n in (REFERENCE, "affinity-proxy", "affinity-proxy@old")]
    rounds = _pair_rounds([(29_000, 30_000)])
    tree = RefTree("old", SHA, "old", tmp_path)
    text = results_markdown(info, "cmd", args, targets, rounds, {}, ("0", "0"), dt.datetime.now(dt.UTC), 1.0, [tree])
    assert "- compared with (`<target>@REF`, a git worktree run with the same interpreter): old = 9c433204caee" in text
    section = text.split("## Against earlier commits", 1)[1].split("## Flagged rounds", 1)[0]
    assert "- affinity-proxy: current / old same-round ratio: 0.967 req/s" in section
    assert "## Against earlier commits" not in results_markdown(info, "cmd", args, targets, rounds, {}, ("0", "0"),
                                                                dt.datetime.now(dt.UTC), 1.0)
