"""wrk: the command line, the Lua status counter, and the parser of wrk's report.

``parse_wrk_output`` is pure (tested on captured outputs). The Lua script counts responses per
status code in each wrk thread and prints them from ``done()`` as ``status <code> <count>`` lines
after wrk's own report, so a fly-mode target can expect 409 and count anything else as an error.
It also prints the latency distribution on a grid of percentiles (``latency p <pct> <us>``, wrk's
own ``latency:percentile(pct)``; 0 is the minimum, 100 the maximum), so that runs split in legs can
merge their distributions instead of averaging percentiles (``rounds.combine_legs``).
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: The percentiles the Lua script prints besides 0 (the minimum) and 100 (the maximum).
GRID_PERCENTILES: tuple[float, ...] = (*range(1, 100), 99.5, 99.9, 99.99)

STATUS_LUA = """\
-- benchmarks/wrk.py: count responses per status code, report them and the latency grid from done()
local threads = {}
local GRID = {@GRID@}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  statuses = {}
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  if summary.requests > 0 then
    io.write(string.format("latency p 0 %d\\n", latency.min))
    for _, p in ipairs(GRID) do
      io.write(string.format("latency p %g %d\\n", p, latency:percentile(p)))
    end
    io.write(string.format("latency p 100 %d\\n", latency.max))
  end
  local total = {}
  for _, thread in ipairs(threads) do
    local counts = thread:get("statuses")
    for code, n in pairs(counts) do
      total[code] = (total[code] or 0) + n
    end
  end
  for code, n in pairs(total) do
    io.write(string.format("status %d %d\\n", code, n))
  end
end
""".replace("@GRID@", ", ".join(f"{p:g}" for p in GRID_PERCENTILES))

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_LATENCY = re.compile(r"^\s*(50|75|90|99)(?:\.0+)?%\s+([0-9.]+)(us|ms|s|m|h)\s*$")
_RPS = re.compile(r"^Requests/sec:\s+([0-9.]+)\s*$")
_TOTAL = re.compile(r"^\s*(\d+) requests in ([0-9.]+)(us|ms|s|m|h),")
_SOCKET = re.compile(r"^\s*Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)\s*$")
_NON2XX = re.compile(r"^\s*Non-2xx or 3xx responses: (\d+)\s*$")
_STATUS = re.compile(r"^status (\d{3}) (\d+)\s*$")
_GRID = re.compile(r"^latency p ([0-9]+(?:\.[0-9]+)?) (\d+)\s*$")


class WrkParseError(ValueError):
    """wrk's output lacks a figure the benchmark needs (wrk failed, or its format changed)."""


@dataclass(frozen=True, slots=True)
class WrkResult:
    """One wrk run. Latencies are milliseconds; ``statuses`` is empty without the Lua script."""

    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    socket_errors: Mapping[str, int] = field(default_factory=dict)
    non_2xx_3xx: int = 0
    statuses: Mapping[int, int] = field(default_factory=dict)
    #: ``(percentile, ms)`` in increasing order of percentile, from the Lua script (empty without it)
    latency_grid: tuple[tuple[float, float], ...] = ()

    def errors(self, expected_status: int | None = None) -> int:
        """Failed requests: socket errors, plus responses with an unexpected status — any status but
        ``expected_status`` when one is given, else non-2xx/3xx (wrk's own count, or the Lua one)."""
        socket = sum(self.socket_errors.values())
        if expected_status is not None:
            if not self.statuses:
                raise WrkParseError("status counts are needed to check an expected status (run with the Lua script)")
            return socket + sum(n for code, n in self.statuses.items() if code != expected_status)
        if self.statuses:
            return socket + sum(n for code, n in self.statuses.items() if not 200 <= code < 400)
        return socket + self.non_2xx_3xx


def to_ms(value: str, unit: str) -> float:
    return float(value) * _UNITS_MS[unit]


def parse_wrk_output(text: str) -> WrkResult:
    """Parse ``wrk --latency`` output (optionally followed by the Lua script's status lines)."""
    latency: dict[str, float] = {}
    rps: float | None = None
    requests: int | None = None
    seconds = 0.0
    socket: dict[str, int] = {}
    non2xx = 0
    statuses: dict[int, int] = {}
    grid: dict[float, float] = {}
    for line in text.splitlines():
        if m := _LATENCY.match(line):
            latency[m.group(1)] = to_ms(m.group(2), m.group(3))
        elif m := _RPS.match(line):
            rps = float(m.group(1))
        elif m := _TOTAL.match(line):
            requests = int(m.group(1))
            seconds = to_ms(m.group(2), m.group(3)) / 1000.0
        elif m := _SOCKET.match(line):
            socket = dict(zip(("connect", "read", "write", "timeout"), map(int, m.groups()), strict=True))
        elif m := _NON2XX.match(line):
            non2xx = int(m.group(1))
        elif m := _STATUS.match(line):
            statuses[int(m.group(1))] = statuses.get(int(m.group(1)), 0) + int(m.group(2))
        elif m := _GRID.match(line):
            pct = float(m.group(1))
            if not 0 <= pct <= 100:
                raise WrkParseError(f"latency percentile out of range: {line!r}")
            grid[pct] = int(m.group(2)) / 1000.0
    missing = [name for name, v in (("Requests/sec", rps), ("requests in", requests)) if v is None]
    missing += [f"{p}% latency" for p in ("50", "99") if p not in latency]
    if missing:
        raise WrkParseError(f"wrk output lacks {', '.join(missing)} (run with --latency?):\n{text[-2000:]}")
    assert rps is not None and requests is not None
    return WrkResult(
        requests=requests, seconds=seconds, rps=rps, p50_ms=latency["50"], p99_ms=latency["99"],
        socket_errors=socket, non_2xx_3xx=non2xx, statuses=statuses, latency_grid=tuple(sorted(grid.items())),
    )


def wrk_argv(
    wrk: str, url: str, *, duration: float, connections: int, threads: int = 1,
    headers: Sequence[tuple[str, str]] = (), script: Path | None = None, cpu: int | None = None,
    timeout: float = 2.0,
) -> list[str]:
    """The wrk command line, pinned to ``cpu`` with taskset when given."""
    if not url.startswith("http://127.0.0.1:"):
        raise ValueError(f"the benchmark only loads 127.0.0.1, got {url!r}")
    argv = [wrk, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency",
            f"--timeout={max(1, round(timeout))}s"]
    for name, value in headers:
        argv += ["-H", f"{name}: {value}"]
    if script is not None:
        argv += ["-s", str(script)]
    argv.append(url)
    return (["taskset", "-c", str(cpu)] if cpu is not None else []) + argv


def run_wrk(argv: Sequence[str], *, duration: float) -> tuple[WrkResult, str]:
    """Run wrk to completion (bounded: killed if it outlives the duration by 30 s)."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=duration + 30, check=False)
    out = proc.stdout + (("\n" + proc.stderr) if proc.stderr.strip() else "")
    if proc.returncode != 0:
        raise WrkParseError(f"wrk exited with {proc.returncode}:\n{out[-2000:]}")
    return parse_wrk_output(proc.stdout), out
